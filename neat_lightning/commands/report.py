"""``neat report``: a ByteLM checkpoint's validation bpb next to gzip/bz2/xz on the very same bytes, the same on an
out-of-domain text (static, adaptive, with the byte-context cache), plus samples.

    neat report --config configs/byte_lm_quickstart.yaml --ckpt runs/quickstart/checkpoints/last.ckpt
    neat report --config configs/byte_lm_quickstart.yaml --ckpt runs/quickstart/checkpoints/last.ckpt \
        --ood 'docs/*.md' --adapt --cache

The first line names the checkpoint evaluated (path, global step, when it was written). The validation bytes come
from the config's ``data:`` section (the same DataModule and split that training used); the model's bpb counts every
predicted id of the validation stream (each document's bytes and its EOS), exactly as ``neat validate`` logs
``val/bpb``. ``--ood FILE...`` (files or globs, concatenated) adds a text from elsewhere, scored as ``neat score``
scores it (one document, windows of ``--context`` ids sliding by ``--stride``), with ``--adapt`` also prequentially
(each window scored, then learnt from; the checkpoint is never written) and with ``--cache`` every pass again with
the online byte-context cache. The compressors see the same bytes in one go at their strongest settings.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import yaml
from rich.console import Console
from rich.table import Table

from neat_lightning.commands import doc_summary
from neat_lightning.commands.score import (
    add_scoring_arguments,
    checkpoint_summary,
    compression_bpb,
    describe_checkpoint,
    describe_input,
    describe_settings,
    device_from,
    print_table,
    read_inputs,
    results_dict,
    score_bytes,
    settings_from,
)

__all__ = ["compression_bpb", "load_datamodule", "main", "model_bpb"]


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
    parser = argparse.ArgumentParser(prog="neat report", description=doc_summary(__doc__),
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--config", required=True, type=Path, help="the training config (its data: section is used)")
    parser.add_argument("--ckpt", required=True, type=Path, help="a ByteLM checkpoint")
    parser.add_argument("--val-files", nargs="*", default=None, help="evaluate on these files instead")
    parser.add_argument("--ood", nargs="+", default=None, metavar="FILE",
                        help="an out-of-domain text: files or globs, concatenated (e.g. 'docs/*.md')")
    parser.add_argument("--samples", type=int, default=3, help="number of sample generations")
    parser.add_argument("--sample-bytes", type=int, default=160)
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    add_scoring_arguments(parser)
    args = parser.parse_args(argv)

    from neat_lightning.modules.base import load_frozen
    from neat_lightning.modules.byte_lm import ByteLM

    try:
        settings, device = settings_from(args), device_from(args.device)
        model = load_frozen(ByteLM, args.ckpt, "--ckpt").to(device)
        ood = read_inputs(args.ood, "--ood") if args.ood else None
        overrides = {"val_files": args.val_files} if args.val_files else {}
        dm = load_datamodule(args.config, overrides)
    except (FileNotFoundError, IsADirectoryError, ValueError) as err:
        print(f"neat report: {err}", file=sys.stderr)
        return 2
    console = Console()
    console.print(f"checkpoint: {describe_checkpoint(args.ckpt)}")
    dm.setup("validate")
    val = dm.val_bytes()

    n_params = f"{sum(p.numel() for p in model.parameters()):,} params"
    results = {"model": model_bpb(model, dm.val_dataloader()), **compression_bpb(val)}
    table = Table(title=f"Validation bits per byte ({len(val):,} bytes, {len(dm.val_docs)} documents)")
    table.add_column("method")
    table.add_column("bpb", justify="right")
    table.add_column("vs xz -9e", justify="right")
    for name, bpb in results.items():
        label = f"ByteLM ({n_params})" if name == "model" else name
        table.add_row(label, f"{bpb:.3f}", f"{bpb / results['xz -9e'] - 1:+.1%}")
    console.print(table)
    beats = results["model"] < results["xz -9e"]
    console.print(f"ByteLM {'beats' if beats else 'does NOT beat'} xz -9e on the same validation bytes.")

    ood_result = None
    if ood is not None:
        paths, data = ood
        console.print(f"out-of-domain text: {describe_input(paths, data)}")
        passes = score_bytes(model, data, settings, args.adapt, device, args.cache)
        compressors = compression_bpb(data)
        ood_result = results_dict(data, passes, compressors, sum(p.seconds for p in passes))
        ood_result["files"] = [str(p) for p in paths]
        print_table(f"Out-of-domain bits per byte ({len(data):,} bytes, {len(paths)} files: {', '.join(args.ood)}; "
                    f"{describe_settings(settings, args.adapt, args.cache)})", f"ByteLM ({n_params})", data, passes,
                    compressors, console)
        for line in verdicts(ood_result):
            console.print(line)

    prompts = _prompts(val, args.samples)
    samples = model.generate_text(prompts, args.sample_bytes, temperature=0.8, top_k=40, seed=0)
    sample_table = Table(title="Samples (temperature 0.8, top-k 40)", show_lines=True)
    sample_table.add_column("prompt")
    sample_table.add_column("continuation")
    for p, s in zip(prompts, samples):
        sample_table.add_row(repr(p), repr(s))
    console.print(sample_table)

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        report = {"checkpoint": checkpoint_summary(args.ckpt), "bpb": results, "val_bytes": len(val),
                  "samples": samples}
        if ood_result is not None:
            report["ood"] = ood_result
        args.json.write_text(json.dumps(report, indent=2))
    return 0


def verdicts(result: dict) -> list[str]:
    """Out-of-domain static bpb against gzip -9 and the adaptive bpb against xz -9e, in words."""
    static, gz, xz = result["bpb"], result["gzip9"], result["xz9e"]
    lines = [(f"Out of domain, static: {static:.3f} bpb, {static / gz - 1:+.1%} vs gzip -9 ({gz:.3f}), "
              f"{static / xz - 1:+.1%} vs xz -9e ({xz:.3f}).")]
    if "bpb_adaptive" in result:
        adaptive = result["bpb_adaptive"]
        lines.append(f"Out of domain, adaptive: {adaptive:.3f} bpb, {adaptive / xz - 1:+.1%} vs xz -9e, "
                     f"{adaptive / static - 1:+.1%} vs static.")
    if "bpb_adaptive_cache" in result:
        cached = result["bpb_adaptive_cache"]
        lines.append(f"Out of domain, adaptive + cache: {cached:.3f} bpb, {cached / xz - 1:+.1%} vs xz -9e.")
    return lines


def _prompts(val: bytes, n: int) -> list[str]:
    """``n`` short prompts: line starts spread through the validation text."""
    lines = [ln for ln in val.decode("utf-8", errors="replace").splitlines() if len(ln.strip()) > 30]
    if not lines:
        return ["The "] * n
    step = max(1, len(lines) // max(1, n))
    return [lines[i * step][:24] for i in range(n)]
