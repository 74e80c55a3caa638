"""Entropy patching benchmark: throughput (entropy model included), calibration accuracy, adaptive control.

    python benchmarks/patching.py              # uses runs/quickstart/checkpoints/last.ckpt if it exists
    python benchmarks/patching.py --ckpt runs/x/checkpoints/last.ckpt --compile
    python benchmarks/patching.py --quick      # smaller inputs, fewer settings

1. Throughput in MB/s of bytes patched (next-byte entropies + global rule + patch lengths) for the quickstart-size
   ByteLM (dim 128, 2 layers, 4 heads, block 256: the checkpoint's weights if given, else random init; speed does
   not depend on the weights) under several settings, and for smaller models, to see which size reaches 1 MB/s.
2. ``calibrate_threshold`` accuracy: calibrate on the built-in corpus's training documents, measure the mean patch
   size on its held-out documents (needs trained weights to mean anything; random init is reported as such).
3. ``AdaptiveEntropyThreshold`` over a 1 MB stream (the built-in corpus, documents reshuffled each pass, since the
   corpus is ~466 KB): boundary ratio after a short warm-up, per 64 KB block and per batch.

Prints tables and writes ``benchmarks/results/patching.json`` (atomically).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from neat_lightning.codec import ids_from_bytes
from neat_lightning.components.entropy import next_byte_entropies
from neat_lightning.components.patch_threshold import AdaptiveEntropyThreshold, calibrate_threshold
from neat_lightning.components.patching import (
    Patcher,
    PatcherConfig,
    global_start_mask,
    patch_lengths_from_start_mask,
    patch_statistics,
)
from neat_lightning.components.transformer import ByteTransformer, TransformerConfig
from neat_lightning.data.bytes import builtin_documents, split_documents, stream_from_documents

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "patching.json"
DEFAULT_CKPT = ROOT / "runs" / "quickstart" / "checkpoints" / "last.ckpt"
MB = 1e6

# (name, dim, n_layers, heads): the quickstart model, then smaller ones
SIZES = [
    ("quickstart d128 L2", 128, 2, 4),
    ("d96 L2", 96, 2, 4),
    ("d64 L2", 64, 2, 2),
    ("d64 L1", 64, 1, 2),
    ("d32 L1", 32, 1, 2),
    ("d16 L1", 16, 1, 2),
]


def flops_per_byte(cfg: TransformerConfig, context: float) -> float:
    """Forward FLOPs per byte: 2 x matmul weights (blocks + head) + attention scores and values over ``context``."""
    per_layer = 4 * cfg.dim * cfg.dim + 3 * cfg.dim * cfg.hidden
    return 2 * (cfg.n_layers * per_layer + cfg.dim * cfg.vocab_size) + 4 * cfg.n_layers * cfg.dim * context


def corpus_ids(n_bytes: int) -> torch.Tensor:
    data = b"".join(d.data for d in builtin_documents())
    reps = math.ceil(n_bytes / len(data))
    return ids_from_bytes((data * reps)[:n_bytes])[None]  # (1, N)


def timed(fn, repeats: int) -> tuple[float, float]:
    """Best wall time and best process CPU time (all threads) of ``repeats`` calls after one warm-up call.

    On a shared machine the wall time depends on the other load; CPU seconds much less so.
    """
    fn()
    wall, cpu = math.inf, math.inf
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall, cpu = min(wall, time.perf_counter() - t0), min(cpu, time.process_time() - c0)
    return wall, cpu


def load_model(ckpt: Path | None) -> tuple[torch.nn.Module, str]:
    if ckpt is not None:
        from neat_lightning.modules.byte_lm import ByteLM

        lm = ByteLM.load_from_checkpoint(ckpt, map_location="cpu").eval()
        return lm.model, f"checkpoint {ckpt}"
    torch.manual_seed(0)
    return ByteTransformer(TransformerConfig(dim=128, n_layers=2, heads=4, block_size=256)).eval(), "random init"


# ----------------------------------------------------------------------------------------------------------------------


def bench_throughput(model: torch.nn.Module, n_bytes: int, repeats: int, quick: bool, use_compile: bool) -> list[dict]:
    ids = corpus_ids(n_bytes)
    rows = []

    def patch_once(m, **kw):
        def fn():
            h = next_byte_entropies(m, ids, **kw)
            patch_lengths_from_start_mask(global_start_mask(h, 2.0))
        return fn

    def add(name, cfg, fn, n=n_bytes, note=""):
        seconds, cpu_seconds = timed(fn, repeats)
        params = sum(p.numel() for p in ByteTransformer(cfg).parameters())
        mbs = n / seconds / MB
        fpb = flops_per_byte(cfg, cfg.block_size / 2)
        rows.append(dict(setting=name, dim=cfg.dim, n_layers=cfg.n_layers, heads=cfg.heads, block_size=cfg.block_size,
                         params=params,
                         bytes=n, seconds=seconds, mb_per_s=mbs, cpu_seconds=cpu_seconds,
                         mb_per_cpu_s=n / cpu_seconds / MB, gflop_per_s=mbs * MB * fpb / 1e9,
                         mflop_per_byte=fpb / 1e6, note=note))
        print(f"  {name:<54} {mbs:8.4f} MB/s {rows[-1]['mb_per_cpu_s']:8.4f} MB/cpu-s "
              f"{rows[-1]['gflop_per_s']:6.1f} GFLOP/s  {fpb / 1e6:6.3f} MFLOP/B", flush=True)

    cfg = model.config
    print(f"throughput on {n_bytes / 1e3:.0f} KB of the built-in corpus (best of {repeats})")
    patch_once(model)()  # a throwaway pass: the process's first pass pays for allocator growth and lazy inits
    settings = [("defaults (batch_windows=16, overlap 0)", dict())]
    if not quick:
        settings += [
            ("batch_windows=8", dict(batch_windows=8)),
            ("batch_windows=64", dict(batch_windows=64)),
            ("batch_windows=256", dict(batch_windows=256)),
            ("context_overlap=128", dict(context_overlap=128)),
            ("reset_at_newline", dict(reset_at_newline=True)),
            ("block_size=64 (less context: other entropies)", dict(block_size=64)),
        ]
    for name, kw in settings:
        add(f"quickstart d128 L2: {name}", cfg, patch_once(model, **kw))

    # what inference_mode buys over a plain forward that records autograd
    windows = ids[0, : (n_bytes // cfg.block_size) * cfg.block_size].reshape(-1, cfg.block_size)

    def plain_forward():
        with torch.enable_grad():
            for chunk in windows.split(16):
                model(chunk).sum()

    def inference_forward():
        with torch.inference_mode():
            for chunk in windows.split(16):
                model(chunk).sum()

    add("quickstart d128 L2: forward only, autograd on", cfg, plain_forward, n=windows.numel())
    add("quickstart d128 L2: forward only, inference_mode", cfg, inference_forward, n=windows.numel())

    if use_compile:
        try:
            compiled = torch.compile(model, dynamic=False)  # a few window widths: one graph each
            add("quickstart d128 L2: torch.compile", cfg, patch_once(compiled, block_size=cfg.block_size),
                note="torch.compile(dynamic=False); compile time is in the warm-up call")
        except Exception as exc:  # compile is optional; report why it did not run
            rows.append(dict(setting="torch.compile", error=f"{type(exc).__name__}: {exc}"[:300]))
            print(f"  torch.compile failed: {type(exc).__name__}: {exc}"[:300])

    if not quick:  # the headline setting again, to show the run-to-run spread on a shared machine
        add("quickstart d128 L2: defaults, measured again", cfg, patch_once(model))

    for name, dim, layers, heads in SIZES[1:]:
        torch.manual_seed(0)
        small_cfg = TransformerConfig(dim=dim, n_layers=layers, heads=heads, block_size=256)
        small = ByteTransformer(small_cfg).eval()
        add(f"{name}: defaults", small_cfg, patch_once(small))

    # the rules alone, given entropies
    h = torch.rand(1, 4_000_000) * 4

    def rules_only():
        patch_lengths_from_start_mask(global_start_mask(h, 3.5))

    seconds, cpu_seconds = timed(rules_only, repeats)
    rows.append(dict(setting="rules + lengths only (given entropies)", bytes=h.numel(), seconds=seconds,
                     mb_per_s=h.numel() / seconds / MB, cpu_seconds=cpu_seconds,
                     mb_per_cpu_s=h.numel() / cpu_seconds / MB))
    print(f"  {'rules + lengths only (given entropies)':<54} {rows[-1]['mb_per_s']:8.1f} MB/s")
    return rows


TARGETS = [(3.0, None), (4.5, None), (6.0, None), (4.5, 8)]


def mean_patch_size(h: torch.Tensor, theta: float, max_patch_length: int | None) -> float:
    patcher = Patcher(PatcherConfig(threshold=theta, max_patch_length=max_patch_length))
    return patch_statistics(patcher(torch.zeros_like(h, dtype=torch.long), entropies=h))["mean_size"]


def bench_calibration(model: torch.nn.Module, max_bytes: int | None, seeds: int = 20, block: int = 2048) -> dict:
    """Calibrate on half of the built-in corpus, measure the mean patch size on the other half, over ``seeds``
    random halvings of two kinds:

    * ``document split``: half of the documents (``split_documents(docs, 0.5, seed)``) against the other half;
    * ``interleaved``: the stream cut into ``block``-byte pieces, a random half of the pieces against the rest.

    The entropies are computed once, over the corpus as the model was trained on it (documents joined by EOS).
    """
    docs = builtin_documents()
    ids = stream_from_documents(docs).long()[None]
    if max_bytes is not None:
        ids = ids[:, :max_bytes]
    t0 = time.perf_counter()
    h = next_byte_entropies(model, ids)  # (1, N)
    seconds = time.perf_counter() - t0
    print(f"calibration: entropies of the built-in corpus, {ids.shape[1] / 1e3:.0f} KB, in {seconds:.1f} s; mean "
          f"{float(h.mean()):.3f} nats ({float(h.mean()) / math.log(2):.3f} bits/byte)")
    spans, at = {}, 0  # document name -> (start, end) in the stream, its EOS included
    for d in docs:
        spans[d.name] = (at, min(at + len(d.data) + 1, ids.shape[1]))
        at += len(d.data) + 1
    n = h.shape[1] // block * block
    pieces = h[0, :n].reshape(-1, block)

    def halves(kind: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        if kind == "document split":
            fit_docs, held_docs = split_documents(docs, 0.5, seed=seed)
            take = lambda ds: torch.cat([h[0, slice(*spans[d.name])] for d in ds if spans[d.name][0] < n])[None]
            return take(fit_docs), take(held_docs)
        order = torch.randperm(len(pieces), generator=torch.Generator().manual_seed(seed))
        return pieces[order[: len(order) // 2]], pieces[order[len(order) // 2 :]]

    rows = []
    for kind in ("document split", f"interleaved {block} B"):
        for target, m in TARGETS:
            errors = []
            for seed in range(seeds):
                fit, held = halves(kind, seed)
                theta = calibrate_threshold(fit, target, max_patch_length=m)
                assert abs(mean_patch_size(fit, theta, m) / target - 1) < 0.01, "calibration missed on its own data"
                errors.append(mean_patch_size(held, theta, m) / target - 1)
            e = torch.tensor(errors)
            rows.append(dict(split=kind, target=target, max_patch_length=m, seeds=seeds,
                             mean_rel_error=float(e.mean()), mean_abs_rel_error=float(e.abs().mean()),
                             max_abs_rel_error=float(e.abs().max()),
                             within_1pct=float((e.abs() <= 0.01).float().mean())))
            r = rows[-1]
            print(f"  {kind:<22} target {target:4.1f} m={m}: held-out error mean {100 * r['mean_rel_error']:+.2f}%, "
                  f"mean |err| {100 * r['mean_abs_rel_error']:.2f}%, max |err| {100 * r['max_abs_rel_error']:.2f}%, "
                  f"within 1% in {100 * r['within_1pct']:.0f}% of {seeds} splits")
    return dict(corpus_bytes=int(ids.shape[1]), documents=len(docs), entropy_seconds=seconds,
                mean_entropy_nats=float(h.mean()), rows=rows)


def ratio_summary(ratios: list[float], batches_per_64kb: int, target: float) -> dict:
    blocks = [statistics.fmean(ratios[i : i + batches_per_64kb])
              for i in range(0, len(ratios) - batches_per_64kb + 1, batches_per_64kb)]
    return dict(
        ratio=statistics.fmean(ratios),
        per_64kb_min=min(blocks), per_64kb_max=max(blocks),
        per_64kb_max_abs_dev_points=100 * max(abs(b - target) for b in blocks),
        per_batch_min=min(ratios), per_batch_max=max(ratios), per_batch_sd=statistics.pstdev(ratios),
        fraction_batches_within_1pt=sum(abs(r - target) <= 0.01 for r in ratios) / len(ratios),
    )


def bench_adaptive(model: torch.nn.Module, stream_bytes: int, batch: int, block: int, warmup_batches: int) -> dict:
    """Step the controller over ``stream_bytes`` of the built-in corpus in (batch, block) batches, as a training loop
    would; compare with the best fixed threshold in hindsight (calibrated on the same stream after warm-up)."""
    docs = builtin_documents()
    rng = random.Random(0)
    order, total = [], 0
    while total < stream_bytes:  # the corpus is ~466 KB: reshuffle its documents on each pass
        perm = list(range(len(docs)))
        rng.shuffle(perm)
        order += perm
        total += sum(len(docs[i].data) + 1 for i in perm)
    n_batches = stream_bytes // (batch * block)
    ids = stream_from_documents([docs[i] for i in order]).long()[None, : n_batches * batch * block]
    t0 = time.perf_counter()
    h = next_byte_entropies(model, ids)  # one long stream: windows of the model's context
    seconds = time.perf_counter() - t0
    batches = h.reshape(n_batches, batch, block)
    target = 0.1
    ctrl = AdaptiveEntropyThreshold(target_boundary_ratio=target, initial_threshold=2.0)  # θ₀ of the results
    ratios, thresholds = [], []
    for hb in batches:  # a loop over batches, as in training
        thresholds.append(ctrl.threshold)
        ratios.append(float(ctrl.step(hb).float().mean()))
    per_64kb = max(1, 65536 // (batch * block))
    adaptive = ratio_summary(ratios[warmup_batches:], per_64kb, target)
    fixed_theta = calibrate_threshold(batches[warmup_batches:].reshape(-1, block), 1 / target)
    fixed = ratio_summary([float(global_start_mask(hb, fixed_theta).float().mean()) for hb in batches[warmup_batches:]],
                          per_64kb, target)
    result = dict(
        stream_bytes=int(ids.shape[1]), batch=batch, block=block, batches=n_batches, warmup_batches=warmup_batches,
        warmup_bytes=warmup_batches * batch * block, entropy_seconds=seconds, target=target,
        controller=dict(gain=ctrl.gain, ema_decay=ctrl.ema_decay, initial_threshold=thresholds[0]),
        adaptive=adaptive, threshold_min=min(thresholds[warmup_batches:]),
        threshold_max=max(thresholds[warmup_batches:]), final_state=ctrl.state_dict(),
        fixed_threshold_in_hindsight=dict(threshold=fixed_theta, **fixed),
    )
    for name, r in (("adaptive", adaptive), (f"fixed θ={fixed_theta:.3f} (hindsight)", fixed)):
        print(f"  {name:<28} ratio {r['ratio']:.4f}; per 64 KB [{r['per_64kb_min']:.4f}, {r['per_64kb_max']:.4f}] "
              f"(max dev {r['per_64kb_max_abs_dev_points']:.2f} pt); per batch [{r['per_batch_min']:.4f}, "
              f"{r['per_batch_max']:.4f}] sd {r['per_batch_sd']:.4f}, {100 * r['fraction_batches_within_1pt']:.0f}% "
              f"within ±1 pt")
    print(f"  over {result['stream_bytes'] / 1e6:.2f} MB: {n_batches} batches of {batch}x{block}, warm-up "
          f"{warmup_batches} batches; θ in [{result['threshold_min']:.3f}, {result['threshold_max']:.3f}]")
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", type=Path, default=DEFAULT_CKPT if DEFAULT_CKPT.exists() else None,
                   help="ByteLM checkpoint (default: runs/quickstart/checkpoints/last.ckpt when present).")
    p.add_argument("--bytes", type=int, default=65536, help="Bytes per throughput measurement.")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--stream-bytes", type=int, default=1_000_000, help="Adaptive controller stream length.")
    p.add_argument("--calibration-bytes", type=int, default=None,
                   help="Bytes of the corpus to calibrate on (default: all of it, ~466 KB).")
    p.add_argument("--seeds", type=int, default=20, help="Random halvings of the corpus for calibration.")
    p.add_argument("--batch", type=int, default=32, help="Adaptive controller: rows of 256 bytes per batch.")
    p.add_argument("--warmup", type=int, default=10, help="Adaptive controller: warm-up batches not counted.")
    p.add_argument("--compile", action="store_true", help="Also time torch.compile of the entropy model.")
    p.add_argument("--quick", action="store_true", help="Small inputs and fewer settings (a smoke run).")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.quick:
        args.bytes, args.repeats, args.stream_bytes, args.calibration_bytes = 16384, 1, 131072, 65536
        args.batch, args.warmup, args.seeds = 8, 10, 3

    load_before = os.getloadavg()
    model, source = load_model(args.ckpt)
    print(f"entropy model: {source}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load average {load_before[0]:.1f} on {os.cpu_count()} CPUs")
    throughput = bench_throughput(model, args.bytes, args.repeats, args.quick, args.compile)
    calibration = bench_calibration(model, args.calibration_bytes, seeds=args.seeds)
    adaptive = bench_adaptive(model, args.stream_bytes, batch=args.batch, block=256, warmup_batches=args.warmup)

    reaching = [r for r in throughput if r.get("dim") and r["mb_per_s"] >= 1.0 and "forward only" not in r["setting"]]
    biggest = max(reaching, key=lambda r: r["params"], default=None)
    summary = dict(
        quickstart_mb_per_s=throughput[0]["mb_per_s"],
        target_mb_per_s=1.0,
        target_reached_by_quickstart=throughput[0]["mb_per_s"] >= 1.0,
        largest_size_reaching_target=None if biggest is None else biggest["setting"].split(":")[0],
        calibration_mean_abs_rel_error=statistics.fmean(r["mean_abs_rel_error"] for r in calibration["rows"]),
        calibration_within_1pct=statistics.fmean(r["within_1pct"] for r in calibration["rows"]),
        adaptive_ratio_after_warmup=adaptive["adaptive"]["ratio"],
        adaptive_per_64kb_max_abs_dev_points=adaptive["adaptive"]["per_64kb_max_abs_dev_points"],
    )
    print("summary:", json.dumps(summary, indent=2))
    result = dict(
        benchmark="patching", entropy_model=source, quick=args.quick,
        machine=dict(platform=platform.platform(), processor=platform.processor() or platform.machine(),
                     cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(), torch=torch.__version__,
                     python=sys.version.split()[0], load_average_before=load_before,
                     load_average_after=os.getloadavg()),
        summary=summary, throughput=throughput, calibration=calibration, adaptive=adaptive,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
