"""ByteLM training throughput through ``lightning.Trainer`` vs a plain PyTorch loop, and patcher throughput.

Same model, same DataModule batches, same AdamW (constant LR), same number of timed steps after a warm-up. Runs
alternate (plain, Lightning, plain, ...) so that load from other processes hits both alike; the median is reported.

    python benchmarks/byte_lm.py                 # quickstart size (dim 128, 2 layers, block 256, batch 32)
    python benchmarks/byte_lm.py --steps 30 --repeats 3 --dim 128

Prints a table and writes benchmarks/results/byte_lm.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import time
from pathlib import Path

import lightning as L
import torch

from neat_lightning.data.bytes import ByteTextDataModule
from neat_lightning.modules.byte_lm import ByteLM

RESULTS = Path(__file__).parent / "results"


class ConstantLR(ByteLM):
    """The same model with a plain AdamW, so both loops do identical work per step."""

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


class StepTimer(L.Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.end = warmup, None, None

    def on_train_batch_start(self, trainer, *args) -> None:
        if trainer.global_step == self.warmup:
            self.start = time.perf_counter()

    def on_train_end(self, trainer, *args) -> None:
        self.end = time.perf_counter()


def make(args) -> tuple[ConstantLR, ByteTextDataModule]:
    torch.manual_seed(0)
    model = ConstantLR(dim=args.dim, n_layers=args.layers, heads=args.heads, block_size=args.block)
    dm = ByteTextDataModule(block_size=args.block, batch_size=args.batch, batches_per_epoch=10_000)
    dm.setup("fit")
    return model, dm


def plain_loop(args) -> float:
    """Seconds per step of a hand-written loop."""
    model, dm = make(args)
    opt = model.configure_optimizers()
    model.train()
    it = iter(dm.train_dataloader())
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            start = time.perf_counter()
        batch = next(it)
        loss, _ = model.loss(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return (time.perf_counter() - start) / args.steps


def lightning_loop(args, logging: bool) -> float:
    model, dm = make(args)
    timer = StepTimer(args.warmup)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=args.warmup + args.steps, limit_val_batches=0,
        logger=L.pytorch.loggers.CSVLogger("/tmp/neat_bench_logs") if logging else False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[timer],
        log_every_n_steps=50,
    )
    trainer.fit(model, dm)
    return (timer.end - timer.start) / args.steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--block", type=int, default=256)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=RESULTS / "byte_lm.json")
    args = p.parse_args()

    times: dict[str, list[float]] = {"plain loop": [], "Lightning": [], "Lightning + CSV logging": []}
    for _ in range(args.repeats):
        times["plain loop"].append(plain_loop(args))
        times["Lightning"].append(lightning_loop(args, logging=False))
        times["Lightning + CSV logging"].append(lightning_loop(args, logging=True))
    bytes_per_step = args.batch * args.block
    median = {k: statistics.median(v) for k, v in times.items()}
    base = median["plain loop"]
    rows = [
        {"loop": k, "s_per_step": s, "bytes_per_s": bytes_per_step / s, "overhead_vs_plain": s / base - 1,
         "runs_s_per_step": times[k]}
        for k, s in median.items()
    ]
    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    patching = None
    try:  # the patching benchmark (a sibling script, so on sys.path) owns that measurement
        from patching import patcher_throughput
    except ImportError:
        patcher_throughput = None
    if patcher_throughput is not None:
        patching = patcher_throughput(dim=args.dim, n_layers=args.layers, heads=args.heads, block_size=args.block)

    print(f"ByteLM dim={args.dim} layers={args.layers} block={args.block} batch={args.batch}, "
          f"{args.steps} timed steps x {args.repeats} runs, torch threads={torch.get_num_threads()}")
    print(f"{'loop':<26}{'s/step':>10}{'bytes/s':>12}{'overhead':>10}")
    for r in rows:
        print(f"{r['loop']:<26}{r['s_per_step']:>10.4f}{r['bytes_per_s']:>12,.0f}{r['overhead_vs_plain']:>+10.1%}")
    if patching is not None:
        print(f"patcher throughput (entropy model included): {patching['mb_per_s']:.3f} MB/s")
    print(f"peak RSS: {peak_rss_mib:,.0f} MiB")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "lightning": L.__version__},
        "training": rows, "patching": patching, "peak_rss_mib": peak_rss_mib,
    }
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(args.out)  # atomic: a crash never leaves half a JSON file


if __name__ == "__main__":
    main()
