#!/usr/bin/env bash
# The main job: live transcript tagging with the shipped model (no server, no GPU).
#   scripts/demo.sh [DEMO ARGS...]      (see: scripts/demo.sh --help)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$ROOT/scripts/bootstrap.sh" dev
exec "${RWKV_STREAM_VENV:-$ROOT/.venv}/bin/rwkv-stream" demo "$@"
