"""Checkpoint formats, one package each: :mod:`.safetensors` (a Hugging Face folder, plain or quantized) and
:mod:`.gguf` (llama.cpp, Ollama, LM Studio). :func:`detect` is the only place that decides which format a
location is; :mod:`weightlock.api` dispatches on its answer.

A new format is a new package here (its own reader, planner, writer, record and checks, built on
:mod:`weightlock.core` and :mod:`weightlock.io`; it imports no other format and no engine), a row in
:data:`FORMATS`, and a branch of each table in :mod:`weightlock.api`.
"""

from __future__ import annotations

import os

SAFETENSORS = "safetensors"
GGUF = "gguf"
# name -> what a location of the format is, for messages; the order is the order of detection (a .gguf path is
# GGUF, anything else is taken for a folder, whose opening then refuses what is not one)
FORMATS = {GGUF: "a GGUF file", SAFETENSORS: "a safetensors folder"}


def detect(location: str | os.PathLike | object) -> str:
    """The format of ``location``: a path or Hub id, or an already opened model (a folder's ``Checkpoint``, a
    ``GGUFModel``). Decided from the name alone (a ``.gguf`` suffix, as llama.cpp's own tools do); opening the
    location is the format's job, and refuses what is not what it claims."""
    from weightlock.formats.gguf.file import GGUFModel, is_gguf_path
    from weightlock.formats.safetensors.folder import Checkpoint

    if isinstance(location, GGUFModel):
        return GGUF
    if isinstance(location, Checkpoint):
        return SAFETENSORS
    if not isinstance(location, (str, os.PathLike)):
        from weightlock.errors import InvalidInputError

        raise InvalidInputError(
            f"not a checkpoint location: a {type(location).__name__}",
            hint="pass a folder, a cached Hub id or a .gguf file (a str or a path), or a model weightlock opened",
        )
    return GGUF if is_gguf_path(location) else SAFETENSORS
