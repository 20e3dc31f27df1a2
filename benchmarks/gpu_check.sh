#!/usr/bin/env bash
# Every check of this project that needs a CUDA GPU, in one go, on a machine with no network.
#
# Here, once, where pip reaches PyPI: fetch the few pure-Python wheels a bare GPU image (torch,
# transformers, pandas, jinja2, pyyaml, tqdm, pytest already there) lacks, into .whl/ (ignored):
#     bash benchmarks/gpu_check.sh --fetch
# There (the device tool): run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=570)
#
# It runs tests/test_gpu.py (placement and dtype, batched vs one-at-a-time greedy outputs, peak
# memory in a comparison, a real CUDA out-of-memory split), then benchmarks/batching.py and
# benchmarks/preloading.py on random-weight 0.36B Qwen2-0.5B-shaped models (batching at 16 and 24 new
# tokens, 100 ms and 5 ms waits). Logs go to $OUT (the
# device tool's folder that comes back) or artifacts/gpu/. About 6-8 minutes on an H200.
# Name steps to run only those: bash benchmarks/gpu_check.sh isolation (tests/test_process.py, CUDA in
# the child and a real CUDA fatal error there; then benchmarks/isolation.py on the GPU).
# GPU_CHECK_DEVICE=cpu runs the same steps small on a CPU, to check the script itself.
set -uo pipefail
cd "$(dirname "$0")/.."

WHEELS=(opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2 opentelemetry-semantic-conventions==0.66b2 tenacity==9.2.1
        msgpack==1.1.1)
PY="${GPU_CHECK_PYTHON:-python3}"

if [ "${1:-}" = "--fetch" ]; then
  exec "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 -d .whl "${WHEELS[@]}"
fi

out="${OUT:-artifacts/gpu}"
mkdir -p "$out"
if ! ls .whl/*.whl >/dev/null 2>&1; then
  echo "gpu_check: no wheels in .whl/: run 'bash benchmarks/gpu_check.sh --fetch' where pip works, and carry .whl" >&2
  exit 2
fi
site=$(mktemp -d)
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl || exit 2
export PYTHONPATH="$PWD:$site" PYTHONUNBUFFERED=1
export AUTOGLM_CACHE_DIR="${AUTOGLM_CACHE_DIR:-$(mktemp -d)}"

device="${GPU_CHECK_DEVICE:-cuda}"
if [ "$device" = "cuda" ]; then
  size=(--random large) preload=(--large) repeats=3 chains=64
else
  size=(--random small) preload=() repeats=1 chains=8
fi

status=0
wanted=("$@")
step() {  # step NAME SECONDS COMMAND...: run one check with a time limit, its output also in $out/NAME.log
  local name=$1 limit=$2
  shift 2
  if [ ${#wanted[@]} -gt 0 ] && [[ " ${wanted[*]} " != *" ${name%%[-_]*} "* ]]; then return; fi
  echo "== $name: $*"
  timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc"
  [ "$rc" = 0 ] || status=1
}

{
  nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
  "$PY" -c "import sys, torch, transformers; print(sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())"
} 2>&1 | tee "$out/environment.log"

# The project's ini turns warnings into errors; another transformers version may warn, which is no failure here.
step gpu_tests 180 "$PY" -m pytest -o addopts="" -W default -p no:cacheprovider -q -rs tests/test_gpu.py
# The async core's workload (64 concurrent two-hop chains, dynamic batching against the hand-batched
# ceiling) at both waits and both answer lengths; then the preloader on real load times.
for tokens in 16 24; do
  for wait in 100 5; do
    step "batching-${tokens}tok-${wait}ms" 150 "$PY" benchmarks/batching.py --device "$device" "${size[@]}" \
      --repeats "$repeats" --chains "$chains" --policies none,dynamic --max-new-tokens "$tokens" --max-wait-ms "$wait"
  done
done
step preloading 150 "$PY" benchmarks/preloading.py --device "$device" "${preload[@]}" --repeats 1
if [ ${#wanted[@]} -gt 0 ]; then
  step isolation_tests 240 "$PY" -m pytest -o addopts="" -W default -p no:cacheprovider -q -rs tests/test_process.py
  step isolation_hops 200 "$PY" benchmarks/isolation.py --device "$device" --pairs 40
fi
exit "$status"
