#!/usr/bin/env bash
# The README's two commands:
#   ./run.sh up     create .venv, install, fetch the demo data, start Dagster (UI on 127.0.0.1:3000)
#   ./run.sh test   create/update .venv, install, run the whole test suite
#   ./run.sh bench [--quick]   the benchmark suite (bench/*.py), results in bench/results/
# Needs only python3 (3.11+) and npm on the machine (java + mvn for the Kafka slice).
set -euo pipefail
cd "$(dirname "$0")"

PY=${PYTHON:-python3}
VENV=.venv

setup() {
  if [ ! -x "$VENV/bin/python" ]; then
    echo "==> creating $VENV"
    "$PY" -m venv "$VENV"
  fi
  # Reinstall only when the declared or pinned dependencies changed.
  local stamp
  stamp=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
  if [ "$(cat "$VENV/.installed" 2>/dev/null)" != "$stamp" ]; then
    echo "==> installing dependencies (first run downloads torch: a few minutes)"
    # PyPI's Linux torch wheel brings CUDA libraries (the only torch on PyPI): .venv needs
    # about 7.5 GB, and pip's cache up to 4 GB more on a first install. Say so up front
    # rather than fail halfway with "No space left on device".
    local free_gb
    free_gb=$(df -Pk . | awk 'NR==2 {printf "%d", $4 / 1048576}')
    if [ "${free_gb:-0}" -lt 12 ]; then
      echo "warning: $free_gb GB free here; installing needs about 8 GB (12 GB with pip's cache)." >&2
    fi
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet -c constraints.txt -e '.[dev]'
    echo "$stamp" > "$VENV/.installed"
  fi
}

cmd=${1:-}
shift || true
case "$cmd" in
  up)
    setup
    "$VENV/bin/stream-sentinel" demo-data fetch
    exec "$VENV/bin/stream-sentinel" up "$@"
    ;;
  test)
    setup
    "$VENV/bin/stream-sentinel" demo-data fetch
    exec "$VENV/bin/python" -m pytest "$@"
    ;;
  bench)
    setup
    "$VENV/bin/python" -m pip install --quiet -c constraints.txt -e '.[dev,bench]'
    "$VENV/bin/stream-sentinel" demo-data fetch >/dev/null
    # each script also runs alone and ends with one JSON line of its figures
    : > bench/results/summary.jsonl
    for script in footprint embedding_backends drop_latency faiss_search model_update drift_report \
                  stream_quality promotion_cost kafka_feedback ingest_memory chaos soak serving serving_search \
                  windows erasure scale_out; do
      echo "==> bench/$script.py $*"
      "$VENV/bin/python" "bench/$script.py" "$@" | tee /dev/stderr | tail -n 1 >> bench/results/summary.jsonl
    done
    echo "==> figures: bench/results/*.json, one line each in bench/results/summary.jsonl"
    ;;
  *)
    echo "usage: ./run.sh up|test|bench [args...]" >&2
    exit 2
    ;;
esac
