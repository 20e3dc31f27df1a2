#!/usr/bin/env bash
# The async core's figures (issue 12's workload), in one go on the tiny model: 64 concurrent two-hop
# chains under dynamic batching against the hand-batched ceiling at 16 and 24 new tokens a hop,
# max_wait_ms 100 and 5; then one three-hop chain against three hand generate calls, tracing on.
#     bash benchmarks/async_core.sh            # about 3 minutes on a 2-core CPU
#     REPEATS=1 PAIRS=10 PYTHON=.venv/bin/python bash benchmarks/async_core.sh   # a quick check (~40 s)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
for tokens in 16 24; do
  for wait in 100 5; do
    echo "== ${tokens} new tokens a hop, max_wait_ms ${wait}"
    "$PY" benchmarks/batching.py --policies dynamic --repeats "${REPEATS:-9}" --max-new-tokens "$tokens" \
      --max-wait-ms "$wait" | tail -n 1
  done
done
echo "== one three-hop chain"
"$PY" benchmarks/overhead.py --threads 1 --pairs "${PAIRS:-100}" | tail -n 3  # headline, then orchestration alone
# (--threads 1: one torch thread on both sides; with two, generate by hand on the main thread ran the tiny model slower)
