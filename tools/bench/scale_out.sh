#!/usr/bin/env bash
# Jobs per second through the queue with the bundled model, on one and on two `easel worker`
# processes beside an API node with no workers of its own (`easel serve --workers 0`).
# Usage: tools/bench/scale_out.sh [QUEUE_URL] [REQUESTS]
#   QUEUE_URL: redis://127.0.0.1:6379/12 (default) or sqlite://PATH
# Needs a release build: cargo build --release -p easel-cli
set -euo pipefail
EASEL=${EASEL:-target/release/easel}
QUEUE=${1:-redis://127.0.0.1:6379/12}
REQUESTS=${2:-40}
DATA=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$DATA"' EXIT
if [[ $QUEUE == redis://* ]]; then redis-cli -u "$QUEUE" FLUSHDB >/dev/null; fi
"$EASEL" serve --listen 127.0.0.1:8931 --workers 0 --queue "$QUEUE" --data-dir "$DATA" --max-batch 1 >/dev/null &
sleep 2
for workers in 1 2; do
  pids=()
  for i in $(seq "$workers"); do
    "$EASEL" worker --queue "$QUEUE" --data-dir "$DATA" --max-batch 1 >/dev/null &
    pids+=($!)
  done
  sleep 3
  echo -n "{\"worker_processes\": $workers, \"queue\": \"${QUEUE%%://*}\", \"result\": "
  # A different prompt per run, so no run is served from the previous one's result cache.
  "$EASEL" bench http --url http://127.0.0.1:8931 --mode unique --concurrency 8 --requests "$REQUESTS" \
    --body "{\"prompt\": \"a red circle on a blue background, run $workers\"}" | tail -1
  echo "}"
  kill "${pids[@]}"; wait "${pids[@]}" 2>/dev/null || true
done
