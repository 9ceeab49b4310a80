"""What the transformers class check proved, remembered: verify's ``transformers_names`` verdict by a digest of
everything the verdict depends on, so that proving it again costs a few milliseconds instead of importing torch
and transformers (about 3 s cold) and building the model class on the meta device.

The check (:func:`weightlock.engines.transformers.check_loader_names`) is a function of:

- the output's ``config.json`` (what ``AutoConfig.from_pretrained`` reads), taken whole and canonicalised;
- the output's tensors: every stored name with its dtype and shape (nothing else of a tensor is looked at);
- the code that builds and compares: transformers and torch as installed (their location, and the size and
  modification time of the files the class check runs: the package roots, ``models/auto`` and the model's own
  ``models/<type>`` folder), the folder they are installed in (any install, upgrade or removal there changes
  its modification time: a quantization library appearing changes what ``from_pretrained`` would do), the
  Python running, and weightlock's own check (the source of the modules that hold it).

The key is the SHA-256 of all of that, canonicalised. A changed checkpoint (a tensor renamed, a shape or a
config field changed) or another transformers is another key, which nothing has been stored under: a miss,
and the check runs. Only verdicts that let an output through (pass, warn) are remembered; a failure is
always computed afresh, with its details.

Two stores: a dict in this process (``tune`` bakes one model at several alphas in one process) and, optionally,
one small JSON file per key under ``$WEIGHTLOCK_CACHE_DIR``, else ``$XDG_CACHE_HOME/weightlock/class-check``,
else ``~/.cache/weightlock/class-check``; ``WEIGHTLOCK_CACHE_DIR=off`` turns both off. A quantized config is
remembered in memory only: what its quantizer decides depends on the machine (a GPU, Triton, kernels), which
the key does not describe.

What the disk store may be trusted with. It is written only by weightlock (atomically: a temporary file renamed
into place), in a folder of the user's (mode 0700); a folder or file that is not the user's, or that others may
write, is not read (nor written). An entry is read as untrusted input: a regular file (not followed through a
symlink) of at most 64 KiB, JSON of exactly the expected fields and types, whose recorded key is the key looked
up, with a verdict of pass or warn; anything else (truncated, garbled, another format) is a miss, never an
error and never a pass. What the store cannot stop is the user's own account writing a forged entry under the
right name: such an account can as well edit weightlock or transformers themselves.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import sys
import tempfile
from functools import lru_cache
from pathlib import Path

CACHE_VARIABLE = "WEIGHTLOCK_CACHE_DIR"  # a folder for the disk store, or "off" (no remembering at all)
FORMAT = "weightlock-class-check"
VERSION = 1
MAX_ENTRY_BYTES = 64 << 10
MAX_MEMORY_ENTRIES = 256
REMEMBERED = ("pass", "warn")  # verdicts that are remembered; a failure is always computed afresh
_memory: dict[str, tuple[str, str, list[str]]] = {}


def enabled() -> bool:
    return os.environ.get(CACHE_VARIABLE, "").strip().lower() not in ("off", "0", "no", "false")


def cache_folder() -> Path:
    chosen = os.environ.get(CACHE_VARIABLE)
    if chosen:
        return Path(chosen)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "weightlock" / "class-check"


def key_for(checkpoint) -> tuple[str, bool] | None:
    """The digest of everything the class check's verdict on ``checkpoint`` depends on, and whether it may be kept
    on disk; None when it cannot be described (transformers or torch not found without importing them, which
    leaves the check to run, or to be skipped, as it would without this store)."""
    if not enabled():
        return None
    config = checkpoint.config
    model_type = config.get("model_type") if isinstance(config, dict) else None
    environment = _environment(model_type if isinstance(model_type, str) else "")
    if environment is None:
        return None
    files = _folder_files(checkpoint.root)
    if files is None:
        return None
    material = {
        "format": FORMAT,
        "version": VERSION,
        "environment": environment,
        "config": config,
        # config.json is not all transformers reads: a "configuration_files" list sends AutoConfig to a versioned
        # config.X.Y.Z.json instead, and a folder may hold modeling code or other JSON it reads; every file of the
        # folder but the weights (their names, dtypes and shapes are below) and the model card is keyed by content
        "files": files,
        "tensors": sorted([name, entry.dtype, list(entry.shape)] for name, entry in checkpoint.tensors.items()),
    }
    try:
        text = json.dumps(material, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True)
    except (TypeError, ValueError):  # not expected of a parsed config.json; then there is nothing to key
        return None
    on_disk = not (isinstance(config, dict) and config.get("quantization_config") is not None)
    on_disk = on_disk and environment.get("installed", True)  # an editable transformers changes without an install
    return hashlib.sha256(text.encode("ascii")).hexdigest(), on_disk


MAX_KEYED_FILE_BYTES = 64 << 20  # a folder with a larger non-weight file is not remembered (hashing it is no saving)
NOT_KEYED_SUFFIXES = (".safetensors", ".md")  # weights (keyed by their headers) and model cards (per edit)


def _folder_files(root) -> dict[str, str] | None:
    """sha256 of every regular file directly in ``root`` but the weights and model cards; None (do not remember)
    when one cannot be read or is too large. Subfolders (weightlock's record) are not read by transformers."""
    found: dict[str, str] = {}
    try:
        with os.scandir(root) as entries:
            listed = sorted(entries, key=lambda e: e.name)
    except OSError:
        return None
    for entry in listed:
        if entry.name.endswith(NOT_KEYED_SUFFIXES) or entry.is_dir():
            continue
        try:
            if not entry.is_file() or entry.stat().st_size > MAX_KEYED_FILE_BYTES:
                return None
            found[entry.name] = hashlib.sha256(Path(entry.path).read_bytes()).hexdigest()
        except OSError:
            return None
    return found


RECALLED = " (verdict remembered from an identical earlier check; WEIGHTLOCK_CACHE_DIR=off runs it again)"


def recall(key: tuple[str, bool] | None) -> tuple[str, str, list[str]] | None:
    """The remembered verdict (status, message, details) for ``key``, or None (not remembered, or unreadable).
    The message says it was remembered (RECALLED): the report shows which checks ran here."""
    if key is None:
        return None
    digest, on_disk = key
    verdict = _memory.get(digest)
    if verdict is None and on_disk:
        verdict = _read_entry(digest)
        if verdict is not None:
            _remember_in_memory(digest, verdict)
    if verdict is None:
        return None
    status, message, details = verdict
    return status, message + RECALLED, list(details)


def remember(key: tuple[str, bool] | None, status: str, message: str, details: list[str], checkpoint=None) -> None:
    """Keep a verdict that lets an output through; best effort (a store that cannot be written is no error).
    ``checkpoint``: keyed again after the check, and nothing is kept unless the key is the same (a file changed
    while the check read it would otherwise store a verdict under inputs it was not computed from)."""
    if key is None or status not in REMEMBERED:
        return
    if checkpoint is not None and key_for(checkpoint) != key:
        return
    digest, on_disk = key
    verdict = (status, message, list(details))
    _remember_in_memory(digest, verdict)
    if on_disk:
        _write_entry(digest, verdict)


def forget() -> None:
    """Empty this process's store (the disk store is left as it is)."""
    _memory.clear()


def _remember_in_memory(digest: str, verdict: tuple[str, str, list[str]]) -> None:
    if len(_memory) >= MAX_MEMORY_ENTRIES:
        _memory.pop(next(iter(_memory)))
    _memory[digest] = verdict


# --- what the verdict depends on, besides the checkpoint --------------------------------------------------------


def _stat_line(path: str) -> str:
    try:
        st = os.stat(path)
    except OSError:
        return f"{path}:absent"
    return f"{path}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


def _python_files(folder: str) -> list[str]:
    """Size and modification time of each .py file directly in ``folder`` (one scandir: a few hundred files in
    milliseconds), and of the folder itself (an added or removed file)."""
    lines = [_stat_line(folder)]
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.endswith(".py"):
                    st = entry.stat(follow_symlinks=True)
                    lines.append(f"{entry.name}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}")
    except OSError:
        lines.append("unreadable")
    return sorted(lines)


def _package_origin(name: str) -> str | None:
    """Where ``name``'s __init__.py is, without importing it (or as imported, when it already is)."""
    module = sys.modules.get(name)
    origin = getattr(module, "__file__", None) if module is not None else None
    if origin is None:
        import importlib.util

        try:  # a finder that blocks the package raises ImportError: then the check is skipped, as before
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            return None
        origin = spec.origin if spec is not None else None
    if not origin or not origin.endswith("__init__.py"):
        return None
    return os.path.realpath(origin)


def _model_folders(models: str, model_type: str) -> list[str]:
    """transformers' folders that may hold ``model_type``'s modeling code (gemma3_text lives in gemma3/): the
    folder of that name and those whose name prefixes it at an underscore. The name comes from a config, so it
    is only compared with the folder's entries, never joined into a path."""
    found = []
    try:
        with os.scandir(models) as entries:
            for entry in entries:
                if entry.is_dir() and (model_type == entry.name or model_type.startswith(entry.name + "_")):
                    found.append(entry.path)
    except OSError:
        pass
    return sorted(found)


# model types whose config transformers may build as another model's class (configuration_auto.py: a mistral
# config with layer_types is a ministral model)
ALSO_BUILT_AS = {"mistral": ("ministral",)}


@lru_cache(maxsize=64)
def _environment(model_type: str) -> dict | None:
    """The installed code the verdict depends on (once per process and model type: the code this process runs
    does not change under it). None when transformers or torch cannot be found without importing them."""
    transformers, torch = _package_origin("transformers"), _package_origin("torch")
    if transformers is None or torch is None:
        return None
    package, torch_package = os.path.dirname(transformers), os.path.dirname(torch)
    # the code the check runs besides the model's own: auto classes, conversion and loading, quantizers and
    # integrations; a model type transformers maps to another class (mistral with layer_types is built as ministral)
    folders = [package] + [os.path.join(package, sub) for sub in ("models/auto", "quantizers", "integrations", "utils")]
    for name in (model_type, *ALSO_BUILT_AS.get(model_type, ())):
        folders += _model_folders(os.path.join(package, "models"), name)
    return {
        # an editable (source-tree) transformers changes without an install touching site-packages: memory only
        "installed": os.path.basename(os.path.dirname(package)) in ("site-packages", "dist-packages"),
        "python": [sys.version, sys.prefix, os.path.realpath(sys.executable)],
        "transformers": {folder: _python_files(folder) for folder in folders},
        "torch": [_stat_line(torch), _stat_line(os.path.join(torch_package, "version.py")), _stat_line(torch_package)],
        # the folders they are installed in: an install, upgrade or removal of any package there changes them
        "installed_in": sorted({_stat_line(os.path.dirname(package)), _stat_line(os.path.dirname(torch_package))}),
        "weightlock": _weightlock_code(),
    }


# the modules whose code computes the verdict (the class check, the quantized layers' logical shapes, this one):
# their source is part of the key, so another weightlock (or an edited one) never recalls this one's verdicts
CHECK_MODULES = ("weightlock.engines.transformers", "weightlock.formats.safetensors.quant.layouts", __name__)


def _weightlock_code() -> str:
    """The source of weightlock's class check (CHECK_MODULES), hashed."""
    import importlib

    digest = hashlib.sha256()
    for name in CHECK_MODULES:
        try:
            digest.update(name.encode() + b"\0" + Path(importlib.import_module(name).__file__ or "").read_bytes())
        except (ImportError, OSError):
            digest.update(name.encode() + b"\0absent")
        digest.update(b"\0")
    return digest.hexdigest()


# --- the disk store ----------------------------------------------------------------------------------------------


def _private_folder(folder: Path, create: bool) -> bool:
    """Whether ``folder`` is a real folder of this user's that no one else may write (made 0700 if asked)."""
    if create:
        try:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError:
            return False
    try:
        st = os.lstat(folder)
    except OSError:
        return False
    return (
        stat.S_ISDIR(st.st_mode)
        and (not hasattr(os, "geteuid") or st.st_uid == os.geteuid())
        and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    )


def _read_entry(digest: str) -> tuple[str, str, list[str]] | None:
    """The verdict stored for ``digest``; None for anything but a well-formed entry of ours for this digest."""
    folder = cache_folder()
    if not _private_folder(folder, create=False):
        return None
    try:
        fd = os.open(
            folder / f"{digest}.json",
            os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0),
        )
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if (
            not stat.S_ISREG(st.st_mode)
            or st.st_size > MAX_ENTRY_BYTES
            or (hasattr(os, "geteuid") and st.st_uid != os.geteuid())
            or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        ):
            return None
        data = os.read(fd, MAX_ENTRY_BYTES + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    try:
        entry = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    return _verdict(entry, digest)


def _verdict(entry, digest: str) -> tuple[str, str, list[str]] | None:
    """An entry's verdict if it is exactly what _write_entry writes for ``digest``, else None."""
    if not isinstance(entry, dict) or set(entry) != {"format", "version", "key", "status", "message", "details"}:
        return None
    if entry["format"] != FORMAT or type(entry["version"]) is not int or entry["version"] != VERSION:
        return None
    if entry["key"] != digest:
        return None
    status, message, details = entry["status"], entry["message"], entry["details"]
    if status not in REMEMBERED or not isinstance(message, str) or not 0 < len(message) <= 4000:
        return None
    if (
        not isinstance(details, list)
        or len(details) > 20
        or not all(isinstance(d, str) and len(d) <= 4000 for d in details)
    ):
        return None
    return status, message, details


def _write_entry(digest: str, verdict: tuple[str, str, list[str]]) -> None:
    folder = cache_folder()
    if not _private_folder(folder, create=True):
        return
    status, message, details = verdict
    text = json.dumps(
        {"format": FORMAT, "version": VERSION, "key": digest, "status": status, "message": message, "details": details}
    )
    if len(text.encode("utf-8")) > MAX_ENTRY_BYTES:
        return
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{digest[:16]}.", suffix=".tmp", dir=folder)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, folder / f"{digest}.json")  # atomic: a reader sees the old entry, none, or this one whole
        tmp = None
    except OSError:
        pass
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
