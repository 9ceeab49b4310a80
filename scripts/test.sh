#!/usr/bin/env bash
# Set up if needed, then run the whole test suite (CPU only).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${WEIGHTLOCK_VENV:-.venv}/bin/python" -m pytest -q "$@"
