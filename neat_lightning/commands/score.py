"""``neat score``: bits per byte of a ByteLM or NeatModel checkpoint on any text, static and with prequential
test-time adaptation, next to gzip -9, bz2 -9 and xz -9e on the same bytes.

    neat score --ckpt runs/quickstart/checkpoints/last.ckpt --input notes.txt
    neat score --ckpt runs/quickstart/checkpoints/last.ckpt --input 'docs/*.md' --adapt
    neat score --ckpt last.ckpt --input big.txt --adapt --lr 1e-4 --steps 2 --context 512 --stride 256 --json

The input (files or globs, concatenated in the order given; a glob's matches sorted) is read as one document: the
model reads EOS first, as at every document start in training, and predicts each byte once. Windows of
``--context`` ids (256) slide by ``--stride`` (half the context): the first window scores all its bytes, every later
one the ``stride`` bytes after the previous window, each with ``context - stride`` bytes of context before it. The
bits are the code length an arithmetic coder driven by the model would need for the bytes (the EOS the model starts
from is not counted).

- **static**: the checkpoint's weights, unchanged.
- **adaptive** (``--adapt``; prequential evaluation, "dynamic evaluation" in Krause et al. 2018, arXiv 1709.07432):
  windows are read in order; a window's bytes are scored first, then the model takes ``--steps`` Adam steps
  (``--lr``) on that window's next-byte loss. A byte is therefore always coded by a model that has learnt only
  from the bytes before it: the number is an honest code length. The adapted weights live in memory only; the
  checkpoint file is never written.
- **NeatModel with an active Titans memory**: the memory already learns while it reads (fast weights within a
  window). *static* starts every window from the memory's slow weights, as training does; *memory* carries the
  memory state from window to window through the whole input (weights fixed; the ``context - stride`` bytes a
  window shares with the previous one are written to the memory again). With ``--adapt``: *gradient* (Adam steps,
  memory reset per window) and *memory + gradient* (both); ``bpb_adaptive`` is the latter.
"""

from __future__ import annotations

import argparse
import bz2
import copy
import datetime as dt
import gzip
import hashlib
import json
import lzma
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from neat_lightning.commands import doc_summary
from neat_lightning.codec import EOS_ID, ids_from_bytes

PROG = "neat score"
SCORED_CLASSES = ("ByteLM", "NeatModel")


def compression_bpb(data: bytes) -> dict[str, float]:
    """Bits per byte of gzip -9, bz2 -9 and xz -9e on ``data``, each compressing it in one go."""
    n = max(1, len(data))
    return {
        "gzip -9": len(gzip.compress(data, compresslevel=9)) * 8 / n,
        "bz2 -9": len(bz2.compress(data, compresslevel=9)) * 8 / n,
        "xz -9e": len(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)) * 8 / n,
    }


# -- which checkpoint ----------------------------------------------------------------------------------------------


def checkpoint_summary(path: str | Path) -> dict[str, Any]:
    """What a checkpoint file is: ``path``, ``module`` (class name, when recorded), ``global_step``, ``epoch`` and
    ``written`` (the file's modification time, local ISO 8601). Reads the metadata only (tensors stay on disk)."""
    from neat_lightning.modules.base import check_checkpoint_file

    check_checkpoint_file(path)
    checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    class_path = (checkpoint.get("hyper_parameters") or {}).get("_class_path")
    written = dt.datetime.fromtimestamp(Path(path).stat().st_mtime).astimezone()
    return {
        "path": str(path),
        "module": class_path.rsplit(".", 1)[-1] if class_path else None,
        "global_step": checkpoint.get("global_step"),
        "epoch": checkpoint.get("epoch"),
        "written": written.isoformat(timespec="seconds"),
    }


def describe_checkpoint(path: str | Path) -> str:
    """``runs/x/checkpoints/last.ckpt (ByteLM, global step 900, written 2025-01-02 10:11:12, 5 min ago)``."""
    info = checkpoint_summary(path)
    written = dt.datetime.fromisoformat(info["written"])
    age = (dt.datetime.now().astimezone() - written).total_seconds()
    ago = f"{age:.0f} s" if age < 120 else f"{age / 60:.0f} min" if age < 7200 else f"{age / 3600:.1f} h"
    parts = [info["module"]] if info["module"] else []
    parts += [f"global step {info['global_step']}", f"written {written:%Y-%m-%d %H:%M:%S}, {ago} ago"]
    return f"{info['path']} ({', '.join(parts)})"


def load_scorer(path: str | Path, field: str = "--ckpt") -> nn.Module:
    """The ByteLM or NeatModel of checkpoint ``path`` (class from the checkpoint), frozen, in eval mode, on CPU.

    Raises:
        FileNotFoundError / IsADirectoryError / ValueError: ``path`` is missing, a folder, truncated, or holds a
            module that does not predict bytes.
    """
    from neat_lightning import modules
    from neat_lightning.cli import guess_module_class, resolve_class
    from neat_lightning.modules.base import check_checkpoint_file, load_frozen

    check_checkpoint_file(path, field)
    hparams = torch.load(path, map_location="cpu", mmap=True, weights_only=False).get("hyper_parameters") or {}
    class_path = hparams.get("_class_path") or guess_module_class(hparams)
    cls = resolve_class(class_path)
    scorers = tuple(getattr(modules, name) for name in SCORED_CLASSES)
    predicts_bytes = isinstance(cls, type) and issubclass(cls, scorers)
    if not predicts_bytes:
        held = class_path.rsplit(".", 1)[-1] if class_path else "module of unknown class"
        raise ValueError(f"{field}: checkpoint {str(path)!r} holds a {held}, which does not predict bytes; "
                         f"{PROG} takes a {' or '.join(SCORED_CLASSES)} checkpoint")
    return load_frozen(cls, path, field)


# -- windows and scores --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScoreSettings:
    """How the input is cut into windows and how the adaptive pass learns."""

    context: int = 256  # ids a window reads (the model's input length)
    stride: int | None = None  # new bytes each window after the first scores; None: context // 2
    lr: float = 3e-4  # Adam learning rate of the adaptive pass
    steps: int = 1  # Adam steps per window in the adaptive pass
    batch_size: int = 32  # windows per forward in the static pass
    cache_orders: tuple[int, int] = (3, 10)  # the byte contexts the cache counts (--cache), shortest and longest

    def __post_init__(self) -> None:
        if self.context < 2:
            raise ValueError(f"--context={self.context} must be >= 2")
        if self.stride is None:
            object.__setattr__(self, "stride", self.context // 2)
        if not 1 <= self.stride <= self.context:
            raise ValueError(f"--stride={self.stride} must be in [1, --context={self.context}]")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"--lr={self.lr} must be a finite number > 0")
        if self.steps < 1:
            raise ValueError(f"--steps={self.steps} must be >= 1")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size={self.batch_size} must be >= 1")
        lo, hi = self.cache_orders
        if not 1 <= lo <= hi:
            raise ValueError(f"--cache-orders={lo} {hi} must satisfy 1 <= shortest <= longest")


def window_spans(n_bytes: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """Sliding windows over ids ``x_0 .. x_n`` (``x_0`` = EOS, ``x_i`` = byte ``i``) as ``(start, end, first)``.

    Window ``(s, e, f)`` reads ``x[s:e]`` and predicts ``x[s+1:e+1]``; it scores the predictions of
    ``x[f+1 .. e]``. ``e - s = min(context, n)`` for every window, and the scored ranges tile ``1 .. n`` once.
    """
    end = min(context, n_bytes)
    spans = [(0, end, 0)]
    while end < n_bytes:
        new_end = min(end + stride, n_bytes)
        spans.append((max(0, new_end - context), new_end, end))
        end = new_end
    return spans


class ByteScorer:
    """Next-byte nats of a ByteLM or a NeatModel (whose Titans memory state can be carried between calls)."""

    def __init__(self, model: nn.Module) -> None:
        from neat_lightning.modules.neat import NeatModel

        self.model = model
        self.neat = isinstance(model, NeatModel)
        self.memory = self.neat and model.is_active("titans")

    def nats(self, ids: torch.Tensor, state: Any = None) -> tuple[torch.Tensor, Any]:
        """ids (B, L + 1) -> nats of predicting ``ids[:, 1:]`` (B, L) and the memory state after the window
        (``None`` without a Titans memory). ``state``: a previous window's memory state, ``None`` to start fresh."""
        x, y = ids[:, :-1], ids[:, 1:]
        if self.neat:  # expert mix from the SVF dispatcher (none without one), memory state in and out
            mix = self.model.choose_mix(x, None)[0] if self.model.dispatcher is not None else None
            logits, out = self.model.run(x, states=state, mix=mix)
            state = out.states if self.memory else None
        else:
            logits = self.model(x)
        nats = F.cross_entropy(rearrange(logits, "b t v -> b v t").float(), y, reduction="none")
        return nats, state


def detach(state: Any) -> Any:
    """A memory state (list of per-block states) cut from the graph."""
    from neat_lightning.components.titans import detach_state

    return None if state is None else [detach_state(s) for s in state]


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter except those of frozen parts (a NeatModel's MVoT VQ-VAE); BLT's entropy model is not a
    submodule."""
    from neat_lightning.components.mvot import FrozenModule

    frozen = {id(p) for m in model.modules() if isinstance(m, FrozenModule) for p in m.parameters()}
    return [p for p in model.parameters() if id(p) not in frozen]


@torch.no_grad()
def static_scores(scorer: ByteScorer, ids: torch.Tensor, spans: Sequence[tuple[int, int, int]],
                  batch_size: int) -> torch.Tensor:
    """Nats of every byte (n_bytes,) float64 with fixed weights, windows batched (memory reset per window).

    ``no_grad`` rather than ``inference_mode``: the Titans memory takes gradients of its inner loss while reading."""
    scorer.model.eval()
    out = []
    for i in range(0, len(spans), batch_size):
        group = spans[i : i + batch_size]
        batch = torch.stack([ids[s : e + 1] for s, e, _ in group])  # (B, L + 1)
        nats, _ = scorer.nats(batch)  # (B, L)
        out += [row[f - s :].double() for row, (s, _, f) in zip(nats, group)]  # the scored predictions of each row
    return torch.cat(out)


def sequential_scores(scorer: ByteScorer, ids: torch.Tensor, spans: Sequence[tuple[int, int, int]],
                      settings: ScoreSettings, gradient: bool, carry_memory: bool) -> torch.Tensor:
    """Nats of every byte (n_bytes,) float64, windows in order, each scored before anything learns from it.

    Args:
        gradient: after scoring a window, take ``settings.steps`` Adam steps (``settings.lr``) on its mean next-byte
            loss. The caller passes a copy of the model: its weights change.
        carry_memory: start each window from the memory state the previous window left (Titans); otherwise from
            the memory's slow weights.
    """
    model = scorer.model.eval()  # no dropout: the model that scores is the one that learns
    params = trainable_parameters(model) if gradient else []
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=settings.lr) if gradient else None
    state, out = None, []
    for s, e, f in spans:
        window = ids[s : e + 1][None]  # (1, L + 1)
        with torch.set_grad_enabled(gradient):
            nats, new_state = scorer.nats(window, state if carry_memory else None)  # (1, L)
            out.append(nats[0, f - s :].detach().double())  # the score, taken before any step on the window
            for step in range(settings.steps if gradient else 0):
                if step:
                    nats, _ = scorer.nats(window, state if carry_memory else None)
                optimizer.zero_grad(set_to_none=True)
                nats.mean().backward()
                optimizer.step()
        state = detach(new_state)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


@dataclass
class Pass:
    """One way of scoring: its total bits per byte, its time, the nats of each byte (n_bytes,) and of each window
    (n_windows,: the sums of the bytes each window scored)."""

    name: str
    bpb: float
    seconds: float
    byte_nats: torch.Tensor
    window_nats: torch.Tensor


def score_bytes(model: nn.Module, data: bytes, settings: ScoreSettings = ScoreSettings(), adapt: bool = False,
                device: str | torch.device = "cpu", cache: bool = False) -> list[Pass]:
    """Score ``data`` with ``model`` (a ByteLM or NeatModel) every way that applies. ``model`` is moved to ``device``;
    its weights are unchanged (the adaptive passes learn in copies).

    Returns, in order: ``static``; ``memory`` (a NeatModel with an active Titans memory); with ``adapt``:
    ``adaptive`` for a ByteLM, ``gradient`` and ``memory + gradient`` for a memory model; with ``cache``, then each
    of those again as ``"<name> + cache"`` (its seconds include the pass it builds on and the counting).
    """
    if not data:
        raise ValueError("the input is empty (0 bytes)")
    model = model.to(device)
    ids = torch.cat([torch.tensor([EOS_ID]), ids_from_bytes(data)]).to(device)  # (N + 1,)
    spans = window_spans(len(data), settings.context, settings.stride)
    scorer = ByteScorer(model)
    ways: list[tuple[str, bool, bool]] = [("static", False, False)]  # (name, gradient, carry memory)
    if scorer.memory:
        ways.append(("memory", False, True))
    if adapt:
        ways += [("gradient", True, False), ("memory + gradient", True, True)] if scorer.memory else [
            ("adaptive", True, False)]
    passes = []
    for name, gradient, carry in ways:
        start = time.perf_counter()
        if name == "static":
            nats = static_scores(scorer, ids, spans, settings.batch_size)
        else:
            learner = copy.deepcopy(model) if gradient else model  # the weights of `model` never change
            nats = sequential_scores(ByteScorer(learner), ids, spans, settings, gradient, carry)
        seconds = time.perf_counter() - start
        nats = nats.cpu()
        passes.append(Pass(name, bits_per_byte(nats), seconds, nats, window_sums(nats, spans)))
    if cache:
        passes += with_cache(passes, data, spans, settings.cache_orders)
    return passes


def with_cache(passes: Sequence[Pass], data: bytes, spans: Sequence[tuple[int, int, int]],
               orders: tuple[int, int]) -> list[Pass]:
    """Each pass again with the byte-context cache over its per-byte probabilities (:func:`cache_nats`)."""
    from neat_lightning.components.byte_cache import cache_nats, context_counts

    start = time.perf_counter()
    lo, hi = orders
    counts = context_counts(data, hi, lo)
    counting = time.perf_counter() - start
    out = []
    for p in passes:
        start = time.perf_counter()
        nats = cache_nats(p.byte_nats, counts)
        seconds = p.seconds + counting + time.perf_counter() - start
        out.append(Pass(f"{p.name} + cache", bits_per_byte(nats), seconds, nats, window_sums(nats, spans)))
    return out


def bits_per_byte(byte_nats: torch.Tensor) -> float:
    """(n_bytes,) nats -> mean bits per byte."""
    return float(byte_nats.sum()) / len(byte_nats) / math.log(2)


def window_sums(byte_nats: torch.Tensor, spans: Sequence[tuple[int, int, int]]) -> torch.Tensor:
    """(n_bytes,) nats -> (n_windows,) the nats each window of ``spans`` scored (the scored ranges tile the bytes)."""
    return torch.stack([part.sum() for part in torch.split(byte_nats, [e - f for _, e, f in spans])])


# -- the command ---------------------------------------------------------------------------------------------------


def read_inputs(patterns: Sequence[str], field: str = "--input") -> tuple[list[Path], bytes]:
    """Files and globs -> (the files, their bytes concatenated). A missing file, a glob matching nothing or an empty
    result raise, naming ``field``."""
    from neat_lightning.data.loading import resolve_paths

    paths = resolve_paths(list(patterns), field)
    data = b"".join(p.read_bytes() for p in paths)
    if not data:
        raise ValueError(f"{field}: the input is empty (0 bytes in {len(paths)} files)")
    return paths, data


def describe_input(paths: Sequence[Path], data: bytes) -> str:
    """``179,902 bytes from 12 files (docs/architecture.md ... docs/vqvae.md), sha256 5d41402abc4b…``."""
    names = str(paths[0]) if len(paths) == 1 else f"{paths[0]} ... {paths[-1]}"
    return (f"{len(data):,} bytes from {len(paths)} file{'s' if len(paths) > 1 else ''} ({names}), "
            f"sha256 {hashlib.sha256(data).hexdigest()[:16]}…")


def add_scoring_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every scoring command shares (``neat score``, ``neat report``)."""
    d = ScoreSettings()
    parser.add_argument("--adapt", action="store_true",
                        help="also score prequentially: each window first, then Adam steps on it")
    parser.add_argument("--lr", type=float, default=d.lr, help=f"Adam learning rate of --adapt (default {d.lr})")
    parser.add_argument("--steps", type=int, default=d.steps, help=f"Adam steps per window (default {d.steps})")
    parser.add_argument("--context", type=int, default=d.context, help=f"ids per window (default {d.context})")
    parser.add_argument("--stride", type=int, default=None,
                        help=f"new bytes scored per window (default: half the context, {d.stride})")
    parser.add_argument("--batch-size", type=int, default=d.batch_size,
                        help=f"windows per forward of the static pass (default {d.batch_size})")
    parser.add_argument("--cache", action="store_true",
                        help="also score every pass with an online byte-context cache over the model")
    parser.add_argument("--cache-orders", type=int, nargs=2, default=d.cache_orders, metavar=("SHORTEST", "LONGEST"),
                        help=f"context lengths in bytes the cache counts (default {d.cache_orders[0]} "
                             f"{d.cache_orders[1]})")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default auto: cuda if present)")


def settings_from(args: argparse.Namespace) -> ScoreSettings:
    return ScoreSettings(args.context, args.stride, args.lr, args.steps, args.batch_size, tuple(args.cache_orders))


def device_from(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"--device={name!r} is not a device ({err})") from None


def describe_settings(settings: ScoreSettings, adapt: bool, cache: bool = False) -> str:
    """``windows of 256, 128 new bytes each; adaptive: Adam lr 0.0003, 1 step(s) per window; cache: orders 3-10``."""
    text = f"windows of {settings.context}, {settings.stride} new bytes each"
    text += f"; adaptive: Adam lr {settings.lr:g}, {settings.steps} step(s) per window" if adapt else ""
    return text + (f"; cache: orders {settings.cache_orders[0]}-{settings.cache_orders[1]}" if cache else "")


def results_dict(data: bytes, passes: list[Pass], compressors: dict[str, float], seconds: float) -> dict[str, Any]:
    """The ``--json`` object: ``bytes``, ``bpb``, ``bpb_adaptive`` (with --adapt), ``gzip9``, ``bz2_9``, ``xz9e``,
    ``seconds``; ``bpb_memory`` / ``bpb_gradient`` for a Titans model; with --cache ``bpb_cache`` (static + cache)
    and ``bpb_adaptive_cache``; the input's ``sha256``, ``bytes_per_s`` per pass."""
    by_name = {p.name: p for p in passes}
    out: dict[str, Any] = {"bytes": len(data), "bpb": by_name["static"].bpb}
    adaptive = by_name.get("memory + gradient") or by_name.get("adaptive")
    if adaptive is not None:
        out["bpb_adaptive"] = adaptive.bpb
    if "static + cache" in by_name:
        out["bpb_cache"] = by_name["static + cache"].bpb
    if adaptive is not None and f"{adaptive.name} + cache" in by_name:
        out["bpb_adaptive_cache"] = by_name[f"{adaptive.name} + cache"].bpb
    if "memory" in by_name:
        out["bpb_memory"] = by_name["memory"].bpb
    if "gradient" in by_name:
        out["bpb_gradient"] = by_name["gradient"].bpb
    out |= {"gzip9": compressors["gzip -9"], "bz2_9": compressors["bz2 -9"], "xz9e": compressors["xz -9e"],
            "seconds": seconds, "sha256": hashlib.sha256(data).hexdigest()}
    out["bytes_per_s"] = {p.name: len(data) / max(p.seconds, 1e-9) for p in passes}
    return out


def print_table(title: str, model_name: str, data: bytes, passes: list[Pass], compressors: dict[str, float],
                console=None) -> None:
    """Model passes and compressors, each with its bpb, its ratio to xz -9e and (model rows) bytes/s."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column, justify in (("method", "left"), ("bpb", "right"), ("vs xz -9e", "right"), ("bytes/s", "right")):
        table.add_column(column, justify=justify)
    xz = compressors["xz -9e"]
    for p in passes:
        table.add_row(f"{model_name} {p.name}", f"{p.bpb:.3f}", f"{p.bpb / xz - 1:+.1%}",
                      f"{len(data) / max(p.seconds, 1e-9):,.0f}")
    for name, bpb in compressors.items():
        table.add_row(name, f"{bpb:.3f}", f"{bpb / xz - 1:+.1%}", "")
    (console or Console()).print(table)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=doc_summary(__doc__),
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--ckpt", required=True, help="a ByteLM or NeatModel checkpoint")
    parser.add_argument("--input", required=True, nargs="+", metavar="FILE",
                        help="files or globs, concatenated in the order given (read as raw bytes)")
    parser.add_argument("--max-bytes", type=int, default=None, help="score only the first N bytes of the input")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout and nothing else")
    add_scoring_arguments(parser)
    args = parser.parse_args(argv)
    try:
        if args.max_bytes is not None and args.max_bytes < 1:
            raise ValueError(f"--max-bytes={args.max_bytes} must be >= 1")
        settings = settings_from(args)
        device = device_from(args.device)
        paths, data = read_inputs(args.input)
        data = data[: args.max_bytes] if args.max_bytes else data
        model = load_scorer(args.ckpt)
        info = checkpoint_summary(args.ckpt)
    except (FileNotFoundError, IsADirectoryError, ValueError) as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        return 2
    if not args.json:
        print(f"checkpoint: {describe_checkpoint(args.ckpt)}")
        print(f"input: {describe_input(paths, data)}")
    start = time.perf_counter()
    passes = score_bytes(model, data, settings, args.adapt, device, args.cache)
    compressors = compression_bpb(data)
    seconds = time.perf_counter() - start
    result = results_dict(data, passes, compressors, seconds)
    if args.json:
        print(json.dumps(result | {"checkpoint": info, "input": [str(p) for p in paths],
                                   "settings": asdict(settings) | {"adapt": args.adapt, "cache": args.cache}}))
        return 0
    n_params = sum(p.numel() for p in model.parameters())
    print_table(f"Bits per byte ({len(data):,} bytes; {describe_settings(settings, args.adapt, args.cache)})",
                f"{type(model).__name__} ({n_params:,} params)", data, passes, compressors)
    print(f"{seconds:.1f} s in all")
    return 0
