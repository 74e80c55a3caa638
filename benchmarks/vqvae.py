"""VQVAE speed and memory (and, with --ckpt, the quality of a trained checkpoint).

    python benchmarks/vqvae.py                      # speed table of the shipped configs -> results/vqvae.json
    python benchmarks/vqvae.py --ckpt runs/vqvae_quickstart/checkpoints/last.ckpt
        # held-out PSNR, codebook usage, perplexity, dead codes and the cell round trip of that checkpoint
        # -> benchmarks/results/vqvae_eval_<run>.json
    python benchmarks/vqvae.py --bound
        # how much codebook usage held-out images *can* show: distinct encoder receptive fields
        # -> benchmarks/results/vqvae_usage_bound.json

Speed: train images/s (forward, backward and AdamW step on generated images, no Lightning loop), encode images/s
(``VQVAE.encode``), and the peak resident memory of a process that does only that (each config runs in its own
subprocess). Threads: ``torch.get_num_threads()`` unless ``--threads``. CPU seconds are reported beside wall seconds,
because on a shared machine wall time measures the neighbours too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from einops import rearrange

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CONFIGS = {"quickstart": ROOT / "configs" / "vqvae_quickstart.yaml", "vqvae_8192": ROOT / "configs" / "vqvae.yaml"}


def atomic_write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def bench_one(name: str, steps: int, warmup: int) -> dict:
    from neat_lightning.data.generators.grids import sample_images
    from neat_lightning.modules.vqvae import VQVAE

    cfg = yaml.safe_load(CONFIGS[name].read_text())
    model_args = cfg["model"]["init_args"]
    data_args = cfg["data"]["init_args"]
    batch, size = data_args["batch_size"], data_args["image_size"]
    torch.manual_seed(0)
    model = VQVAE(**model_args)
    images, _ = sample_images(batch, seed=0, image_size=size, grid_size=data_args.get("grid_size", 8))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def train_step() -> None:
        recon, out = model(images)
        loss = torch.nn.functional.mse_loss(recon, images) + out.commit_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    model.train()
    for _ in range(warmup):
        train_step()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        train_step()
    train_wall, train_cpu = time.perf_counter() - wall, time.process_time() - cpu

    model.eval()
    for _ in range(warmup):
        model.encode(images)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        model.encode(images)
    enc_wall, enc_cpu = time.perf_counter() - wall, time.process_time() - cpu
    n = steps * batch
    return {
        "config": str(CONFIGS[name].relative_to(ROOT)),
        "codebook_size": model_args["codebook_size"],
        "embed_dim": model_args["embed_dim"],
        "image_size": size,
        "batch_size": batch,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "train_images_per_s": n / train_wall,
        "train_cpu_s_per_step": train_cpu / steps,
        "encode_images_per_s": n / enc_wall,
        "encode_cpu_s_per_image": enc_cpu / n,
        "peak_rss_mib": peak_rss_mib(),
        "threads": torch.get_num_threads(),
        "steps": steps,
    }


def receptive_windows(states: torch.Tensor, radius: int) -> torch.Tensor:
    """(B, n, n) cell classes -> (B n n, W) int64 keys of the (2 radius + 1)^2-cell window around every cell, cells
    outside the grid as their own symbol (the encoder's zero padding is visible to it). Two cells with equal keys get
    equal latents from any deterministic encoder whose receptive field is that window."""
    import torch.nn.functional as F

    k = 2 * radius + 1
    padded = F.pad(states + 1, (radius, radius, radius, radius), value=0)  # 0 = outside, 1.. = classes
    win = rearrange(padded.unfold(1, k, 1).unfold(2, k, 1), "b h w p q -> (b h w) (p q)").long()
    digits = 12  # 16 symbols = 4 bits each: 12 cells per int64 key
    base = 16 ** torch.arange(digits, dtype=torch.long)
    return torch.stack([(win[:, i:i + digits] * base[: win[:, i:i + digits].shape[1]]).sum(1)
                        for i in range(0, win.shape[1], digits)], 1)


def usage_bound(codebook_size: int, radii: list[int], held_out: list[int], train_images: int, seed: int) -> dict:
    """Upper bound and an attainable reference for held-out codebook usage on generated grids.

    * bound: distinct receptive-field windows in the held-out images / K -- a deterministic encoder cannot give more
      distinct latents, so usage cannot exceed it;
    * exact-match reference: put one code on each of the K most frequent windows of ``train_images`` training images
      and count how many of those windows occur in the held-out images (a codebook that needs no nearest-neighbour
      luck; what a well-spread codebook should at least reach).
    """
    from neat_lightning.data.generators.grids import sample_states, seed_from

    train, _ = sample_states(train_images, seed_from("usage-bound", seed), grid_size=8)
    held = {n: sample_states(n, seed, grid_size=8)[0] for n in held_out}
    rows = []
    for r in radii:
        keys, counts = torch.unique(receptive_windows(train, r), dim=0, return_counts=True)
        top = keys[counts.argsort(descending=True)[:codebook_size]]
        for n, states in held.items():
            hk = torch.unique(receptive_windows(states, r), dim=0)
            _, c = torch.unique(torch.cat([top, hk]), dim=0, return_counts=True)
            rows.append({"radius_cells": r, "held_out_images": n, "tokens": n * 64, "distinct_windows": len(hk),
                         "bound": min(1.0, len(hk) / codebook_size), "distinct_over_k": len(hk) / codebook_size,
                         "exact_match_usage": int((c > 1).sum()) / codebook_size})
    return {"codebook_size": codebook_size, "train_images": train_images, "seed": seed, "rows": rows}


@torch.no_grad()
def evaluate(ckpt: str, n_images: int, seed: int) -> dict:
    """Held-out quality of a checkpoint on generated images (the same families and sizes it was trained on)."""
    from neat_lightning.data.generators.grids import cells_from_images, sample_images
    from neat_lightning.modules.vqvae import VQVAE, psnr_per_image

    model = VQVAE.load_from_checkpoint(ckpt, map_location="cpu").eval()
    hp = torch.load(ckpt, map_location="cpu", weights_only=False).get("datamodule_hyper_parameters", {})
    size, grid = hp.get("image_size", 32), hp.get("grid_size", 8)
    images, states = sample_images(n_images, seed=seed, image_size=size, grid_size=grid)
    tokens = torch.cat([model.encode(x) for x in images.split(128)])
    recon = torch.cat([model.decode(t) for t in tokens.split(128)])
    counts = torch.bincount(tokens.flatten(), minlength=model.codebook_size)
    p = counts.float() / counts.sum()
    q = model.quantizer
    return {
        "ckpt": ckpt,
        "train_steps": int(q.step),
        "held_out_images": n_images,
        "tokens": int(tokens.numel()),
        "psnr_db": float(psnr_per_image(recon, images).mean()),
        "recon_mse": float(((recon - images) ** 2).mean()),
        "codebook_usage": float((counts > 0).float().mean()),
        "dead_codes": int((counts == 0).sum()),
        "perplexity": float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum())),
        "codes_below_restart_threshold": int((q.cluster_size < q.dead_code_threshold).sum()),
        "codes_never_used_in_training": int((q.usage == 0).sum()),
        "cell_accuracy": float((cells_from_images(recon, grid) == states).float().mean()),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--ckpt", default=None, help="evaluate this checkpoint instead of timing")
    ap.add_argument("--images", type=int, default=1024, help="held-out images for --ckpt")
    ap.add_argument("--seed", type=int, default=20_250_101, help="seed of the held-out images for --ckpt")
    ap.add_argument("--bound", action="store_true", help="usage upper bound from distinct receptive fields")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: time one config in this process
    ap.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/vqvae*.json)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.one:
        print(json.dumps(bench_one(args.one, args.steps, args.warmup)))
        return 0

    if args.bound:
        res = usage_bound(8192, [1, 2, 3], [1024, 2048, 4096], 8192, args.seed)
        print(f"{'radius':>6s} {'images':>6s} {'tokens':>7s} {'distinct':>8s} {'distinct/K':>10s} {'exact-match':>11s}")
        for r in res["rows"]:
            print(f"{r['radius_cells']:6d} {r['held_out_images']:6d} {r['tokens']:7d} {r['distinct_windows']:8d} "
                  f"{r['distinct_over_k']:10.2f} {r['exact_match_usage']:11.3f}")
        out = Path(args.out) if args.out else RESULTS / "vqvae_usage_bound.json"
        atomic_write_json(out, res)
        print(f"wrote {out}")
        return 0

    if args.ckpt:
        res = evaluate(args.ckpt, args.images, args.seed)
        for k, v in res.items():
            print(f"{k:32s} {v:.4f}" if isinstance(v, float) else f"{k:32s} {v}")
        run = Path(args.ckpt).resolve().parent.parent.name
        out = Path(args.out) if args.out else RESULTS / f"vqvae_eval_{run}.json"
        atomic_write_json(out, res)
        print(f"wrote {out}")
        return 0

    rows = []
    for name in args.configs:
        cmd = [sys.executable, __file__, "--one", name, "--steps", str(args.steps), "--warmup", str(args.warmup)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        done = subprocess.run(cmd, check=True, capture_output=True, text=True)
        rows.append({"name": name, **json.loads(done.stdout.strip().splitlines()[-1])})
    head = f"{'config':12s} {'K':>5s} {'D':>4s} {'batch':>5s} {'train img/s':>11s} {'cpu s/step':>10s} " \
           f"{'encode img/s':>12s} {'peak RSS MiB':>12s}"
    print(head)
    for r in rows:
        print(f"{r['name']:12s} {r['codebook_size']:5d} {r['embed_dim']:4d} {r['batch_size']:5d} "
              f"{r['train_images_per_s']:11.1f} {r['train_cpu_s_per_step']:10.3f} {r['encode_images_per_s']:12.1f} "
              f"{r['peak_rss_mib']:12.0f}")
    out = Path(args.out) if args.out else RESULTS / "vqvae.json"
    atomic_write_json(out, {
        "machine": {"platform": platform.platform(), "processor": platform.machine(), "cpus": os.cpu_count(),
                    "torch": torch.__version__, "load_avg_1min": os.getloadavg()[0]},
        "results": rows,
    })
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
