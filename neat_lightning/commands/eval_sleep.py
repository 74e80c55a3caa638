"""``neat eval-sleep``: retention after interference with and without sleep-wake consolidation.

    neat eval-sleep                                   # 3 seeds x 2 arms, prints a table
    neat eval-sleep --seeds 0 --learn-steps 40 --interfere-steps 40 --out-json /tmp/r.json --out-png /tmp/r.png

Learn a table of facts, train on a second table (interference), and measure recall of the first, with and without
:class:`~neat_lightning.callbacks.SleepWakeConsolidation` (see :mod:`neat_lightning.eval.sleep_wake`). Writes the
runs and the summary as JSON and a PNG of recall over time with the sleep phases shaded.
"""

from __future__ import annotations

import argparse
import logging
import warnings
from dataclasses import fields

from neat_lightning.eval.sleep_wake import (
    RetentionConfig,
    evaluate_retention,
    format_table,
    plot_retention,
    write_json,
)


def as_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not a boolean (true/false)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="neat eval-sleep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out-json", default="runs/eval_sleep/sleep_wake.json")
    p.add_argument("--out-png", default="runs/eval_sleep/sleep_wake.png")
    for f in fields(RetentionConfig):
        p.add_argument(f"--{f.name.replace('_', '-')}", type=as_bool if isinstance(f.default, bool) else type(f.default), default=f.default, dest=f.name,
                       help=f"RetentionConfig.{f.name} (default {f.default})")
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    import torch

    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    cfg = RetentionConfig(**{f.name: getattr(args, f.name) for f in fields(RetentionConfig)})
    result = evaluate_retention(cfg, args.seeds)
    print(format_table(result))
    print(f"wrote {write_json(result, args.out_json)} and {plot_retention(result, args.out_png)}")
    return 0
