"""Peak resident memory of the calibration capture alone (``walk_blocks`` with a no-op visitor) on gptq_speed's
one-layer Qwen2, at a given capture budget: what ``jq.quantize`` holds before any GPTQ solve.

    python experiments/capture_memory.py                      # hidden 4096, MLP 11008, default 2 GiB budget
    python experiments/capture_memory.py --capture-budget 1   # one sequence per capture call
    python experiments/capture_memory.py --small              # hidden 1024, MLP 2816 (quick)

Prints the resident memory after loading the model, the peak during the capture (sampled every 0.2 s from
``/proc/self/status``), the bytes of the float64 Grams it returns and the capture's wall time. A measurement
script, no results file: the numbers depend on the machine's allocator.
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

import gptq_speed
import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="the one-layer Qwen2 at hidden 1024 (quick)")
    parser.add_argument("--capture-budget", type=int, default=None, help="bytes (default: CAPTURE_BUDGET_BYTES)")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("/tmp/jquant_capture_memory"))
    args = parser.parse_args()

    from jquant.calib import walk_blocks
    from jquant.models import load

    work = args.work / ("small" if args.small else "full")
    work.mkdir(parents=True, exist_ok=True)
    folder = gptq_speed.prepare(args, work)["qwen2-1layer"]
    peak = [0.0]

    def sample() -> None:
        while True:
            peak[0] = max(peak[0], gptq_speed.rss_gb())
            time.sleep(0.2)

    threading.Thread(target=sample, daemon=True).start()
    model = load(folder).model
    calib = np.load(work / "calib.npy")
    loaded = gptq_speed.rss_gb()
    grams: dict[str, int] = {}
    t0 = time.perf_counter()
    walk_blocks(model, calib, lambda visit: grams.update({p: s.hessian.nbytes for p, s in visit.stats.items()}),
                batch_size=8, progress=False, capture_budget=args.capture_budget)
    seconds = time.perf_counter() - t0
    print(f"{folder.name}: RSS after loading {loaded:.2f} GB, peak during the capture {max(peak[0], loaded):.2f} GB, "
          f"float64 Grams {sum(grams.values()) / 1e9:.2f} GB, capture {seconds:.1f} s")


if __name__ == "__main__":
    main()
