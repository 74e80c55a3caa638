"""``neat patch``: patch a text file with a trained ByteLM and show where the patches fall.

    neat patch --ckpt runs/quickstart/checkpoints/last.ckpt --input notes.txt
    neat patch --ckpt last.ckpt --input notes.txt --threshold 1.8 --max-patch-length 16
    neat patch --ckpt last.ckpt --input notes.txt --target-patch-size 4.5 --rule both --monotonic-threshold 0.8
    neat patch --input notes.txt --mode space            # baselines need no checkpoint

Prints a table of patch statistics (mean / p50 / p90 / p99 / max patch size, boundary ratio, bytes, threshold) and
the text with patch boundaries marked: alternating colours on a terminal, ``|`` before every patch otherwise.
Without ``--threshold`` the global threshold is calibrated on the input itself to ``--target-patch-size``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from neat_lightning.codec import ids_from_bytes
from neat_lightning.components.patch_threshold import calibrate_threshold
from neat_lightning.components.patching import Patcher, PatcherConfig, patch_statistics

DEFAULT_TARGET_PATCH_SIZE = 4.5  # BLT's average entropy patch size


class CommandError(Exception):
    """A user-facing error: printed as ``neat patch: error: ...`` with exit status 1."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="neat patch", description="Entropy-patch a text file with a ByteLM checkpoint and show the patches."
    )
    p.add_argument("--ckpt", type=Path, help="ByteLM checkpoint (.ckpt); required in entropy mode.")
    p.add_argument("--input", type=Path, required=True, help="Text file to patch (read as raw bytes).")
    th = p.add_mutually_exclusive_group()
    th.add_argument("--threshold", type=float, help="Global entropy threshold in nats.")
    th.add_argument("--target-patch-size", type=float,
                    help=f"Calibrate the threshold on the input to this mean patch size "
                         f"(default {DEFAULT_TARGET_PATCH_SIZE} when --threshold is not given).")
    p.add_argument("--mode", choices=["entropy", "static", "space"], default="entropy", help="Patching scheme.")
    p.add_argument("--rule", choices=["global", "monotonic", "both"], default="global", help="Entropy rule.")
    p.add_argument("--monotonic-threshold", type=float, default=PatcherConfig.monotonic_threshold,
                   help="Threshold on H_t - H_{t-1} (nats) for --rule monotonic/both.")
    p.add_argument("--combine", choices=["or", "and"], default="or", help="How --rule both joins the two rules.")
    p.add_argument("--max-patch-length", type=int, help="Split patches longer than this.")
    p.add_argument("--patch-size", type=int, default=PatcherConfig.patch_size, help="Static mode patch size.")
    p.add_argument("--reset-at-newline", action="store_true", help="Restart the entropy context after newlines.")
    p.add_argument("--context-overlap", type=int, default=0, help="Bytes of context shared by entropy windows.")
    p.add_argument("--max-bytes", type=int, help="Patch only the first N bytes of the input.")
    p.add_argument("--show-bytes", type=int, default=2000,
                   help="How many bytes of marked text to print (0: none, -1: all).")
    p.add_argument("--color", choices=["auto", "always", "never"], default="auto",
                   help="Alternating colours instead of '|' markers (auto: on a terminal).")
    p.add_argument("--json", type=Path, help="Also write the statistics to this JSON file.")
    return p


def load_entropy_model(path: Path | None):
    """A ByteLM from ``path`` on the CPU, in eval mode; clear errors naming the path."""
    if path is None:
        raise CommandError("--ckpt is required in entropy mode (static and space modes need none)")
    if not path.exists():
        raise CommandError(f"checkpoint not found: {str(path)!r}")
    if path.is_dir():
        raise CommandError(f"checkpoint {str(path)!r} is a directory; give the .ckpt file")
    from neat_lightning.modules.base import load_frozen
    from neat_lightning.modules.byte_lm import ByteLM

    try:
        return load_frozen(ByteLM, path, "--ckpt")
    except (FileNotFoundError, IsADirectoryError, ValueError) as err:
        raise CommandError(f"could not load a ByteLM from checkpoint {str(path)!r}: {err}") from None


def read_input(path: Path, max_bytes: int | None) -> bytes:
    if not path.exists():
        raise CommandError(f"input file not found: {str(path)!r}")
    if path.is_dir():
        raise CommandError(f"input {str(path)!r} is a directory; give a text file")
    if max_bytes is not None and max_bytes < 1:
        raise CommandError(f"--max-bytes={max_bytes} must be >= 1")
    with path.open("rb") as f:
        data = f.read() if max_bytes is None else f.read(max_bytes)
    if not data:
        raise CommandError(f"input file {str(path)!r} is empty")
    return data


def marked_text(data: bytes, lengths: list[int], color: bool):
    """The text with patch boundaries shown: a rich ``Text`` with alternating styles, or a str with ``|`` markers.

    A boundary inside a multi-byte UTF-8 character is shown before that character (display only).
    """
    from rich.text import Text

    starts = [0]
    for n in lengths[:-1]:
        starts.append(starts[-1] + n)
    # move display boundaries off UTF-8 continuation bytes so characters are not cut in two
    shown = []
    for s in starts:
        while s > 0 and 0x80 <= data[s] < 0xC0:
            s -= 1
        if not shown or s > shown[-1]:
            shown.append(s)
    pieces = [data[a:b].decode("utf-8", errors="replace") for a, b in zip(shown, shown[1:] + [len(data)])]
    if not color:
        return "|" + "|".join(pieces)
    text = Text()
    for i, piece in enumerate(pieces):
        text.append(piece, style="black on bright_cyan" if i % 2 == 0 else "black on bright_yellow")
    return text


def stats_table(stats: dict[str, float]):
    from rich.table import Table

    table = Table()
    table.add_column("statistic")
    table.add_column("value", justify="right")
    rows = [
        ("bytes", f"{int(stats['n_bytes'])}"), ("patches", f"{int(stats['n_patches'])}"),
        ("mean patch size", f"{stats['mean_size']:.3f}"), ("p50 patch size", f"{stats['p50']:.0f}"),
        ("p90 patch size", f"{stats['p90']:.0f}"), ("p99 patch size", f"{stats['p99']:.0f}"),
        ("max patch size", f"{stats['max_size']:.0f}"), ("boundary ratio", f"{stats['boundary_ratio']:.4f}"),
        ("threshold (nats)", "-" if stats.get("threshold") is None else f"{stats['threshold']:.4f}"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    return table


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    data = read_input(args.input, args.max_bytes)
    try:
        config = PatcherConfig(
            mode=args.mode, rule=args.rule, monotonic_threshold=args.monotonic_threshold, combine=args.combine,
            max_patch_length=args.max_patch_length, patch_size=args.patch_size,
            reset_at_newline=args.reset_at_newline, context_overlap=args.context_overlap,
        )
    except ValueError as exc:
        raise CommandError(f"invalid patching option: {exc}")
    ids = ids_from_bytes(data)[None]  # (1, T)
    entropies, threshold, how = None, None, ""
    if args.mode == "entropy":
        model = load_entropy_model(args.ckpt)
        block = model.config.block_size
        if args.context_overlap >= block:
            raise CommandError(f"--context-overlap={args.context_overlap} must be < the model's block_size={block}")
        patcher = Patcher(config, model)
        with torch.inference_mode():
            entropies = patcher.entropies(ids)
        if args.threshold is not None:
            threshold, how = args.threshold, "given"
        else:
            target = args.target_patch_size or DEFAULT_TARGET_PATCH_SIZE
            try:
                threshold = calibrate_threshold(entropies, target, max_patch_length=args.max_patch_length)
            except ValueError as exc:
                raise CommandError(f"--target-patch-size: {exc}")
            how = f"calibrated to mean patch size {target:g} on this input"
    else:
        patcher = Patcher(config)
    lengths = patcher.patch_lengths(ids, entropies, threshold)
    stats = patch_statistics(lengths)
    stats["threshold"] = threshold

    console = Console(force_terminal=True if args.color == "always" else None, highlight=False)
    color = args.color == "always" or (args.color == "auto" and console.is_terminal)
    rule = f", rule {args.rule}" if args.mode == "entropy" else ""
    console.print(f"neat patch: {args.input} ({args.mode} mode{rule})")
    console.print(stats_table(stats))
    if how:
        console.print(f"threshold {threshold:.4f} nats ({how})")
    if args.show_bytes != 0:
        n_show = len(data) if args.show_bytes < 0 else min(args.show_bytes, len(data))
        sizes = lengths[0][lengths[0] > 0]
        keep = int((torch.cumsum(sizes, 0) - sizes < n_show).sum())  # patches starting in the shown prefix
        shown = sizes[:keep].tolist()
        shown[-1] = n_show - sum(shown[:-1])
        marked = marked_text(data[:n_show], shown, color)
        console.print(("patches (alternating colours):" if color else "patches ('|' marks each patch start):"))
        if color:
            console.print(marked)
        else:
            console.file.write(marked + "\n")
        if n_show < len(data):
            console.print(f"... ({len(data) - n_show} more bytes; --show-bytes -1 prints all)")
    if args.json is not None:
        tmp = args.json.with_suffix(args.json.suffix + ".tmp")
        tmp.write_text(json.dumps({"input": str(args.input), "mode": args.mode, **stats}, indent=2))
        tmp.replace(args.json)  # atomic
    return 0


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except CommandError as exc:
        print(f"neat patch: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
