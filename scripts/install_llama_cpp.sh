#!/usr/bin/env bash
# llama.cpp for the GGUF tests and `eval --engine llama-cpp`: llama-cpp-python 0.3.36 (PyPI has it as an sdist
# only; pip compiles its vendored llama.cpp, about 4 minutes on 2 cores, and caches the wheel it built), plus
# llama.cpp's own HF -> GGUF converter (convert_hf_to_gguf.py with its conversion/ and gguf-py/ packages) taken
# from the same sdist into $VENV/share/llama.cpp, so tests convert models with the converter users run.
# sentencepiece: the converter imports it for every Llama-family model.
# Usage: bash scripts/install_llama_cpp.sh   (into .venv, or $WEIGHTLOCK_VENV; run scripts/setup.sh first)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${WEIGHTLOCK_VENV:-.venv}
VERSION=0.3.36
STAMP="$VENV/.weightlock-llama-cpp-installed"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(sha256sum "$0" | cut -d' ' -f1)" ]; then exit 0; fi
FIND_LINKS=()
[ -d /opt/wheels ] && FIND_LINKS=(--find-links /opt/wheels)
PY="$VENV/bin/python"
# LLAVA_BUILD=OFF: the multimodal library is not used here; leaving it out saves a minute of the build (4 min 11 s
# instead of 5 min 12 s on 2 cores, measured).
CMAKE_ARGS="-DLLAVA_BUILD=OFF" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
    "$PY" -m pip install -q "${FIND_LINKS[@]}" "llama-cpp-python==$VERSION" sentencepiece
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
"$PY" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$WORK"
tar -xzf "$WORK/llama_cpp_python-$VERSION.tar.gz" -C "$WORK" \
    "llama_cpp_python-$VERSION/vendor/llama.cpp/convert_hf_to_gguf.py" \
    "llama_cpp_python-$VERSION/vendor/llama.cpp/conversion" \
    "llama_cpp_python-$VERSION/vendor/llama.cpp/gguf-py"
SHARE="$VENV/share/llama.cpp"
rm -rf "$SHARE"
mkdir -p "$(dirname "$SHARE")"
mv "$WORK/llama_cpp_python-$VERSION/vendor/llama.cpp" "$SHARE"
"$PY" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__)"
sha256sum "$0" | cut -d' ' -f1 > "$STAMP"
