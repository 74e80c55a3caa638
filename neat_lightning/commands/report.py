"""``neat report``: a ByteLM checkpoint's validation bpb next to gzip/bz2/xz on the very same bytes, plus samples.

    neat report --config configs/byte_lm_quickstart.yaml --ckpt runs/quickstart/checkpoints/last.ckpt

The validation bytes come from the config's ``data:`` section (the same DataModule and split that training used).
The model's bpb counts every predicted id of the validation stream (each document's bytes and its EOS); the
compressors see the documents' bytes concatenated, compressed in one go at their strongest settings.
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import json
import lzma
import math
import sys
from pathlib import Path

import torch
import yaml
from rich.console import Console
from rich.table import Table


def compression_bpb(data: bytes) -> dict[str, float]:
    """Bits per byte of gzip -9, bz2 -9 and xz -9e on ``data``."""
    n = max(1, len(data))
    return {
        "gzip -9": len(gzip.compress(data, compresslevel=9)) * 8 / n,
        "bz2 -9": len(bz2.compress(data, compresslevel=9)) * 8 / n,
        "xz -9e": len(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)) * 8 / n,
    }


@torch.inference_mode()
def model_bpb(model, loader) -> float:
    """Per-byte mean next-byte loss over a loader of (B, T + 1) batches, in bits."""
    model.eval()
    nats, count = 0.0, 0
    for batch in loader:
        loss, n = model.loss(batch.to(model.device))
        nats += float(loss) * n
        count += n
    return nats / max(1, count) / math.log(2)


def load_datamodule(config_path: Path, overrides: dict):
    """Build the config's ``data:`` DataModule (class_path + init_args) with optional init_args overrides."""
    import importlib

    if not config_path.is_file():
        raise FileNotFoundError(f"--config: no such file: {str(config_path)!r}")
    cfg = yaml.safe_load(config_path.read_text()) or {}
    data = cfg.get("data")
    if not isinstance(data, dict) or "class_path" not in data:
        raise ValueError(f"{config_path}: expected a `data:` section with `class_path` and `init_args`")
    module_name, _, cls_name = data["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module_name), cls_name)
    return cls(**{**(data.get("init_args") or {}), **overrides})


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="neat report", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, type=Path, help="the training config (its data: section is used)")
    parser.add_argument("--ckpt", required=True, type=Path, help="a ByteLM checkpoint")
    parser.add_argument("--val-files", nargs="*", default=None, help="evaluate on these files instead")
    parser.add_argument("--samples", type=int, default=3, help="number of sample generations")
    parser.add_argument("--sample-bytes", type=int, default=160)
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args(argv)

    from neat_lightning.modules.base import load_frozen
    from neat_lightning.modules.byte_lm import ByteLM

    try:
        model = load_frozen(ByteLM, args.ckpt, "--ckpt")
    except (FileNotFoundError, IsADirectoryError, ValueError) as err:
        print(f"neat report: {err}", file=sys.stderr)
        return 2
    overrides = {"val_files": args.val_files} if args.val_files else {}
    dm = load_datamodule(args.config, overrides)
    dm.setup("validate")
    val = dm.val_bytes()

    results = {"model": model_bpb(model, dm.val_dataloader()), **compression_bpb(val)}
    table = Table(title=f"Validation bits per byte ({len(val):,} bytes, {len(dm.val_docs)} documents)")
    table.add_column("method")
    table.add_column("bpb", justify="right")
    table.add_column("vs xz -9e", justify="right")
    for name, bpb in results.items():
        label = f"ByteLM ({sum(p.numel() for p in model.parameters()):,} params)" if name == "model" else name
        table.add_row(label, f"{bpb:.3f}", f"{bpb / results['xz -9e'] - 1:+.1%}")
    console = Console()
    console.print(table)

    prompts = _prompts(val, args.samples)
    samples = model.generate_text(prompts, args.sample_bytes, temperature=0.8, top_k=40, seed=0)
    sample_table = Table(title="Samples (temperature 0.8, top-k 40)", show_lines=True)
    sample_table.add_column("prompt")
    sample_table.add_column("continuation")
    for p, s in zip(prompts, samples):
        sample_table.add_row(repr(p), repr(s))
    console.print(sample_table)

    beats = results["model"] < results["xz -9e"]
    console.print(f"ByteLM {'beats' if beats else 'does NOT beat'} xz -9e on the same validation bytes.")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"bpb": results, "val_bytes": len(val), "samples": samples}, indent=2))
    return 0


def _prompts(val: bytes, n: int) -> list[str]:
    """``n`` short prompts: line starts spread through the validation text."""
    lines = [ln for ln in val.decode("utf-8", errors="replace").splitlines() if len(ln.strip()) > 30]
    if not lines:
        return ["The "] * n
    step = max(1, len(lines) // max(1, n))
    return [lines[i * step][:24] for i in range(n)]
