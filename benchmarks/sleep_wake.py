"""Sleep-wake benchmark: no sleep vs plain replay vs sleep at equal budgets, on every protocol, 5 seeds.

    python benchmarks/sleep_wake.py                        # ab, tables4, bytes x 5 seeds x 3 arms, 2 workers
    python benchmarks/sleep_wake.py --protocols ab --seeds 0 --table-steps 30   # smoke run

Same flags as ``neat eval-sleep`` (see :mod:`neat_lightning.eval.sleep_wake`); writes
``benchmarks/results/sleep_wake.json`` and ``benchmarks/results/sleep_wake.png`` (atomically) and prints the tables.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from neat_lightning.commands.eval_sleep import main  # noqa: E402

if __name__ == "__main__":
    argv = sys.argv[1:]
    defaults = {"--protocols": ["ab", "tables4", "bytes"], "--seeds": ["0", "1", "2", "3", "4"],
                "--out-json": [str(REPO / "benchmarks/results/sleep_wake.json")],
                "--out-png": [str(REPO / "benchmarks/results/sleep_wake.png")]}
    for flag, value in defaults.items():
        if flag not in argv:
            argv += [flag, *value]
    sys.exit(main(argv))
