#!/usr/bin/env bash
# Create or update the project virtualenv (.venv) and install rwkv-stream into it, editable.
#   scripts/bootstrap.sh [EXTRAS]     EXTRAS: comma list of setup.cfg extras (default: dev = everything)
# Safe to run any number of times: pip runs only when setup.cfg, constraints.txt or the extras changed.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
EXTRAS=${1:-dev}
VENV=${RWKV_STREAM_VENV:-$ROOT/.venv}
PYTHON=${PYTHON:-python3}

if [[ ! -x "$VENV/bin/python" ]]; then
    echo "bootstrap: creating $VENV with $($PYTHON --version)" >&2
    "$PYTHON" -m venv "$VENV"
fi
stamp=$(cat "$ROOT/setup.cfg" "$ROOT/constraints.txt" | sha256sum | cut -d' ' -f1)-$EXTRAS
stamp_file="$VENV/.rwkv-stream-installed"
if [[ -f "$stamp_file" ]] && grep -qxF -- "$stamp" "$stamp_file"; then
    exit 0
fi
echo "bootstrap: installing rwkv-stream[$EXTRAS] into $VENV (the first time downloads torch, ~3 GB)" >&2
"$VENV/bin/python" -m pip install --quiet --upgrade pip setuptools wheel
"$VENV/bin/python" -m pip install --quiet --progress-bar off -c "$ROOT/constraints.txt" -e "$ROOT[$EXTRAS]"
echo "$stamp" >> "$stamp_file"
