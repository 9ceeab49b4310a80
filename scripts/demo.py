"""The main job on the embedded default: lock the tiny demo checkpoint, verify it, and
show with stock transformers that the logits moved exactly as the run-time lock moves them.

    python scripts/demo.py
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
OUT = ROOT / "out" / "tiny-llama-locked"


def run(*args: str) -> None:
    print("$ weightlock " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "weightlock", *args], check=True)


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from weightlock import load_lock
    from weightlock.engines.hooks import lock_hooks

    if not (FIXTURES / "tiny-llama" / "model.safetensors").is_file():
        subprocess.run([sys.executable, str(ROOT / "scripts" / "make_fixtures.py")], check=True)
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.parent.mkdir(exist_ok=True)  # apply creates its output, not the folder it goes in
    source, lock_file = FIXTURES / "tiny-llama", FIXTURES / "tiny-llama.wlock"
    run("inspect", str(lock_file))
    run("apply", str(source), "--lock", str(lock_file), "--alpha", "4", "--out", str(OUT))
    run("verify", str(OUT))
    run("inspect", str(OUT))

    ids = torch.tensor([[1, 17, 42, 99, 7, 3, 250, 8]])
    with torch.no_grad():
        original = AutoModelForCausalLM.from_pretrained(source).eval()
        unlocked = original(ids).logits
        with lock_hooks(original, load_lock(lock_file), alpha=4.0):
            hooked = original(ids).logits
        locked = AutoModelForCausalLM.from_pretrained(OUT).eval()(ids).logits
    moved = (locked - unlocked).abs().max().item()
    gap = (locked - hooked).abs().max().item()
    print(f"\nlogits moved by the lock (max |locked - original|):            {moved:.4f}")
    print(f"offline edit vs run-time hooks (max |locked - original+hooks|): {gap:.2e}")
    if not (moved > 1e-2 and gap < 1e-4):
        sys.exit("demo FAILED: the stock-loaded checkpoint does not carry the lock")
    print("demo ok: stock transformers loads the locked checkpoint with the lock active")


if __name__ == "__main__":
    main()
