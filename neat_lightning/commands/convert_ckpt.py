"""``neat convert-ckpt``: rewrite a checkpoint of an older format in the current one, once.

    neat convert-ckpt runs/old/checkpoints/last.ckpt runs/old/checkpoints/last-v2.ckpt --model NeatModel
    neat convert-ckpt old.ckpt old.ckpt --in-place

The module class comes from ``--model`` (a name exported by :mod:`neat_lightning.modules`, e.g. ``NeatModel``, or a
full class path) or else from the class path LightningCLI records in the checkpoint's hyperparameters. Its
``upgrade_format`` (see :func:`neat_lightning.modules.base.upgrade_checkpoint`) renames hyperparameters and
state-dict keys; each change is printed. OUT is written to a temporary file in its folder and renamed, so an
interrupted conversion never leaves a half-written checkpoint; IN is only replaced with ``--in-place``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

PROG = "neat convert-ckpt"


def module_class(name: str | None, checkpoint: dict[str, Any], source: str) -> type:
    """The ResumableModule class named by ``--model`` or, without it, recorded in ``checkpoint``.

    Raises:
        ValueError: no class given or recorded, an unknown name, or ``--model`` disagreeing with the recorded class.
        TypeError: the class is not a ``ResumableModule`` (it has no checkpoint format to upgrade).
    """
    from neat_lightning import modules
    from neat_lightning.modules.base import ResumableModule

    recorded = (checkpoint.get("hyper_parameters") or {}).get("_class_path")
    wanted = name or recorded
    if not wanted:
        raise ValueError(
            f"{source} records no module class (older checkpoints written outside the neat CLI do not): "
            "pass --model NAME, one of "
            f"{', '.join(modules.__all__)}"
        )
    module_name, _, cls_name = wanted.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name or modules.__name__), cls_name)
    except (ImportError, AttributeError):
        raise ValueError(
            f"--model={wanted!r} is not a module class: give one of {', '.join(modules.__all__)} or a full class path"
        ) from None
    if not (isinstance(cls, type) and issubclass(cls, ResumableModule)):
        raise TypeError(f"--model={wanted!r} is {cls!r}, not a ResumableModule: it has no checkpoint format")
    if name and recorded:
        held_module, _, held_name = recorded.rpartition(".")
        try:
            held = getattr(importlib.import_module(held_module), held_name)
        except (ImportError, AttributeError):
            held = None
        if held is not None and held is not cls:
            raise ValueError(f"{source} holds a {held_name} ({recorded}), but --model names {cls.__name__}")
    return cls


def save_atomic(checkpoint: dict[str, Any], path: Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def convert(src: Path, dst: Path, model: str | None = None, in_place: bool = False) -> list[str]:
    """Upgrade the checkpoint ``src`` to the current format and write it to ``dst``; returns the changes made.

    Raises:
        ValueError: ``dst`` is ``src`` without ``in_place``; ``src`` is not a checkpoint, names no usable class, or
            was written by a newer version.
    """
    from neat_lightning.modules.base import FORMAT_KEY, check_checkpoint_file, upgrade_checkpoint

    check_checkpoint_file(src, "IN")
    if dst.exists() and dst.resolve() == src.resolve() and not in_place:
        raise ValueError(f"OUT={str(dst)!r} is IN: pass --in-place to overwrite the original checkpoint")
    if dst.is_dir():
        raise IsADirectoryError(f"OUT={str(dst)!r} is a directory; give a file name")
    checkpoint = torch.load(src, map_location="cpu", weights_only=False)
    cls = module_class(model, checkpoint, f"IN={str(src)!r}")
    found = int(checkpoint.get(FORMAT_KEY, 1))
    changes = upgrade_checkpoint(checkpoint, cls, f"IN={str(src)!r}")
    if found != checkpoint[FORMAT_KEY] or dst.resolve() != src.resolve():
        save_atomic(checkpoint, dst)
    return [f"format {found} -> {checkpoint[FORMAT_KEY]}"] + changes if found != checkpoint[FORMAT_KEY] else changes


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    parser.add_argument("src", type=Path, metavar="IN", help="the checkpoint to convert")
    parser.add_argument("dst", type=Path, metavar="OUT", help="where to write the converted checkpoint")
    parser.add_argument("--model", default=None,
                        help="module class: a name from neat_lightning.modules (e.g. NeatModel) or a full class path; "
                             "default: the class recorded in IN")
    parser.add_argument("--in-place", action="store_true", help="allow OUT to be IN (replaces the original)")
    args = parser.parse_args(argv)
    try:
        changes = convert(args.src, args.dst, args.model, args.in_place)
    except (FileNotFoundError, IsADirectoryError, ValueError, TypeError) as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        return 2
    same = args.dst.resolve() == args.src.resolve()
    if not changes:
        print(f"{args.src} is already in the current format" + ("" if same else f"; copied to {args.dst}"))
        return 0
    for line in changes:
        print(f"  {line}")
    print(f"wrote {args.dst}")
    return 0
