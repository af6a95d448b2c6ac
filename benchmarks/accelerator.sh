#!/usr/bin/env bash
# The benchmarks an accelerator session runs, in one go (docs/scale.md quotes them):
#
#   bash benchmarks/accelerator.sh [OUT_DIR]
#
# 1. benchmarks/throughput.py at the paper's sizes (batch 1000) with the PyTorch
#    peer on the same device, steps dispatched back to back (20 per timing);
# 2. the features step at a global batch of 8192 (the matmuls an accelerator
#    is built for);
# 3. benchmarks/host_overhead.py (the loop against the bare step).
# Each one's output is also written to OUT_DIR (default: the current folder).
# One failing does not stop the others; the exit status is the last failure's.
set -u
out=${1:-.}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
status=0
run() {
  local name=$1; shift
  echo "== $name: $*"
  local t=$SECONDS
  "$@" 2>&1 | grep -v "^\s*\(users\|posts\|likes\|follows\|images\|texts\|shards\|planted\|warning\)" \
    | tee "$out/$name.txt"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - t)) s"
  [ "$rc" -eq 0 ] || status=$rc
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, \
'optax', optax.__version__, jax.devices())"
run throughput python3 benchmarks/throughput.py --peer=torch --steps=20 --round_steps=20
run throughput_8192 python3 benchmarks/throughput.py --modes=features --batch_size=8192 --steps=20
run host_overhead python3 benchmarks/host_overhead.py --rounds=3
exit $status
