#!/usr/bin/env bash
# mlx-lm for the tests that serve locked checkpoints in mlx-lm itself (tests/test_mlx.py): mlx-lm 0.32.2 with
# mlx's Linux CPU build (the `cpu` extra pulls mlx-cpu), into .venv. Checked with pip's dry run: it adds only
# mlx, mlx-cpu, mlx-lm and protobuf to what scripts/setup.sh installs (transformers stays 5.23.0).
# Usage: bash scripts/install_mlx.sh   (into .venv, or $WEIGHTLOCK_VENV; run scripts/setup.sh first)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${WEIGHTLOCK_VENV:-.venv}
VERSION=0.32.2
STAMP="$VENV/.weightlock-mlx-installed"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(sha256sum "$0" | cut -d' ' -f1)" ]; then exit 0; fi
FIND_LINKS=()
[ -d /opt/wheels ] && FIND_LINKS=(--find-links /opt/wheels)
"$VENV/bin/python" -m pip install -q "${FIND_LINKS[@]}" "mlx-lm[cpu]==$VERSION"
"$VENV/bin/python" -c "import mlx.core as mx, mlx_lm; print('mlx-lm', mlx_lm.__version__, 'mlx', mx.__version__)"
sha256sum "$0" | cut -d' ' -f1 > "$STAMP"
