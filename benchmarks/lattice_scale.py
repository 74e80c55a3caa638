"""Lattice at scale: seconds and peak memory of one full LatticeNetwork training step (forward, backward, plasticity,
AdamW step) with and without the memory savers, ``estimate_memory`` against the measured peak, and a MemoryCleanup
soak (RSS over 2,000 training steps).

    OMP_NUM_THREADS=1 python benchmarks/lattice_scale.py --part estimate     # 5+ sizes, estimate vs measured
    OMP_NUM_THREADS=2 python benchmarks/lattice_scale.py --part full         # 128x128x96, T=95; with/without savers
    OMP_NUM_THREADS=1 python benchmarks/lattice_scale.py --part savers       # with vs without savers, largest safe size
    OMP_NUM_THREADS=1 python benchmarks/lattice_scale.py --part soak         # 2,000 steps with MemoryCleanup
    OMP_NUM_THREADS=1 python benchmarks/lattice_scale.py --part optstate     # AdamW state at 128x128x96 vs peak
    python benchmarks/lattice_scale.py --case '{"size": [8, 8, 8], ...}'    # one case, prints JSON

Every case runs in its own subprocess; the parent polls the child's ``VmRSS`` (``/proc/<pid>/status``) and kills it
above ``--rss-limit-gib`` (17 GiB by default), so a case that would exhaust the shared machine is stopped, and
reports the child's own peak RSS (``ru_maxrss``). Results merge into ``benchmarks/results/lattice_scale.json``.
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

RESULTS = Path(__file__).parent / "results" / "lattice_scale.json"
GIB = 2**30


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def current_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def model_kwargs(case: dict) -> dict:
    """LatticeNetwork arguments of a case (groups as dicts of their fields)."""
    D, H, W = case["size"]
    return dict(
        lattice=dict(depth=D, height=H, width=W, channels=case.get("channels", 16), hidden=case.get("hidden", 64),
                     steps=case.get("steps") or D - 1, fire_rate=0.5, stencil=case.get("stencil", "sparse"),
                     checkpoint_every=case.get("checkpoint_every", 0)),
        text=dict(encoder_dim=64, decoder_dim=128, heads=4, decoder_layers=2, max_question_bytes=40,
                  max_answer_bytes=40),
        metrics_every=1,
    )


def case_step(case: dict) -> dict:
    """One case: build the module, time ``repeats`` full training steps after a warm-up step."""
    import torch

    from neat_lightning.components.memory_budget import MemoryConfig, estimate_memory
    from neat_lightning.codec import BOS_ID, EOS_ID
    from neat_lightning.modules.lattice import LatticeNetwork

    torch.manual_seed(0)
    rss0 = current_rss_bytes()
    kw = model_kwargs(case)
    lat = kw["lattice"]
    model = LatticeNetwork(**kw)
    if case.get("steps_override"):
        # fewer lattice steps than depth - 1 (which the module refuses, since the input cannot reach the output
        # face): only to measure the per-step cost of a lattice too slow to run T = D - 1 steps on this CPU
        import dataclasses

        lat["steps"] = case["steps_override"]
        model.config = dataclasses.replace(model.config, steps=lat["steps"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    B = case.get("batch", 1)
    question = torch.randint(4, 200, (B, 40))
    answer = torch.cat([torch.full((B, 1), BOS_ID), torch.randint(4, 200, (B, 40)), torch.full((B, 1), EOS_ID)], 1)
    batch = {"question": question, "answer": answer}
    bf16 = case.get("precision") == "bf16-mixed"

    def step() -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, _ = model.loss(batch, stochastic=True)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.plasticity_step()
        return float(loss.detach())

    times, losses = [], []
    for _ in range(1 + case.get("repeats", 1)):  # warm-up + timed steps
        t0 = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - t0)
    est = estimate_memory(MemoryConfig(
        size=tuple(case["size"]), channels=lat["channels"], hidden=lat["hidden"], steps=lat["steps"], batch=B,
        precision="bf16-mixed" if bf16 else "32-true", checkpoint_every=lat["checkpoint_every"],
        stencil=lat["stencil"], runtime_bytes=rss0,
    ))
    timed = times[1:] or times
    return {**case, "steps": lat["steps"], "cells": lat["depth"] * lat["height"] * lat["width"],
            "s_per_step": sum(timed) / len(timed), "first_step_s": times[0], "loss": losses[-1],
            "peak_rss_gib": peak_rss_bytes() / GIB, "runtime_rss_gib": rss0 / GIB, "estimate_gib": est / GIB,
            "finite": all(map(lambda v: v == v and abs(v) != float("inf"), losses))}


def case_soak(case: dict) -> dict:
    """``steps`` real Trainer steps on a tiny lattice with MemoryCleanup; RSS sampled by the callback."""
    import lightning as L
    import torch

    from neat_lightning.callbacks.memory_cleanup import MemoryCleanup
    from neat_lightning.data.qa import QADataModule
    from neat_lightning.modules.lattice import LatticeNetwork

    L.seed_everything(0)
    model = LatticeNetwork(
        lattice=dict(depth=6, height=8, width=8, channels=8, hidden=16, steps=6),
        text=dict(encoder_dim=32, decoder_dim=32, heads=2, decoder_layers=1, max_question_bytes=24,
                  max_answer_bytes=20),
        optim=dict(warmup_steps=10), metrics_every=10,
    )
    data = QADataModule(max_operand=9, max_factor=5, max_question_bytes=24, max_answer_bytes=20, batch_size=4,
                        batches_per_epoch=case["steps"] + 10, val_batch_size=8, max_val_pairs=8)
    cleanup = MemoryCleanup(every_n_steps=case.get("every", 10), log_memory=False)
    samples: list[tuple[int, int]] = []

    class Sampler(L.Callback):
        def on_train_batch_end(self, trainer, *args) -> None:
            if trainer.global_step % 50 == 0:
                samples.append((trainer.global_step, current_rss_bytes()))

    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, max_steps=case["steps"], limit_val_batches=0,
                        callbacks=[cleanup, Sampler()])
    t0 = time.perf_counter()
    trainer.fit(model, data)
    warm = [r for s, r in samples if s >= case.get("warmup", 200)]
    growth = (warm[-1] - warm[0]) / warm[0]
    return {**case, "seconds": time.perf_counter() - t0, "rss_after_warmup_mib": warm[0] / 2**20,
            "rss_end_mib": warm[-1] / 2**20, "rss_max_after_warmup_mib": max(warm) / 2**20,
            "growth_pct": 100 * growth, "samples": samples, "cleanups": cleanup.cleanups,
            "released_bytes": cleanup.released_bytes}


GALORE_THRESHOLD = 0.20  # build Tensor-GaLore only if optimizer state is at least this share of the peak


def optimizer_state(case: dict) -> dict:
    """AdamW state of the full-size module of ``case``, counted exactly, without running its 10-GiB step.

    The module is built on the ``meta`` device at its full size (shapes only: parameter counts per child, bytes of the
    per-cell buffers, which have no optimizer state). The optimizer state is then counted from a real AdamW step on
    the same module at depth 2: no parameter's shape depends on the depth (the face-sized ones depend on ``H·W``;
    asserted by comparing the two parameter lists), so its state is that of the full-size module, ``step`` counters
    included."""
    import torch

    from neat_lightning.modules.lattice import LatticeNetwork

    kw = model_kwargs(case)
    with torch.device("meta"):
        full = LatticeNetwork(**kw)
    thin_kw = {**kw, "lattice": {**kw["lattice"], "depth": 2, "steps": 1}}
    thin = LatticeNetwork(**thin_kw)
    def shapes(m) -> list:
        return [(n, tuple(p.shape)) for n, p in m.named_parameters() if p.requires_grad]

    if shapes(full) != shapes(thin):
        raise RuntimeError("a parameter's shape depends on the lattice depth; count the full-size module directly")
    opt = torch.optim.AdamW(thin.parameters(), lr=1e-3)  # as case_step builds it
    for p in thin.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    state = [t for st in opt.state.values() for t in st.values() if torch.is_tensor(t)]
    params = sum(p.numel() for p in full.parameters() if p.requires_grad)
    param_bytes = sum(p.numel() * p.element_size() for p in full.parameters() if p.requires_grad)
    return {
        "size": case["size"], "params": params,
        "params_by_child": {n: sum(p.numel() for p in m.parameters()) for n, m in full.named_children()
                            if any(True for _ in m.parameters())},
        "param_bytes": param_bytes, "grad_bytes": param_bytes,
        "optimizer_state_bytes": sum(t.numel() * t.element_size() for t in state),
        "optimizer_state_tensors": len(state),
        "buffer_bytes": sum(b.numel() * b.element_size() for b in full.buffers()),
    }


def optstate_rows(counted: dict) -> list[dict]:
    """The optimizer state's share of each full-size peak in the ``full`` part (measured and estimated)."""
    full = json.loads(RESULTS.read_text()).get("full", {}).get("rows", []) if RESULTS.exists() else []
    rows = []
    for r in full:
        if "error" in r:
            continue
        measured = not (r.get("estimate_only") or r.get("extrapolated"))
        peak = r["peak_rss_gib"] if measured else r["estimate_gib"]
        state_gib = counted["optimizer_state_bytes"] / GIB
        rows.append({
            "reference": f"{r.get('stencil')}, checkpoint_every {r.get('checkpoint_every', 0)}, T={r['steps']}, "
                         + ("measured peak RSS" if measured else "estimate"),
            "steps": r["steps"], "stencil": r.get("stencil"), "checkpoint_every": r.get("checkpoint_every", 0),
            "peak_gib": peak, "peak_measured": measured, "optimizer_state_gib": state_gib,
            "share": state_gib / peak,
            "params_grads_state_share": (2 * counted["param_bytes"] + counted["optimizer_state_bytes"]) / GIB / peak,
        })
    return rows


def run_guarded(case: dict, rss_limit_gib: float, timeout_s: float) -> dict:
    """Run one case in a child process, polling its RSS; kill it above the limit."""
    cmd = [sys.executable, __file__, "--case", json.dumps(case)]
    # freed tensors go back to the OS at once (glibc otherwise keeps freed heap blocks under 32 MiB mapped, which
    # inflates the RSS of small lattices by up to 2x and hides what the step really holds)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", "131072")}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    status = Path(f"/proc/{proc.pid}/status")
    peak, killed, t0 = 0, None, time.time()
    while proc.poll() is None:
        try:
            rss = next(int(x.split()[1]) * 1024 for x in status.read_text().splitlines() if x.startswith("VmRSS:"))
        except (FileNotFoundError, StopIteration, ProcessLookupError):
            rss = 0
        peak = max(peak, rss)
        if rss > rss_limit_gib * GIB or time.time() - t0 > timeout_s:
            killed = f"killed at {rss / GIB:.2f} GiB RSS after {time.time() - t0:.0f} s"
            proc.kill()
        time.sleep(0.2)
    out = proc.stdout.read()
    if killed or proc.returncode != 0:
        return {**case, "error": killed or f"exit code {proc.returncode}", "polled_peak_rss_gib": peak / GIB}
    result = json.loads(out.strip().splitlines()[-1])
    result["polled_peak_rss_gib"] = peak / GIB
    return result


def save(part: str, rows, **extra) -> None:
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    data[part] = {"rows": rows, **extra, "when": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": platform.machine(),
                  "cpus": os.cpu_count(), "omp_threads": os.environ.get("OMP_NUM_THREADS"),
                  "loadavg_end": os.getloadavg()[0]}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(RESULTS)  # atomic


def merge_previous(part: str, rows: list[dict]) -> list[dict]:
    """Rows of an earlier run of ``part`` that this run did not repeat (same stencil, checkpointing and T) are kept,
    their ``estimate_gib`` recomputed with the current ``estimate_memory``; sorted by (stencil, T)."""
    from neat_lightning.components.memory_budget import MemoryConfig, estimate_memory

    key = lambda r: (r.get("stencil", "sparse"), r.get("checkpoint_every", 0), r.get("steps"))  # noqa: E731
    previous = json.loads(RESULTS.read_text()).get(part, {}) if RESULTS.exists() else {}
    fresh = {key(r) for r in rows}
    kept = []
    for r in previous.get("rows", []):
        if r.get("extrapolated") or r.get("estimate_only") or "error" in r or key(r) in fresh:  # measured rows only
            continue
        cfg = MemoryConfig(size=tuple(r["size"]), channels=r.get("channels", 16), steps=r["steps"],
                           checkpoint_every=r.get("checkpoint_every", 0), stencil=r.get("stencil", "sparse"),
                           runtime_bytes=int(r.get("runtime_rss_gib", 0) * GIB))
        kept.append({**r, "estimate_gib": estimate_memory(cfg) / GIB, "kept_from": previous.get("when")})
    return sorted(kept + rows, key=lambda r: (r.get("stencil", "sparse") != "shift", r.get("steps") or 0))


def table(rows: list[dict]) -> None:
    print(f"{'D×H×W':>12} {'T':>3} {'stencil':>7} {'ckpt':>4} {'precision':>10} {'s/step':>8} {'peak GiB':>9} "
          f"{'estimate':>9} {'est/meas':>8}")
    for r in rows:
        size = "×".join(map(str, r["size"]))
        if "error" in r:
            print(f"{size:>12} {r.get('steps', '-')!s:>3} {r.get('stencil', 'sparse'):>7} {r.get('checkpoint_every', 0):>4} "
                  f"{r.get('precision', '32-true'):>10}  {r['error']}")
            continue
        print(f"{size:>12} {r['steps']:>3} {r.get('stencil', 'sparse'):>7} {r.get('checkpoint_every', 0):>4} "
              f"{r.get('precision', '32-true'):>10} {r['s_per_step']:>8.2f} {r['peak_rss_gib']:>9.2f} "
              f"{r['estimate_gib']:>9.2f} {r['estimate_gib'] / r['peak_rss_gib']:>8.2f}")


def estimate_gib(steps: int, **kw) -> float:
    from neat_lightning.components.memory_budget import MemoryConfig, estimate_memory

    kw = {"checkpoint_every": SAVERS["checkpoint_every"], "stencil": "shift", **kw}
    cfg = MemoryConfig(size=(96, 128, 128), channels=16, steps=steps, **kw)
    return estimate_memory(cfg) / GIB


SAVERS = {"stencil": "shift", "checkpoint_every": 3, "precision": "bf16-mixed"}
NO_SAVERS = {"stencil": "sparse", "checkpoint_every": 0, "precision": "32-true"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["estimate", "full", "savers", "soak", "optstate"])
    parser.add_argument("--case", help="run one case (JSON) in this process and print its result")
    parser.add_argument("--rss-limit-gib", type=float, default=17.0)
    parser.add_argument("--timeout-s", type=float, default=3600)
    parser.add_argument("--full-steps", type=int, nargs="*", default=None,
                        help="lattice steps of the full-size cases with savers (default 95 = D - 1)")
    parser.add_argument("--no-saver-steps", type=int, nargs="*", default=[3, 6],
                        help="lattice steps of the full-size cases without savers (slope for T = 95)")
    args = parser.parse_args()
    if args.case:
        case = json.loads(args.case)
        print(json.dumps(case_soak(case) if case.get("kind") == "soak" else case_step(case)))
        return
    if args.part == "estimate":
        sizes = [(8, 16, 16), (16, 16, 16), (16, 24, 24), (24, 32, 32), (32, 32, 32)]
        savers = {**SAVERS, "precision": "32-true"}  # bf16 is emulated (slow) on this CPU; see docs/lattice_scale.md
        cases = [{"size": list(s), "channels": 16, "repeats": 0, **v} for s in sizes for v in (NO_SAVERS, savers)]
        rows = [run_guarded(c, args.rss_limit_gib, args.timeout_s) for c in cases]
    elif args.part == "full":
        # fp32: this CPU has no bf16 units (bf16 matmuls are emulated and slower); memory savers = shift + ckpt.
        # T = D - 1 = 95 is the module's own step count (the input must reach the output face). Without savers the
        # full T does not fit in RAM, so its cost is measured at small T on the same lattice and extrapolated along
        # the measured per-step slope (the estimate's own no-saver figure is printed beside it).
        T = 95
        full_steps = [T] if args.full_steps is None else args.full_steps
        cases = [{"size": [96, 128, 128], "channels": 16, "repeats": 0, **SAVERS, "precision": "32-true",
                  **({} if t == T else {"steps_override": t})} for t in full_steps]
        cases += [{"size": [96, 128, 128], "channels": 16, "steps_override": t, "repeats": 0, **NO_SAVERS}
                  for t in args.no_saver_steps]
        rows = [run_guarded(c, args.rss_limit_gib, args.timeout_s) for c in cases]
        rows = merge_previous("full", rows)
        for stencil, ckpt in (("shift", SAVERS["checkpoint_every"]), ("sparse", 0)):
            ok = [r for r in rows if "error" not in r and r.get("stencil") == stencil and not r.get("extrapolated")]
            if len(ok) < 2 or any(r["steps"] == T for r in ok):
                continue
            # the two largest T: at small T the sparse case's peak is the CSR build, not the step
            a, b = ok[-2], ok[-1]
            dt = (b["s_per_step"] - a["s_per_step"]) / (b["steps"] - a["steps"])
            dm = (b["peak_rss_gib"] - a["peak_rss_gib"]) / (b["steps"] - a["steps"])
            extra = {"size": [96, 128, 128], "steps": T, "extrapolated": True, "stencil": stencil,
                     "checkpoint_every": ckpt, "precision": "32-true",
                     "s_per_step": b["s_per_step"] + dt * (T - b["steps"]),
                     "peak_rss_gib": b["peak_rss_gib"] + dm * (T - b["steps"]),
                     "estimate_gib": estimate_gib(T, stencil=stencil, checkpoint_every=ckpt)}
            rows.append(extra)
            print(f"{stencil}, ckpt {ckpt}: extrapolated to T={T}: {extra['s_per_step']:.0f} s/step, peak "
                  f"{extra['peak_rss_gib']:.2f} GiB (estimate {extra['estimate_gib']:.2f} GiB)")
    elif args.part == "savers":
        size = [32, 48, 48]
        rows = [run_guarded({"size": size, "channels": 16, **v}, args.rss_limit_gib, args.timeout_s)
                for v in (NO_SAVERS, {**SAVERS, "precision": "32-true"}, SAVERS)]
    elif args.part == "optstate":
        counted = optimizer_state({"size": [96, 128, 128], "channels": 16, **SAVERS})
        rows = optstate_rows(counted)
        if not rows:
            parser.error(f"{RESULTS} has no 'full' rows to compare with; run --part full first")
        worst = max(r["share"] for r in rows if r["peak_measured"])
        decision = ("build Tensor-GaLore" if worst >= GALORE_THRESHOLD else
                    f"do not build Tensor-GaLore: optimizer state is at most {100 * worst:.2f}% of a measured peak, "
                    f"below the {100 * GALORE_THRESHOLD:.0f}% threshold")
        print(f"{counted['params']:,} trainable parameters {counted['params_by_child']}; AdamW state "
              f"{counted['optimizer_state_bytes']:,} bytes ({counted['optimizer_state_bytes'] / GIB:.4f} GiB, "
              f"{counted['optimizer_state_tensors']} tensors); per-cell buffers (no optimizer state) "
              f"{counted['buffer_bytes'] / GIB:.3f} GiB")
        for r in rows:
            print(f"  {r['reference']:>58}: peak {r['peak_gib']:8.2f} GiB, optimizer state {100 * r['share']:.3f}%, "
                  f"params + grads + state {100 * r['params_grads_state_share']:.3f}%")
        print(decision)
        save(args.part, rows, counted=counted, threshold=GALORE_THRESHOLD, decision=decision)
        return
    elif args.part == "soak":
        rows = [run_guarded({"kind": "soak", "steps": 2000, "every": 10, "warmup": 200}, args.rss_limit_gib,
                            args.timeout_s)]
        r = rows[0]
        if "error" not in r:
            print(f"soak: {r['steps']} steps in {r['seconds']:.0f} s, RSS after warm-up {r['rss_after_warmup_mib']:.1f} "
                  f"MiB -> end {r['rss_end_mib']:.1f} MiB (max {r['rss_max_after_warmup_mib']:.1f}): growth "
                  f"{r['growth_pct']:+.2f}% ({r['cleanups']} cleanups)")
        save(args.part, rows)
        return
    else:
        parser.error("give --part or --case")
    table(rows)
    save(args.part, rows)


if __name__ == "__main__":
    main()
