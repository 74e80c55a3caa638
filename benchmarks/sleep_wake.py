"""Retention benchmark: recall of learned facts after interference, with and without sleep-wake consolidation.

    OMP_NUM_THREADS=1 python benchmarks/sleep_wake.py            # 3 seeds x 2 arms (~6 min on one CPU core)
    python benchmarks/sleep_wake.py --seeds 0 --learn-steps 30 --interfere-steps 30   # smoke run

Same flags as ``neat eval-sleep`` (see :mod:`neat_lightning.eval.sleep_wake`); writes
``benchmarks/results/sleep_wake.json`` and ``benchmarks/results/sleep_wake.png`` (atomically) and prints the table.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from neat_lightning.commands.eval_sleep import main  # noqa: E402

if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--out-json" not in argv:
        argv += ["--out-json", str(REPO / "benchmarks/results/sleep_wake.json")]
    if "--out-png" not in argv:
        argv += ["--out-png", str(REPO / "benchmarks/results/sleep_wake.png")]
    sys.exit(main(argv))
