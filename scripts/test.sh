#!/usr/bin/env bash
# The whole test suite on a fresh machine: virtualenv + deps, Kafka jars, a real broker, pytest, ruff, mypy.
#   scripts/test.sh [PYTEST ARGS...]
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
bash scripts/bootstrap.sh dev

broker_dir=""
cleanup() { [[ -n "$broker_dir" ]] && bash scripts/kafka/broker.sh stop --dir "$broker_dir" >/dev/null 2>&1 || true; }
trap cleanup EXIT
if command -v java >/dev/null 2>&1; then
    bash scripts/kafka/broker.sh fetch
    broker_dir="$ROOT/.kafka/test-$$"
    RWKV_STREAM_KAFKA_BOOTSTRAP=$(bash scripts/kafka/broker.sh start --dir "$broker_dir" | sed -n 's/^BOOTSTRAP=//p')
    export RWKV_STREAM_KAFKA_BOOTSTRAP RWKV_STREAM_KAFKA_DIR="$broker_dir"
    echo "test: Kafka broker at $RWKV_STREAM_KAFKA_BOOTSTRAP" >&2
else
    echo "test: no java on PATH: the Kafka integration tests will be skipped" >&2
fi

status=0
.venv/bin/python -m pytest "$@" || status=$?
.venv/bin/ruff check . || status=$((status == 0 ? 1 : status))
.venv/bin/mypy || status=$((status == 0 ? 1 : status))  # the whole rwkv_stream package, config in pyproject.toml
exit "$status"
