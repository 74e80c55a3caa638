"""Bits per byte by position in long held-out documents: NeatModel with and without Titans memory on real text.

Both variants are the same NeatModel (sliding-window attention of ``--window`` bytes, ``--block-size`` training
windows); one has the Titans memory in its last block, the other a wider MLP so both hold the same number of
parameters (within 1 %). Each trains ``--steps`` steps (the same for both, so neither gets more updates;
``--max-minutes`` caps the wall time instead) on the built-in corpus ``stdlib_docs``
(``ByteTextDataModule(builtin=...)``), on ``--block-size`` windows through which the memory state is carried. Then every held-out document of at least ``--min-doc`` bytes is read from its
first byte in consecutive segments of ``--block-size`` bytes, the memory state carried from segment to segment (as
``NeatModel`` streams: attention restarts at each segment, the memory does not), up to ``--max-doc`` bytes; the
next-byte loss is binned by position (``--bin`` bytes per bin) and averaged over the documents reaching each bin.

    OMP_NUM_THREADS=1 python benchmarks/neat_memory_position.py            # 1000 steps each, ~20 + 13 CPU-minutes
    python benchmarks/neat_memory_position.py --steps 3 --max-doc 2048   # smoke run

Writes ``benchmarks/results/neat_memory_position.json`` (bpb per bin and variant, documents and bytes per bin,
training steps, CPU seconds) and ``neat_memory_position.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "neat_memory_position.json"
VARIANTS = ("window_only", "titans")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--corpus", default="stdlib_docs")
    p.add_argument("--steps", type=int, default=1000, help="training steps (the cosine schedule's length)")
    p.add_argument("--max-minutes", type=float, default=None, help="wall-clock training budget per variant")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--block-size", type=int, default=2048, help="training window; the memory is carried within it")
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--dim-memory", type=int, default=32)
    p.add_argument("--memory-depth", type=int, default=1)
    p.add_argument("--chunk-size", type=int, default=16)
    p.add_argument("--max-lr", type=float, default=1.0)
    p.add_argument("--bin", type=int, default=512, help="bytes per position bin")
    p.add_argument("--min-doc", type=int, default=2048, help="held-out documents shorter than this are skipped")
    p.add_argument("--max-doc", type=int, default=16384, help="bytes read from each document")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs-dir", default=str(REPO / "runs" / "neat_memory_position"))
    p.add_argument("--out", default=str(RESULTS))
    return p.parse_args(argv)


def build_model(args: argparse.Namespace, variant: str, mlp_hidden: int | None = None):
    from neat_lightning.components.titans import TitansConfig
    from neat_lightning.modules.neat import NeatModel

    titans = variant == "titans"
    tc = TitansConfig(dim_memory=args.dim_memory, memory_depth=args.memory_depth, chunk_size=args.chunk_size,
                      persistent_tokens=4, memory_size=256, max_lr=args.max_lr)
    return NeatModel(
        dim=args.dim, n_layers=args.layers, heads=4, block_size=args.block_size, window=args.window,
        mlp_hidden=mlp_hidden, titans=titans, titans_config=tc, svf=False,
        active_components=["titans"] if titans else [], learning_rate=args.lr,
        warmup_steps=min(100, args.steps // 10 + 1),
    )


def params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def matched_hidden(args: argparse.Namespace) -> int:
    """The MLP width of the window-only model whose parameter count is closest to the Titans model's."""
    target = params(build_model(args, "titans"))
    return min(range(32, 16 * args.dim, 8), key=lambda h: abs(params(build_model(args, "window_only", h)) - target))


def position_nats(model, docs, args: argparse.Namespace):
    """Sum of next-byte nats and byte counts per bin, over documents read in carried-memory segments."""
    import torch
    import torch.nn.functional as F

    from neat_lightning.codec import OFFSET

    n_bins = math.ceil(args.max_doc / args.bin)
    nats, count, n_docs = [0.0] * n_bins, [0] * n_bins, [0] * n_bins
    for doc in docs:
        data = bytes(doc.data[: args.max_doc + 1])
        ids = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()[None] + OFFSET  # (1, N)
        states = None
        per_pos = []
        for s in range(0, ids.shape[1] - 1, args.block_size):
            x, y = ids[:, s : s + args.block_size], ids[:, s + 1 : s + args.block_size + 1]
            x = x[:, : y.shape[1]]
            logits, out = model.run(x, states=states)
            states = out.states
            per_pos.append(F.cross_entropy(logits[0], y[0], reduction="none"))
        per_pos = torch.cat(per_pos)
        for b in range(n_bins):
            chunk = per_pos[b * args.bin : (b + 1) * args.bin]
            if len(chunk):
                nats[b] += float(chunk.sum())
                count[b] += len(chunk)
                n_docs[b] += 1
    return nats, count, n_docs


def run_variant(args: argparse.Namespace, variant: str, hidden: int | None, data) -> dict:
    import lightning as L
    import torch

    L.seed_everything(args.seed, verbose=False)
    model = build_model(args, variant, hidden)
    t0, c0 = time.perf_counter(), cpu_seconds()
    trainer = L.Trainer(
        accelerator="auto", devices=1, max_steps=args.steps,
        max_time=None if args.max_minutes is None else {"seconds": int(args.max_minutes * 60)},
        logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        limit_val_batches=0, gradient_clip_val=1.0, default_root_dir=args.runs_dir,
    )
    trainer.fit(model, data)
    train_s, train_cpu = time.perf_counter() - t0, cpu_seconds() - c0
    Path(args.runs_dir).mkdir(parents=True, exist_ok=True)
    trainer.save_checkpoint(Path(args.runs_dir) / f"{variant}.ckpt")
    model.eval()
    docs = [d for d in data.val_docs if len(d.data) >= args.min_doc]
    c1 = cpu_seconds()
    with torch.inference_mode():
        nats, count, n_docs = position_nats(model, docs, args)
    bpb = [round(n / c / math.log(2), 4) if c else None for n, c in zip(nats, count)]
    print(f"{variant}: {trainer.global_step} steps in {train_s:.0f} s; bpb by bin {bpb}", file=sys.stderr, flush=True)
    return {
        "variant": variant, "params": params(model), "mlp_hidden": model.model.config.hidden,
        "steps": int(trainer.global_step), "train_s": round(train_s, 1), "train_cpu_s": round(train_cpu, 1),
        "eval_cpu_s": round(cpu_seconds() - c1, 1),
        "final_train_loss": round(float(trainer.callback_metrics.get("train/loss", float("nan"))), 4),
        "bpb": bpb, "bytes": count, "documents": n_docs,
        "bpb_all": round(sum(nats) / sum(count) / math.log(2), 4),
    }


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    b = payload["settings"]["bin"]
    for r in payload["results"]:
        xs = [(i + 0.5) * b for i, v in enumerate(r["bpb"]) if v is not None]
        ax.plot(xs, [v for v in r["bpb"] if v is not None], marker="o", ms=3,
                label=f"{r['variant']} ({r['params'] / 1e3:.0f}k params, {r['steps']} steps)")
    ax.axvline(payload["settings"]["window"], color="grey", ls=":", lw=1, label="attention window")
    ax.set_xlabel(f"position in document (bytes; bins of {b})")
    ax.set_ylabel("bits per byte (held-out)")
    ax.set_title(f"{payload['settings']['corpus']}: segments of {payload['settings']['block_size']} bytes, memory carried")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from neat_lightning.data.bytes import ByteTextDataModule

    warnings.filterwarnings("ignore")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    hidden = matched_hidden(args) if "window_only" in args.variants else None  # the Titans model's parameter count
    data = ByteTextDataModule(builtin=args.corpus, block_size=args.block_size, batch_size=args.batch_size,
                              batches_per_epoch=args.steps, seed=args.seed)
    data.setup()
    results = [run_variant(args, v, hidden if v == "window_only" else None, data) for v in args.variants]
    print(f"bpb by position (bins of {args.bin} bytes; memory carried over segments of {args.block_size})")
    print(f"{'bin start':>9} " + " ".join(f"{r['variant']:>12}" for r in results) + "  documents")
    for i in range(len(results[0]["bpb"])):
        if results[0]["bpb"][i] is None:
            continue
        print(f"{i * args.bin:>9} " + " ".join(f"{r['bpb'][i]:>12.4f}" for r in results)
              + f"  {results[0]['documents'][i]:>9}")
    print(f"{'all':>9} " + " ".join(f"{r['bpb_all']:>12.4f}" for r in results))
    payload = {
        "benchmark": "neat_memory_position",
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "runs_dir")},
        "cpu_threads": torch.get_num_threads(),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, out)
    plot(payload, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
