#!/usr/bin/env bash
# Build the wheel and the sdist, install the wheel (not the source tree) into a fresh virtual environment, and
# run weightlock from it on the demo and on a small GGUF file: package data that the wheel lacks (schemas, default prompts) fails here.
# Run by .ci/run after the tests; needs the dev environment scripts/setup.sh makes (for the build and the demo).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DEV=${WEIGHTLOCK_VENV:-.venv}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
FIND_LINKS=()
[ -d /opt/wheels ] && FIND_LINKS=(--find-links /opt/wheels)

"$DEV/bin/python" -m build -q --outdir "$WORK/dist" . >/dev/null
python3 -m venv "$WORK/venv"
"$WORK/venv/bin/python" -m pip install -q "${FIND_LINKS[@]}" torch==2.13.0
WHEEL=$(ls "$WORK"/dist/weightlock-*.whl)
"$WORK/venv/bin/python" -m pip install -q "${FIND_LINKS[@]}" "$WHEEL[plot,gguf]"
[ -f fixtures/tiny-llama/model.safetensors ] || "$DEV/bin/python" scripts/make_fixtures.py

cd "$WORK"  # away from the source tree: only the installed package can be imported
WL="$WORK/venv/bin/weightlock"
"$WL" --version
"$WL" apply "$ROOT/fixtures/tiny-llama" --lock "$ROOT/fixtures/tiny-llama.wlock" --alpha 4 --out "$WORK/locked"
"$WL" verify "$WORK/locked"
"$WL" inspect "$ROOT/fixtures/tiny-llama.wlock" --heatmap "$WORK/map.svg" >/dev/null
cp -r "$ROOT/fixtures/tiny-llama" "$WORK/in-place"
BEFORE=$(cd "$WORK/in-place" && find . -type f -exec sha256sum {} + | sort)
"$WL" apply "$WORK/in-place" --lock "$ROOT/fixtures/tiny-llama.wlock" --in-place >/dev/null
"$WL" revert "$WORK/in-place" >/dev/null
[ "$BEFORE" = "$(cd "$WORK/in-place" && find . -type f -exec sha256sum {} + | sort)" ]
# GGUF from the wheel: a small file written by the gguf package, locked, verified, inspected
"$WORK/venv/bin/python" - "$WORK" <<'PY'
import sys, numpy as np, gguf
from weightlock import build_lock, save_lock
from weightlock.core.lock import SourceModel
work = sys.argv[1]
writer = gguf.GGUFWriter(f"{work}/tiny.gguf", "llama")
writer.add_block_count(2); writer.add_head_count(4); writer.add_embedding_length(32)
for layer in range(2):
    writer.add_tensor(f"blk.{layer}.attn_output.weight", gguf.quants.quantize(np.eye(32, dtype=np.float32), gguf.GGMLQuantizationType.Q8_0), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
writer.write_header_to_file(); writer.write_kv_data_to_file(); writer.write_tensors_to_file(); writer.close()
lock = build_lock([0, 1], [1, 2], np.ones((2, 8)), [1.0, 2.0], SourceModel("LlamaForCausalLM", "llama", 2, 4, 8, 32), default_alpha=2.0)
save_lock(lock, f"{work}/tiny-gguf.wlock")
PY
"$WL" apply "$WORK/tiny.gguf" --lock "$WORK/tiny-gguf.wlock" --out "$WORK/tiny-locked.gguf" >/dev/null
"$WL" verify "$WORK/tiny-locked.gguf" --engines llama.cpp,ollama >/dev/null
"$WL" inspect "$WORK/tiny-locked.gguf" | grep -q "locked: recorded"
"$WORK/venv/bin/python" - <<'PY'
from weightlock.lab.prompt_sets import load_prompt_set
from weightlock.io.schema import load_schema
import weightlock, pathlib
assert "site-packages" in weightlock.__file__, weightlock.__file__
sets = {k: len(load_prompt_set(k).items) for k in ("harmful", "benign", "kl", "qa")}
schemas = sorted(p.name for p in pathlib.Path(weightlock.__file__).parent.parent.joinpath("weightlock", "schemas").glob("*.json"))
for name in ("lock", "report", "provenance", "eval", "config", "index", "in-place", "tokenizer-config", "gguf-edit"):
    load_schema(name)
print("wheel OK: default prompts", sets, "schemas", len(schemas))
PY
tar -tzf "$WORK"/dist/weightlock-*.tar.gz > "$WORK/sdist.txt"
grep -q "schemas/gguf-edit.schema.json" "$WORK/sdist.txt" && grep -q "weightlock/formats/gguf/edit.py" "$WORK/sdist.txt" && grep -q "default_prompts/harmful.txt" "$WORK/sdist.txt" && grep -q "default_prompts/forge_benign.txt" "$WORK/sdist.txt"
echo "sdist OK"
