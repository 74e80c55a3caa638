"""``neat eval-sleep``: retention after interference with no sleep, plain replay and sleep at equal budgets.

    neat eval-sleep                                        # A -> B, 3 seeds x 3 arms, 2 worker processes
    neat eval-sleep --protocols ab tables4 bytes --seeds 0 1 2 3 4
    neat eval-sleep --seeds 0 --table-steps 40 --wake-steps 10 --out-json /tmp/r.json --out-png /tmp/r.png

Protocols: ``ab`` (learn a table of facts, then a second one; recall of the first), ``tables4`` (four tables one
after another; recall of every earlier one) and ``bytes`` (a ByteLM on the Python docs, then on the standard
library's source; bits per byte on the docs). Arms: ``no_sleep``, ``replay`` (stored windows mixed into the wake
batches) and ``sleep`` (SleepWakeConsolidation), at the same number of wake updates and replayed windows (see
:mod:`neat_lightning.eval.sleep_wake`, :mod:`neat_lightning.eval.sleep_bytes`). Prints a table per protocol and
writes the runs and the summary as JSON and a PNG of the curves.

A setting flag applies to every selected protocol whose configuration has that field (``--batch-size`` sets both
the fact tables' and the ByteLM's); unset flags keep each protocol's measured defaults.
"""

from __future__ import annotations

import argparse
import logging
import os
import warnings
from dataclasses import fields, replace
from typing import Any

from neat_lightning.eval.sleep_bytes import ContinualConfig
from neat_lightning.eval.sleep_report import PROTOCOLS, default_config, evaluate, format_table, plot, write_json
from neat_lightning.eval.sleep_wake import RetentionConfig, SleepSettings

FIXED = {"tables", "sleep"}  # set by the protocol itself


def as_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not a boolean (true/false)")


def flag_type(default: Any):
    return as_bool if isinstance(default, bool) else type(default)


def setting_fields() -> dict[str, tuple[str, Any]]:
    """Every settable field: name -> (the classes that have it, a default for its type)."""
    out: dict[str, tuple[str, Any]] = {}
    for cls in (SleepSettings, RetentionConfig, ContinualConfig):
        for f in fields(cls):
            if f.name in FIXED:
                continue
            owners = out.get(f.name, ("", f.default))[0]
            out[f.name] = (f"{owners}, {cls.__name__}".lstrip(", "), f.default)
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="neat eval-sleep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--protocols", nargs="+", choices=PROTOCOLS, default=["ab"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                   help="worker processes, one torch thread each (default: 2, or 1 on a one-core machine)")
    p.add_argument("--out-json", default="runs/eval_sleep/sleep_wake.json")
    p.add_argument("--out-png", default="runs/eval_sleep/sleep_wake.png")
    for name, (owners, default) in setting_fields().items():
        p.add_argument(f"--{name.replace('_', '-')}", type=flag_type(default), default=None, dest=name,
                       help=f"{owners}.{name} (default per protocol; {default} for the fact tables)")
    return p


def configure(protocol: str, changes: dict[str, Any]) -> Any:
    """The protocol's default configuration with the given fields changed (fields it lacks are ignored)."""
    cfg = default_config(protocol)
    own = {f.name for f in fields(cfg)}
    sleep = replace(cfg.sleep, **{k: v for k, v in changes.items() if k in {f.name for f in fields(SleepSettings)}})
    return replace(cfg, sleep=sleep, **{k: v for k, v in changes.items() if k in own and k not in FIXED})


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    import torch

    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    changes = {name: getattr(args, name) for name in setting_fields() if getattr(args, name) is not None}
    try:
        configs = {p: configure(p, changes) for p in args.protocols}
    except ValueError as err:
        parser().error(str(err))
    result = evaluate(args.protocols, args.seeds, configs, workers=args.workers)
    print(format_table(result))
    print(f"wrote {write_json(result, args.out_json)} and {plot(result, args.out_png)}")
    return 0
