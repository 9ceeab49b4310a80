"""Import of published SafetyLock ``.safelock`` files.

Those files are ``torch.save`` zip archives of a pickled dict

    "model.layers.{L}.self_attn.head_out" -> [(head, float16 direction[head_dim], std), ...]

Pickles can run arbitrary code, so they are read with an unpickler that resolves
only the few globals numpy needs to rebuild arrays and scalars, each wrapped to
refuse object dtypes. Any other global is refused when the pickle names it, which
is before any call it could make is reached.

The files carry no model shape; the nine published ones are recognised by hash
(``PUBLISHED_LOCKS``), any other needs the model's config.json.
"""

from __future__ import annotations

import io
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from weightlock import __version__
from weightlock.core.lock import Lock, SourceModel, build_lock
from weightlock.errors import LockFormatError, UnsafePickleError
from weightlock.io.untrusted import file_sha256, require_regular

# No published file is near this; refuse anything that would inflate past it.
MAX_PICKLE_BYTES = 64 << 20
NOT_SAFELOCK = "pass a .safelock file as published by SafetyLock; this one was made or changed by something else"
LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.self_attn\.head_out$")
# The SafetyLock README's suggested strength; a lock's default, overridable at apply.
LEGACY_DEFAULT_ALPHA = 6.0

_LLAMA3_8B: dict[str, Any] = dict(
    architecture="LlamaForCausalLM",
    model_type="llama",
    num_hidden_layers=32,
    num_attention_heads=32,
    head_dim=128,
    hidden_size=4096,
)
_LLAMA3_70B: dict[str, Any] = dict(
    architecture="LlamaForCausalLM",
    model_type="llama",
    num_hidden_layers=80,
    num_attention_heads=64,
    head_dim=128,
    hidden_size=8192,
)
_NEMO_12B: dict[str, Any] = dict(
    architecture="MistralForCausalLM",
    model_type="mistral",
    num_hidden_layers=40,
    num_attention_heads=32,
    head_dim=128,
    hidden_size=5120,
)
_LARGE_123B: dict[str, Any] = dict(
    architecture="MistralForCausalLM",
    model_type="mistral",
    num_hidden_layers=88,
    num_attention_heads=96,
    head_dim=128,
    hidden_size=12288,
)

# sha256 of each published file -> the model it was forged from (SafetyLock's
# Meta_safetylock_weight/; the Nemo/Large names are as the layer indices show,
# the project README swaps their download links).
PUBLISHED_LOCKS: dict[str, SourceModel] = {
    "196214cca616cb60df33cf95efee6234e5cd165ae3e1f59819c7811431f43604": SourceModel(
        **_LLAMA3_8B, name="meta-llama/Meta-Llama-3-8B-Instruct"
    ),
    "49d80966f7758f8cb759d1ee31e92cb4d65db9dc10c74ec19f61a98b47e5c43a": SourceModel(
        **_LLAMA3_8B, name="meta-llama/Llama-3.1-8B-Instruct"
    ),
    "1d0f6dbf9399881246bbf45b4639eff1cf57d1c0a66a342cec12837df30bd3f3": SourceModel(
        **_LLAMA3_70B, name="meta-llama/Meta-Llama-3-70B-Instruct"
    ),
    "596cb31ce1fe13244ad2c2c5847cfc4c25273706f08aa3b74873829cc040cba9": SourceModel(
        **_LLAMA3_70B, name="meta-llama/Meta-Llama-3-70B-Instruct"
    ),
    "e6c9a18cad5d18d3607e827182993111e5a87975957285ceb5d14091a31a47f7": SourceModel(
        **_LLAMA3_70B, name="meta-llama/Llama-3.1-70B-Instruct"
    ),
    "00918554e190fb42b84c9010c6225d2cab48034a824942d98c92181c5cb19c96": SourceModel(
        **_LLAMA3_70B, name="meta-llama/Llama-3.1-70B-Instruct"
    ),
    "9146b6b502bbf5cc56967ca676346cd7e43de89807738991d7630dd6c86e8013": SourceModel(
        **_NEMO_12B, name="mistralai/Mistral-Nemo-Instruct-2407"
    ),
    "4b9863c18309c48985fe98542721fec26c0fe495f899dc366acd5e14e4c25af3": SourceModel(
        **_LARGE_123B, name="mistralai/Mistral-Large-Instruct-2407"
    ),
    "9c9b6fd8e9e3862b7fd70f70488c8abec2cb7efcb52c2bd7e71919157963bf76": SourceModel(
        **_LARGE_123B, name="mistralai/Mistral-Large-Instruct-2407"
    ),
}


def _checked_dtype(*args):
    dtype = np.dtype(*args)
    if dtype.hasobject or dtype.fields is not None:
        raise UnsafePickleError(
            f"the pickle asks for numpy dtype {dtype!r}, which can hold objects; refused", hint=NOT_SAFELOCK
        )
    return dtype


def _checked_reconstruct(subtype, shape=(0,), dtype=b"b", *rest):
    if subtype is not np.ndarray:
        raise UnsafePickleError(
            f"the pickle asks to build a {subtype!r}; only numpy arrays are allowed", hint=NOT_SAFELOCK
        )
    # numpy pickles an array as an empty (0,) placeholder whose data arrives in a later BUILD;
    # any other shape here would only serve to make us allocate memory.
    if tuple(shape) != (0,) or rest:
        raise UnsafePickleError(
            f"the pickle asks numpy to allocate an array of shape {shape!r} up front; numpy data never does",
            hint=NOT_SAFELOCK,
        )
    return np.ndarray.__new__(np.ndarray, (0,), dtype)


def _numpy_scalar(dtype, *args):
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise UnsafePickleError("the pickle asks for a numpy scalar of object type; refused", hint=NOT_SAFELOCK)
    # numpy's own reconstructor for scalars; private, so reached through its module.
    from numpy._core.multiarray import scalar

    return scalar(dtype, *args)


def _latin1_encode(text, encoding="utf-8", *rest):
    # Protocol-2 pickles spell bytes as _codecs.encode(str, "latin1"); nothing else is needed.
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1") or rest:
        raise UnsafePickleError(
            "the pickle calls _codecs.encode with arguments numpy data never uses", hint=NOT_SAFELOCK
        )
    return text.encode("latin1")


_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _checked_dtype,
    ("numpy.core.multiarray", "_reconstruct"): _checked_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _checked_reconstruct,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("_codecs", "encode"): _latin1_encode,
}


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Resolves numpy array, scalar and dtype reconstruction; refuses every other global."""

    def find_class(self, module, name):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"the legacy lock's pickle names the global {module}.{name}, which is not numpy data; "
                "refused before anything ran",
                hint="only obtain locks from sources you trust; this file may be malicious",
            ) from None

    def persistent_load(self, pid):
        raise UnsafePickleError(
            "the legacy lock holds torch tensor storages, not numpy data; refused",
            hint="legacy locks hold numpy arrays; this file was not made by SafetyLock",
        )


def read_legacy(path: str | Path) -> list[tuple[int, int, np.ndarray, float]]:
    """The (layer, head, direction, std) entries of a .safelock file, directions as float32."""
    path = Path(path)
    require_regular(path, "legacy lock", LockFormatError)
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as e:
        raise LockFormatError(
            f"{path.name} is not a SafetyLock file (not a torch zip archive: {e})",
            hint="pass a .safelock file as published by SafetyLock",
        ) from None
    with archive:
        pickles = [info for info in archive.infolist() if info.filename.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise LockFormatError(
                f"{path.name}: expected one data.pkl in the archive, found {len(pickles)}", hint=NOT_SAFELOCK
            )
        info = pickles[0]
        if info.file_size > MAX_PICKLE_BYTES:
            raise LockFormatError(
                f"{path.name}: data.pkl declares {info.file_size} bytes, "
                f"over the {MAX_PICKLE_BYTES}-byte limit for a lock",
                hint=NOT_SAFELOCK,
            )
        payload = archive.read(info)
    try:
        data = NumpyOnlyUnpickler(io.BytesIO(payload)).load()
    except UnsafePickleError:
        raise
    except (Exception, MemoryError) as e:  # malformed pickle streams raise many kinds of error
        raise LockFormatError(
            f"{path.name}: the pickle inside is malformed ({type(e).__name__}: {e})", hint=NOT_SAFELOCK
        ) from None
    return _entries(data, path.name)


def _entries(data, where: str) -> list[tuple[int, int, np.ndarray, float]]:
    def bad(what: str) -> LockFormatError:
        return LockFormatError(f"{where} does not have the SafetyLock layout: {what}", hint=NOT_SAFELOCK)

    if not isinstance(data, dict) or not data:
        raise bad("top level is not a non-empty dict")
    entries = []
    for key, items in data.items():
        match = LAYER_KEY.match(key) if isinstance(key, str) else None
        if match is None:
            raise bad(f"unexpected key {key!r}")
        if not isinstance(items, list):
            raise bad(f"{key} does not map to a list")
        for item in items:
            if not (isinstance(item, tuple) and len(item) == 3):
                raise bad(f"{key} has an entry that is not a (head, direction, std) triple")
            head, direction, std = item
            if not isinstance(direction, np.ndarray) or direction.ndim != 1 or direction.dtype.kind != "f":
                raise bad(f"{key}: a direction is not a 1-D float array")
            try:
                head_index, std_value = int(head), float(std)
            except (TypeError, ValueError):
                raise bad(f"{key}: head or std is not a number") from None
            entries.append((int(match.group(1)), head_index, direction.astype(np.float32), std_value))
    return entries


def import_legacy(
    path: str | Path, source_model: SourceModel | None = None, default_alpha: float = LEGACY_DEFAULT_ALPHA
) -> Lock:
    """Convert a .safelock file to a Lock.

    ``source_model`` is needed unless the file is one of the published ones.
    The float16 directions are normalised with their norm folded into the scale, so
    ``scale * direction`` equals the legacy ``std * direction`` up to float32 rounding.
    """
    path = Path(path)
    digest = file_sha256(path, "legacy lock", LockFormatError)
    entries = read_legacy(path)
    known = PUBLISHED_LOCKS.get(digest)
    if source_model is None:
        if known is None:
            raise LockFormatError(
                f"{path.name} is not one of the published SafetyLock files, so its model's shape is unknown",
                hint="pass --model with the source model's config.json or checkpoint folder",
            )
        source_model = known
    layers, heads, directions, stds = zip(*entries, strict=True)
    return build_lock(
        layers,
        heads,
        np.stack(directions),
        stds,
        source_model,
        default_alpha=default_alpha,
        creation={
            "method": "import-legacy",
            "tool": f"weightlock {__version__}",
            "details": {"legacy_file": path.name, "legacy_sha256": digest, "published": known is not None},
        },
    )
