#!/usr/bin/env bash
# Lint, format check and type check, with the versions the test extra pins; zero findings or CI fails.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${WEIGHTLOCK_VENV:-.venv}
"$VENV/bin/ruff" check weightlock scripts tests
"$VENV/bin/ruff" format --check weightlock scripts tests
"$VENV/bin/mypy"
