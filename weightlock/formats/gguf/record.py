"""What a locked GGUF file records about its edit, in its metadata: the record (``weightlock.edit``, JSON,
schema-checked when read back), the lock's exact bytes (``weightlock.core.lock``) and those of every earlier edit of a
relocked file (``weightlock.parent_lock.K``). Read here, bounded; written by :mod:`.edit`; checked by :mod:`.verify`."""

from __future__ import annotations

from weightlock.errors import CheckpointError, LockFormatError
from weightlock.formats.gguf.file import STRING, ArrayValue, GGUFModel
from weightlock.io.untrusted import check_schema, parse_json

RECORD_KEY = "weightlock.edit"


LOCK_KEY = "weightlock.lock"


RECORD_FORMAT = "weightlock-gguf-edit"


# the lock bytes of each earlier edit of a relocked file (1: the parent's), so every edit in the record's chain
# can be recomputed: verify checks each against the record's parent chain
PARENT_LOCK_KEY = "weightlock.parent_lock.{}"


OUR_KEYS = (RECORD_KEY, LOCK_KEY)


OUR_PREFIX = "weightlock."  # every key above starts with it


def is_our_key(key: str) -> bool:
    """A metadata key under weightlock's prefix (a relock drops them all and writes exactly those its record chain
    implies; verify fails any other)."""
    return key.startswith(OUR_PREFIX)


MAX_RECORD_BYTES = 64 << 20


MAX_LOCK_BYTES = 1 << 30


def read_record(model: GGUFModel) -> dict | None:
    """The edit record of a locked file (None: not locked by weightlock), schema-checked."""
    entry = model.metadata.get(RECORD_KEY)
    if entry is None:
        return None
    if entry.value_type != STRING or not isinstance(entry.value, str) or len(entry.value) > MAX_RECORD_BYTES:
        raise CheckpointError(
            f"{model.path.name}: the metadata key {RECORD_KEY} is not a weightlock record",
            hint="the file was edited by something else; lock the original model again",
        )
    record = parse_json(entry.value, f"{model.path.name}: {RECORD_KEY}")
    check_schema(record, "gguf-edit", f"{model.path.name}: {RECORD_KEY}")
    return record


def embedded_bytes(model: GGUFModel, key: str) -> bytes:
    """The bytes of a metadata array of uint8 (a lock weightlock embedded), read from the file."""
    entry = model.metadata.get(key)
    if entry is None or not isinstance(entry.value, ArrayValue) or entry.value.item_type != 0:
        raise LockFormatError(
            f"{model.path.name}: {key} is not an array of bytes",
            hint="the file was edited by something else; lock the original model again",
        )
    # the array's bytes: after key, type (u32), item type (u32) and count (u64)
    start, end = entry.start + 8 + len(key.encode()) + 4 + 4 + 8, entry.end
    if end - start > MAX_LOCK_BYTES:
        raise LockFormatError(
            f"{model.path.name}: {key} is larger than any lock",
            hint="the file was edited by something else; lock the original model again",
        )
    with open(model.files[0].path, "rb") as handle:
        handle.seek(start)
        return handle.read(end - start)
