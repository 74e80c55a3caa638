"""BLT vs a plain byte transformer at matched training FLOPs on the built-in corpus.

Both models are NeatModels (Titans and SVF not built): ``frontend="bytes"`` (byte embeddings into the transformer)
and ``frontend="blt"`` (hash n-gram embeddings, local encoder, latent transformer over entropy patches, local
decoder; the entropy model is a frozen ByteLM). Both train on the same ByteTextDataModule batches (built-in corpus,
default split) with the same optimizer and schedule rule, and are scored on the same validation bytes.

FLOP counting rule: ``torch.utils.flop_counter.FlopCounterMode`` around whole training steps (forward + backward +
for BLT the entropy model's forward, which runs inside every step), averaged over a few batches. It counts matrix
products and attention (2 FLOPs per multiply-add); elementwise ops, norms, softmax and the optimizer are not
counted. Attention is counted over the full T x S score matrix, causal or masked, for both models. Matched FLOPs:
BLT gets ``steps_plain * flops_plain / flops_blt`` steps (rounded), so both spend the same training FLOPs.

    OMP_NUM_THREADS=1 python benchmarks/blt.py --entropy-ckpt runs/patching_entropy_lm/checkpoints/last.ckpt
    OMP_NUM_THREADS=1 python benchmarks/blt.py --only blt ...   # one model per process (run two side by side)

Prints a table and writes benchmarks/results/blt.json (``--only`` merges its model into the existing file).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from neat_lightning.components.blt import BLTConfig, default_patcher
from neat_lightning.components.patching import patch_statistics
from neat_lightning.data.bytes import ByteTextDataModule
from neat_lightning.modules.neat import NeatModel

RESULTS = Path(__file__).parent / "results"


def build(kind: str, args) -> NeatModel:
    torch.manual_seed(0)
    common = dict(block_size=args.block, window=None, titans=False, svf=False, active_components=[],
                  learning_rate=args.lr, warmup_steps=args.warmup, min_lr_ratio=0.1)
    if kind == "plain":
        return NeatModel(dim=args.plain_dim, n_layers=args.plain_layers, heads=args.plain_dim // 32, **common)
    patcher = replace(default_patcher(), mode=args.patching, threshold=args.initial_threshold,
                      patch_size=args.static_patch_size)
    blt = BLTConfig(dim_local=args.local_dim, heads_local=args.local_dim // 32, cross_heads=args.local_dim // 32,
                    encoder_layers=args.encoder_layers, decoder_layers=args.decoder_layers, window_local=None,
                    hash_vocab=args.hash_vocab, patcher=patcher, target_boundary_ratio=args.boundary_ratio)
    return NeatModel(dim=args.latent_dim, n_layers=args.latent_layers, heads=args.latent_dim // 32, frontend="blt",
                     blt_config=blt, entropy_model_ckpt=str(args.entropy_ckpt), **common)


def train_step(model: NeatModel, opt, sched, batch: torch.Tensor) -> dict:
    terms = model.loss_terms(batch)
    opt.zero_grad(set_to_none=True)
    terms.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
    return terms


def flops_per_step(kind: str, args, batches: list[torch.Tensor]) -> float:
    model = build(kind, args)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # no weight change; adaptive threshold moves as in training
    total = 0
    for batch in batches:
        with FlopCounterMode(display=False) as counter:
            terms = model.loss_terms(batch)
            terms.loss.backward()
        opt.zero_grad(set_to_none=True)
        total += counter.get_total_flops()
    return total / len(batches)


@torch.no_grad()
def evaluate(model: NeatModel, val_batches: list[torch.Tensor]) -> dict:
    model.eval()
    nats = count = 0.0
    lengths = []
    for batch in val_batches:
        terms = model.loss_terms(batch)
        nats += float((terms.nats * terms.valid).sum())
        count += float(terms.valid.sum())
        if terms.patch_lengths is not None:
            lengths.append(terms.patch_lengths.reshape(-1))
    model.train()
    out = {"val_bpb": nats / count / math.log(2), "val_bytes": int(count)}
    if lengths:
        flat = torch.cat(lengths)
        out["val_patch"] = patch_statistics(flat[flat > 0][None])
    return out


def run(kind: str, steps: int, args, dm: ByteTextDataModule, val_batches: list[torch.Tensor]) -> dict:
    model = build(kind, args)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: schedule(s, steps, args.warmup))
    train = dm.train_dataloader()
    it = iter(train)
    start = time.perf_counter()
    losses, sizes = [], []
    for step in range(steps):
        try:
            batch = next(it)
        except StopIteration:
            it = iter(train)
            batch = next(it)
        terms = train_step(model, opt, sched, batch)
        losses.append(terms.loss.item())
        if terms.patch_lengths is not None:
            lengths = terms.patch_lengths
            sizes.append(float(lengths.sum() / (lengths > 0).sum()))
        if step % 100 == 0 or step == steps - 1:
            msg = f"{kind} step {step}/{steps} loss {losses[-1]:.3f} {time.perf_counter() - start:.0f}s"
            if sizes:
                msg += f" patch {sizes[-1]:.2f} threshold {model.blt.threshold:.3f}"
            print(msg, flush=True)
    seconds = time.perf_counter() - start
    result = {
        "steps": steps, "train_seconds": round(seconds, 1), "s_per_step": round(seconds / steps, 4),
        "params": sum(p.numel() for p in model.parameters()),
        "final_train_loss_mean_last_50": sum(losses[-50:]) / len(losses[-50:]),
        **evaluate(model, val_batches),
    }
    if sizes:
        result["train_mean_patch_size"] = sum(sizes) / len(sizes)
        result["train_mean_patch_size_last_100"] = sum(sizes[-100:]) / len(sizes[-100:])
        result["final_threshold"] = model.blt.threshold
    return result


def schedule(step: int, total: int, warmup: int, min_ratio: float = 0.1) -> float:
    """Linear warm-up, then cosine to ``min_ratio`` at ``total`` (the rule of ``default_adamw``)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--entropy-ckpt", type=Path, default=Path("runs/patching_entropy_lm/checkpoints/last.ckpt"))
    p.add_argument("--only", choices=["plain", "blt"])
    p.add_argument("--plain-steps", type=int, default=1500)
    p.add_argument("--block", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--plain-dim", type=int, default=128)
    p.add_argument("--plain-layers", type=int, default=4)
    p.add_argument("--latent-dim", type=int, default=256)
    p.add_argument("--latent-layers", type=int, default=4)
    p.add_argument("--local-dim", type=int, default=64)
    p.add_argument("--encoder-layers", type=int, default=2)
    p.add_argument("--decoder-layers", type=int, default=2)
    p.add_argument("--hash-vocab", type=int, default=4096)
    p.add_argument("--patching", choices=["entropy", "static", "space"], default="entropy")
    p.add_argument("--boundary-ratio", type=float, default=0.1)
    p.add_argument("--initial-threshold", type=float, default=2.0)
    p.add_argument("--static-patch-size", type=int, default=8)
    p.add_argument("--val-windows", type=int, default=64, help="validation windows of --block bytes (same for both)")
    p.add_argument("--flop-batches", type=int, default=3)
    p.add_argument("--out", type=Path, default=RESULTS / "blt.json")
    args = p.parse_args()
    torch.set_num_threads(1)

    dm = ByteTextDataModule(block_size=args.block, batch_size=args.batch, batches_per_epoch=100_000)
    dm.setup("fit")
    val_batches = list(dm.val_dataloader())
    val_batches = val_batches[: max(1, args.val_windows // args.batch)]
    train_it = iter(dm.train_dataloader())
    probe = [next(train_it) for _ in range(args.flop_batches)]

    flops = {kind: flops_per_step(kind, args, probe) for kind in ("plain", "blt")}
    steps = {"plain": args.plain_steps, "blt": max(1, round(args.plain_steps * flops["plain"] / flops["blt"]))}
    bytes_per_step = args.batch * args.block
    print(f"training FLOPs per step: plain {flops['plain'] / 1e9:.2f} G, blt {flops['blt'] / 1e9:.2f} G; "
          f"steps plain {steps['plain']}, blt {steps['blt']}", flush=True)

    models = {}
    for kind in ("plain", "blt"):
        if args.only and kind != args.only:
            continue
        r = run(kind, steps[kind], args, dm, val_batches)
        r["train_flops_per_step"] = flops[kind]
        r["train_flops_per_byte"] = flops[kind] / bytes_per_step
        r["train_flops_total"] = flops[kind] * steps[kind]
        r["train_bytes"] = steps[kind] * bytes_per_step
        models[kind] = r
    # re-read just before writing: a second --only process may have finished in the meantime
    results = json.loads(args.out.read_text()) if args.only and args.out.exists() else {}
    models = {**results.get("models", {}), **models}
    results.update({
        "what": "BLT vs plain byte transformer at matched training FLOPs, built-in corpus, same validation bytes",
        "flop_rule": "FlopCounterMode over forward+backward (+ the entropy model's forward inside BLT steps); "
                     "matmuls and attention only, full score matrices; steps_blt = steps_plain * F_plain / F_blt",
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "models": models,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    })
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2))
    tmp.replace(args.out)
    print(f"\n{'model':6} {'params':>9} {'GFLOP/step':>10} {'steps':>6} {'bytes':>9} {'val bpb':>8} {'patch':>6} {'min':>5}")
    for kind, r in models.items():
        patch = r.get("val_patch", {}).get("mean_size", float("nan"))
        print(f"{kind:6} {r['params']:>9} {r['train_flops_per_step'] / 1e9:>10.2f} {r['steps']:>6} "
              f"{r['train_bytes']:>9} {r['val_bpb']:>8.4f} {patch:>6.2f} {r['train_seconds'] / 60:>5.1f}")


if __name__ == "__main__":
    main()
