"""Lattice speed and memory: one lattice step forward+backward at three sizes (fixed Sobel stencils vs a learned
depthwise conv), the plasticity update rate at 128x128x96 (1.57 M cells, 41 M connections), and the vectorised
plasticity update against a naive per-cell Python loop on 8^3.

    OMP_NUM_THREADS=1 python benchmarks/lattice.py            # prints a table, writes benchmarks/results/lattice.json
    python benchmarks/lattice.py --quick                      # smaller, for a smoke run

Every case runs in its own subprocess so that its peak RSS (``ru_maxrss``) is its own.
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

RESULTS = Path(__file__).parent / "results" / "lattice.json"
RSS_LIMIT_GIB = 8.0


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def case_step(size: tuple[int, int, int], perception: str, batch: int, channels: int, hidden: int, repeats: int) -> dict:
    import torch

    from neat_lightning.components.lattice import LatticeConfig, LatticeRule, lattice_step

    torch.manual_seed(0)
    D, H, W = size
    cfg = LatticeConfig(D, H, W, channels, hidden, steps=1, fire_rate=1.0, perception=perception)
    rule = LatticeRule(cfg)
    connections = torch.rand(D, H, W, 26)
    state = torch.randn(D * H * W, batch, channels, requires_grad=True)
    op = rule.connection_operator(connections)

    def once():
        out = lattice_step(rule, state, op)
        out.square().mean().backward()

    once()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        once()
    dt = (time.perf_counter() - t0) / repeats
    return {"size": list(size), "cells": D * H * W, "perception": perception, "batch": batch, "channels": channels,
            "hidden": hidden, "step_fwd_bwd_s": dt, "cell_updates_per_s": D * H * W * batch / dt,
            "peak_rss_gib": peak_rss_gib()}


def case_plasticity(size: tuple[int, int, int], steps: int, repeats: int) -> dict:
    import torch

    from neat_lightning.components.plasticity import PlasticityConfig, PlasticityProfile, PlasticityState, plasticity_update

    torch.manual_seed(0)
    D, H, W = size
    weights = torch.rand(D, H, W, 26)
    mask = torch.rand(D, H, W, 26) > 0.1
    activity = torch.rand(steps, D, H, W) * 0.2
    state = PlasticityState.zeros(size)
    profile = PlasticityProfile("all", stdp=1.0, bcm=1.0, competitive=1.0, activity_threshold=0.05)
    cfg = PlasticityConfig()
    weights, state = plasticity_update(weights, activity, state, profile, cfg, mask)  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        weights, state = plasticity_update(weights, activity, state, profile, cfg, mask)
    dt = (time.perf_counter() - t0) / repeats
    n = weights.numel()
    return {"size": list(size), "cells": D * H * W, "connections": n, "lattice_steps_in_history": steps,
            "update_s": dt, "connection_updates_per_s": n / dt, "peak_rss_gib": peak_rss_gib()}


def case_naive(size: tuple[int, int, int], steps: int) -> dict:
    import torch

    from neat_lightning.components.plasticity import (
        PlasticityConfig,
        PlasticityProfile,
        PlasticityState,
        naive_plasticity_update,
        plasticity_update,
    )

    torch.manual_seed(0)
    weights = torch.rand(*size, 26)
    activity = torch.rand(steps, *size) * 0.2
    state = PlasticityState.zeros(size)
    profile = PlasticityProfile("all", stdp=1.0, bcm=1.0, competitive=1.0, activity_threshold=0.05)
    cfg = PlasticityConfig()
    plasticity_update(weights, activity, state, profile, cfg)
    t0 = time.perf_counter()
    reps = 20
    for _ in range(reps):
        fast, _ = plasticity_update(weights, activity, state, profile, cfg)
    t_fast = (time.perf_counter() - t0) / reps
    t0 = time.perf_counter()
    slow, _ = naive_plasticity_update(weights, activity, state, profile, cfg)
    t_slow = time.perf_counter() - t0
    return {"size": list(size), "lattice_steps_in_history": steps, "vectorised_s": t_fast, "naive_s": t_slow,
            "ratio": t_slow / t_fast, "max_abs_diff": float((fast - slow).abs().max())}


def run_case(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, "--case", *args], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        return {"case": args, "error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes only (smoke run)")
    p.add_argument("--case", nargs="+", help=argparse.SUPPRESS)
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--only", nargs="+", choices=["step", "plasticity", "naive"],
                   help="re-measure only these parts and keep the others from the existing --out file")
    args = p.parse_args()
    if args.case:
        kind, *rest = args.case
        if kind == "step":
            d, h, w, perception, b, c, hid, r = rest
            res = case_step((int(d), int(h), int(w)), perception, int(b), int(c), int(hid), int(r))
        elif kind == "plasticity":
            d, h, w, t, r = rest
            res = case_plasticity((int(d), int(h), int(w)), int(t), int(r))
        else:
            d, h, w, t = rest
            res = case_naive((int(d), int(h), int(w)), int(t))
        print(json.dumps(res))
        return 0

    sizes = [(16, 16, 16), (24, 32, 32), (48, 64, 64)] if not args.quick else [(8, 8, 8), (16, 16, 16)]
    big = (96, 128, 128) if not args.quick else (24, 32, 32)
    out = Path(args.out)
    old = json.loads(out.read_text()) if args.only and out.exists() else {}
    wanted = set(args.only or ["step", "plasticity", "naive"])
    steps = old.get("step", [])
    if "step" in wanted:
        steps = [run_case(["step", *map(str, size), perception, "4", "16", "64", "2"])
                 for size in sizes for perception in ("sobel", "depthwise")]
    plast = run_case(["plasticity", *map(str, big), "8", "2"]) if "plasticity" in wanted else old["plasticity"]
    naive = run_case(["naive", "8", "8", "8", "4"]) if "naive" in wanted else old["naive_vs_vectorised"]

    print(f"{'lattice (DxHxW)':>16} {'perception':>10} {'fwd+bwd s':>10} {'cell-upd/s':>12} {'peak RSS GiB':>13}")
    for r in steps:
        if "error" in r:
            print(f"{str(r['case']):>40} ERROR {r['error']}")
            continue
        size = "x".join(map(str, r["size"]))
        print(f"{size:>16} {r['perception']:>10} {r['step_fwd_bwd_s']:>10.3f} {r['cell_updates_per_s']:>12.3g} "
              f"{r['peak_rss_gib']:>13.2f}")
    if "error" not in plast:
        print(f"plasticity {'x'.join(map(str, plast['size']))}: {plast['connections'] / 1e6:.1f} M connections, "
              f"{plast['update_s']:.2f} s per update (T={plast['lattice_steps_in_history']}), "
              f"{plast['connection_updates_per_s']:.3g} connection updates/s, peak RSS {plast['peak_rss_gib']:.2f} GiB "
              f"(limit {RSS_LIMIT_GIB} GiB: {'ok' if plast['peak_rss_gib'] <= RSS_LIMIT_GIB else 'EXCEEDED'})")
    else:
        print("plasticity ERROR", plast["error"])
    if "error" not in naive:
        print(f"vectorised vs naive per-cell loop on 8^3: {naive['vectorised_s'] * 1e3:.2f} ms vs {naive['naive_s']:.1f} s "
              f"-> ratio {naive['ratio']:.0f}x (max |diff| {naive['max_abs_diff']:.1e})")
    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "load_average_1m": os.getloadavg()[0],
                    "remeasured": sorted(wanted)},
        "step": steps, "plasticity": plast, "naive_vs_vectorised": naive,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out)  # atomic
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
