"""Batches that shrink to fit: forge's forward passes split on running out of memory, never crash on it.

A batch size is a guess about memory; the device's allocator is the judge. ``in_batches`` runs work batch
by batch and, when a batch runs out of memory (torch's ``OutOfMemoryError`` on a GPU, the CPU allocator's
refusal, Python's ``MemoryError``), halves the batch and runs it again, saying so once through ``notify``.
A single item that does not fit is the user's to resolve: an ``InvalidInputError`` with a hint.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from weightlock.errors import InvalidInputError

OUT_OF_MEMORY = (RuntimeError, MemoryError)  # what to catch; ``is_out_of_memory`` decides


def is_out_of_memory(error: BaseException) -> bool:
    """torch.OutOfMemoryError (a RuntimeError), the CPU allocator's refusal, or Python's MemoryError."""
    if isinstance(error, MemoryError):
        return True
    torch = sys.modules.get("torch")  # an error raised by torch means torch is loaded: never import it here
    if torch is not None and isinstance(error, getattr(torch, "OutOfMemoryError", ())):
        return True
    text = str(error)
    return "out of memory" in text or "can't allocate memory" in text


def release_cached_memory() -> None:
    """Hand freed GPU blocks back before a smaller retry (a no-op without CUDA)."""
    import gc

    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextmanager
def out_of_memory_refused(message: str, hint: str, *, quote_error: bool = False) -> Iterator[None]:
    """Within the block, running out of memory is the user's to resolve: an ``InvalidInputError`` with
    ``message`` (followed by the allocator's own words with ``quote_error``) and ``hint`` (exit 3), never a
    traceback. Other errors pass through."""
    try:
        yield
    except OUT_OF_MEMORY as e:
        if not is_out_of_memory(e):
            raise
        release_cached_memory()
        raise InvalidInputError(f"{message}: {str(e)[:300]}" if quote_error else message, hint=hint) from None


def in_batches(
    items: Sequence,
    size: int,
    run: Callable[[int, Sequence], None],
    *,
    what: str,
    hint: str,
    notify: Callable[[str], None] | None = None,
    split: str = "{what}: a batch of {tried} ran out of memory, running {size} at a time",
    single: str = "{what}: a single item ran out of memory",
) -> int:
    """``run(start, batch)`` over ``items`` in batches of ``size``, halving it when a batch runs out of memory.
    ``run`` must leave no trace of a batch that fails (keep results only once the batch is done). ``split``
    (said through ``notify``) and ``single`` (the refusal) are formatted with ``what``, ``tried`` and ``size``.
    Returns the batch size that ran last."""
    start = 0
    while start < len(items):
        batch = items[start : start + size]
        try:
            run(start, batch)
        except OUT_OF_MEMORY as e:
            if not is_out_of_memory(e):
                raise
            release_cached_memory()
            if len(batch) == 1:
                raise InvalidInputError(single.format(what=what, tried=1, size=1), hint=hint) from None
            size = max(1, len(batch) // 2)
            if notify is not None:
                notify(split.format(what=what, tried=len(batch), size=size))
            continue
        start += len(batch)
    return size
