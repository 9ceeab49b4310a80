"""A checkpoint folder as loaders see it, read from headers alone.

Resolves a local folder or a Hub repo id (from the local cache only), reads
config.json, the safetensors index or the single ``model.safetensors``, and every
shard's header. No tensor data is read here; callers map the tensors they need.
"""

from __future__ import annotations

import fnmatch
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from weightlock.errors import CheckpointError
from weightlock.io.safetensors_file import SafetensorsHeader, TensorEntry, read_header
from weightlock.io.untrusted import is_plain_name, read_json

CONFIG_NAME = "config.json"
TOKENIZER_CONFIG_NAME = "tokenizer_config.json"
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PROVENANCE_DIR = "weightlock"
PROVENANCE_NAME = "provenance.json"

# Files that hold model weights in a format loaders may prefer over, or fall back to
# from, the safetensors set we edit (vLLM prefers Mistral-format consolidated files
# and params.json). Carrying them would carry an unlocked model; they are left out.
ALTERNATIVE_WEIGHT_PATTERNS = (
    "*.safetensors",
    "consolidated*",
    "params.json",
    "pytorch_model*.bin",
    "*.pt",
    "*.pth",
    "*.ckpt",
    "*.gguf",
    "tf_model*.h5",
    "flax_model*.msgpack",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
    "*.wlt",
)
MAX_SHARDS = 100_000
MAX_FOLDER_ENTRIES = 1_000_000
# Folders never carried: version control and download caches.
SKIPPED_DIRS = (".git", ".cache")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_alternative_weight_file(relative: str) -> bool:
    name = relative.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatch(name, pattern) for pattern in ALTERNATIVE_WEIGHT_PATTERNS)


def allowed_roots(root: Path) -> list[Path]:
    """Where files of a checkpoint folder may really live: the folder itself, and for a Hub cache
    snapshot (…/models--org--name/snapshots/<commit>) the repo's blob store its symlinks point into."""
    roots = [Path(os.path.realpath(root))]
    if root.parent.name == "snapshots" and (root.parent.parent / "blobs").is_dir():
        roots.append(Path(os.path.realpath(root.parent.parent / "blobs")))
    return roots


def contained(root: Path, relative: str) -> Path:
    """``root / relative``, refused if a symlink takes it outside the folder (or the Hub blob store)."""
    path = root / relative
    real = Path(os.path.realpath(path))
    if not any(real == r or r in real.parents for r in allowed_roots(root)):
        raise CheckpointError(
            f"{relative} in {root} is a symlink to {real}, outside the checkpoint",
            hint="a checkpoint must not reach outside its folder; copy the file in if it is meant to be there",
        )
    return path


@dataclass
class Checkpoint:
    root: Path
    config: dict
    # "single": one model.safetensors (with an index naming it alone, as mlx-lm writes, or none); "sharded": an
    # index naming the shards.
    layout: str
    index: dict | None
    headers: dict[str, SafetensorsHeader]  # shard file name -> header
    tensors: dict[str, TensorEntry]  # tensor name -> where it is
    name: str | None = None  # Hub repo id, when opened by id
    revision: str | None = None  # Hub commit, when known
    provenance: dict | None = None  # weightlock/provenance.json, if locked
    warnings: list[str] = field(default_factory=list)

    @property
    def weight_files(self) -> list[str]:
        return sorted(self.headers)

    def extra_files(self) -> list[str]:
        """Every file that is not part of the weights, relative to the root, sorted. Bounded: a folder of
        more than MAX_FOLDER_ENTRIES entries is refused rather than walked for ever."""
        found, seen = [], 0
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = sorted(
                d
                for d in dirnames
                if d not in SKIPPED_DIRS and not (Path(dirpath) == self.root and d == PROVENANCE_DIR)
            )
            seen += len(dirnames) + len(filenames)
            if seen > MAX_FOLDER_ENTRIES:
                raise CheckpointError(
                    f"{self.root} holds more than {MAX_FOLDER_ENTRIES:,} files and folders",
                    hint="a checkpoint folder holds weights, configs and a tokenizer; move the rest out",
                )
            for filename in filenames:
                relative = (Path(dirpath) / filename).relative_to(self.root).as_posix()
                if relative in self.headers or relative in (CONFIG_NAME, INDEX_NAME):
                    continue
                found.append(relative)
        return sorted(found)


def resolve_location(location: str | os.PathLike, revision: str | None = None) -> tuple[Path, str | None, str | None]:
    """A folder for a local path or a Hub repo id; (folder, repo id, commit)."""
    path = Path(location)
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(
                f"{path} is a file; weightlock works on checkpoint folders",
                hint="pass the folder that holds config.json and the safetensors files",
            )
        return path.resolve(), None, None
    text = str(location)
    if not _REPO_ID.match(text):
        raise CheckpointError(
            f"{text} is neither an existing folder nor a Hub repo id",
            hint="check the path, or pass an id like org/model that is in your Hub cache",
        )
    # Imported here so local paths never pay for it.
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = snapshot_download(text, revision=revision, local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError, OSError) as e:
        raise CheckpointError(
            f"{text} (revision {revision or 'main'}) is not in the local Hub cache",
            hint=f"download it first (`hf download {text}`) or pass a local folder; "
            f"weightlock never downloads weights itself ({type(e).__name__})",
        ) from None
    snapshot = Path(folder)
    return snapshot.resolve(), text, snapshot.name


def _load_json(path: Path, what: str, schema: str | None):
    if not os.path.lexists(path):
        raise CheckpointError(f"{path.parent} has no {path.name}", hint=f"a checkpoint folder needs its {what}")
    return read_json(path, what, schema)


def _plain_name(name: str, root: Path) -> str:
    """An index's shard name must name a file directly inside the folder."""
    if not is_plain_name(name):
        raise CheckpointError(
            f"the index names shard {name!r}, which is not a file name inside {root}",
            hint="the index is damaged or hostile; restore it from the original",
        )
    return name


def open_checkpoint(location: str | os.PathLike, revision: str | None = None) -> Checkpoint:
    """Open a checkpoint folder (or a cached Hub repo) and parse all its headers."""
    root, repo_id, commit = resolve_location(location, revision)
    if (root / CONFIG_NAME).exists():
        contained(root, CONFIG_NAME)
    config = _load_json(root / CONFIG_NAME, "config", "config")
    has_index, has_single = (root / INDEX_NAME).is_file(), (root / SINGLE_NAME).is_file()
    index: dict | None = None
    if has_index and has_single:
        # mlx-lm's save_model writes an index beside a single model.safetensors: one naming that file alone
        # (checked below to name exactly its tensors) leaves every loader reading the same weights
        index = _load_json(root / INDEX_NAME, "index", "index")
    if index is not None and set(index["weight_map"].values()) != {SINGLE_NAME}:
        raise CheckpointError(
            f"{root} has both {SINGLE_NAME} and {INDEX_NAME}; transformers would load the single file and "
            "vLLM the index, so which weights are meant is ambiguous",
            hint="remove the one that is not current",
        )
    if has_single:
        shard_names = [SINGLE_NAME]
    elif has_index:
        index = _load_json(root / INDEX_NAME, "index", "index")
        shard_names = sorted({_plain_name(f, root) for f in index["weight_map"].values()})
        if len(shard_names) > MAX_SHARDS:
            raise CheckpointError(
                f"the index names {len(shard_names):,} shards, more than the {MAX_SHARDS:,} weightlock opens",
                hint="the index is damaged or hostile; restore it",
            )
    else:
        others = sorted(p.name for p in root.iterdir() if is_alternative_weight_file(p.name))
        raise CheckpointError(
            f"{root} has no {SINGLE_NAME} or {INDEX_NAME}" + (f" (found {', '.join(others[:4])})" if others else ""),
            hint="weightlock edits safetensors checkpoints; convert other formats with transformers first",
        )

    headers: dict[str, SafetensorsHeader] = {}
    for name in ([INDEX_NAME] if has_index else []) + shard_names:  # config.json was checked above
        if (root / name).exists():
            contained(root, name)
    for shard in shard_names:
        if not (root / shard).is_file():
            raise CheckpointError(
                f"shard {shard} named by the index is missing from {root}",
                hint="the download is incomplete; fetch the missing file",
            )
        headers[shard] = read_header(root / shard)

    tensors: dict[str, TensorEntry] = {}
    for shard, header in headers.items():
        for name, entry in header.tensors.items():
            if name in tensors:
                raise CheckpointError(
                    f"tensor {name} stands in both {tensors[name].path.name} and {shard}",
                    hint="a loader would keep whichever it reads last; repair the checkpoint",
                )
            tensors[name] = entry
    if index is not None:
        for name, shard in index["weight_map"].items():
            if name not in tensors or tensors[name].path.name != shard:
                raise CheckpointError(
                    f"the index places {name} in {shard}, but it is not there",
                    hint="the index and the shards disagree; restore them from the original",
                )
        unindexed = sorted(set(tensors) - set(index["weight_map"]))
        if unindexed:
            raise CheckpointError(
                f"{len(unindexed)} tensors in the shards are not in the index (first: {unindexed[0]})",
                hint="the index and the shards disagree; restore them from the original",
            )

    provenance_path = root / PROVENANCE_DIR / PROVENANCE_NAME
    provenance = None
    if os.path.lexists(provenance_path):
        contained(root, f"{PROVENANCE_DIR}/{PROVENANCE_NAME}")
        provenance = read_json(
            provenance_path,
            "record",
            "provenance",
            hint=f"the weightlock/ record was damaged or crafted; remove {PROVENANCE_DIR}/ only "
            "if you know the checkpoint's weights are what you expect",
        )
    layout = "single" if has_single else "sharded"
    return Checkpoint(root, config, layout, index, headers, tensors, repo_id, commit, provenance)
