#!/usr/bin/env bash
# The issue-34 reruns (3 calibration seeds, KL / top-1), one after another, each resumable: every row is saved to
# experiments/reruns/<name>/ as it finishes, and a later run of this script (another session, after a restart)
# continues where the last stopped (--resume). When one finishes, copy its .json/.md/.png into experiments/results
# and run `python experiments/results_index.py`. ostquant-hot is issue 34's item 5: the rotation and smoothing methods on
# the outlier-bearing jq-llama-small-hot (experiments/outlier_recipes.md).
#   setsid experiments/reruns/queue.sh < /dev/null > /dev/null 2>&1 &     # log: experiments/reruns/queue.log
set -u
cd "$(dirname "$0")/../.."
. .venv/bin/activate
log=experiments/reruns/queue.log
run() {  # name, then the script's arguments
    local name=$1; shift
    if [ -f "experiments/reruns/$name.done" ]; then return; fi
    echo "$(date -u +%FT%TZ) start $name: $*" >> "$log"
    if nice -n 10 python -u "$@" --out "experiments/reruns/$name" --resume >> "experiments/reruns/$name.log" 2>&1; then
        date -u +%FT%TZ > "experiments/reruns/$name.done"
        echo "$(date -u +%FT%TZ) done $name" >> "$log"
    else
        echo "$(date -u +%FT%TZ) FAILED $name (exit $?): see experiments/reruns/$name.log" >> "$log"
    fi
}
run ostquant-tiny experiments/ostquant.py --model jq-llama-tiny --steps 100 --batch 4 --calib 64 --windows 80 --items 200
run ostquant-hot experiments/ostquant.py --model jq-llama-small-hot --steps 60 --batch 4 --calib 64 --windows 80 --items 200
run mambaquant experiments/mambaquant.py --model jq-mamba-small --calib 64 --windows 120 --items 200 --snr-windows 16
run rwkvquant experiments/rwkvquant.py --model jq-rwkv6-small --calib 64 --windows 120 --items 200
run moe experiments/moe.py --model jq-moe-small --calib 64 --length 256 --windows 30 --items 100 --error-windows 16 --sensitivity-windows 32 --bits 4,3,2
run vq experiments/vq.py --model jq-llama-small --windows 120 --items 100 --calib 64
run ostquant-small experiments/ostquant.py --model jq-llama-small --steps 60 --batch 4 --calib 64 --windows 80 --items 200
