#!/usr/bin/env bash
# One device call for every GPU measurement the open issues wait for, each step time-boxed so one slow step cannot
# spend the whole lease. Results go to $OUT (what the device tool brings back; experiments/results/device when run
# by hand); copy them into experiments/results afterwards and rebuild the reports with --report-only.
#
#   experiments/device_tree.sh slim          # the tree that travels must stay under 64 MiB (no bundled models needed)
#   device run: bash experiments/gpu_session.sh          (timeout_s 560)
#   experiments/device_tree.sh restore
#
# Steps: issue 32 item 3 (packed-KV decode attention vs bf16 at 32k tokens), issue 34 item 6's first question
# (does a small Llama learn associative recall in 10k steps; which learning rate), issue 32's matmul sweep last
# (it resumes from its own JSON when cut short).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-experiments/results/device}"
mkdir -p "$out"
step() {  # step SECONDS COMMAND...: run it, say how it ended, go on
    local limit=$1; shift
    local start=$SECONDS
    timeout "$limit" "$@" > "$out/$(basename "$2" .py).log" 2>&1
    echo "step rc=$? after $((SECONDS - start)) s (limit $limit s): $*"
    tail -3 "$out/$(basename "$2" .py).log"
}
python -c "import jax; print(jax.__version__, jax.devices())"
step 120 python experiments/bench_kv_decode.py --out "$out"
step 150 python experiments/recall_probe.py --steps 10000 --eval-every 500 --lr 1e-3 3e-3 --quiet --out "$out"
step 240 python experiments/bench_kernels.py --sweep --out "$out" --resume
ls -la "$out"
