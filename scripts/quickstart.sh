#!/usr/bin/env bash
# Fresh machine to a locked, verified demo checkpoint: set up, then run scripts/demo.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
"${WEIGHTLOCK_VENV:-.venv}/bin/python" scripts/demo.py
