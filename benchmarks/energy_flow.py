"""Energy flow speed and stability: 100 k carriers on a 50×50×25 lattice (D=25, H=W=50, C=16).

    OMP_NUM_THREADS=1 python benchmarks/energy_flow.py                 # creation, steps/s, 5,000-step stability run
    OMP_NUM_THREADS=1 python benchmarks/energy_flow.py --long 0        # skip the long run
    OMP_NUM_THREADS=1 python benchmarks/energy_flow.py --train 60      # also: LatticeNetwork(mode="energy_flow") on QA

Steps run without gradient (the carriers' dynamics, as in the seed's simulation); carriers that reach the output face
or run out of energy are respawned on the input face every step, so the population stays at 100 k. The long run
checks every cell, carrier state and position for NaN/Inf every 100 steps. Results merge into
``benchmarks/results/energy_flow.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time
from pathlib import Path

import torch

from neat_lightning.components.energy_flow import EnergyFlow, EnergyFlowConfig, respawn, spawn_carriers
from neat_lightning.components.lattice import LatticeConfig

RESULTS = Path(__file__).parent / "results" / "energy_flow.json"


def finite(cells, carriers) -> bool:
    return bool(torch.isfinite(cells).all() and torch.isfinite(carriers.hidden).all()
                and torch.isfinite(carriers.position).all() and torch.isfinite(carriers.energy).all())


def bench_steps(cfg: EnergyFlowConfig, lattice: LatticeConfig, steps: int, check_every: int = 100) -> dict:
    torch.manual_seed(0)
    flow = EnergyFlow(cfg, lattice)
    torch.nn.init.normal_(flow.move.weight, std=0.5)  # non-trivial learned moves
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    carriers = spawn_carriers(cfg, 1, generator=g)
    create_s = time.perf_counter() - t0
    cells = torch.randn(1, lattice.depth * lattice.height * lattice.width, lattice.channels) * 0.1
    ok, max_abs = True, 0.0
    with torch.no_grad():
        for _ in range(5):  # warm-up
            cells, carriers = flow.step(cells, carriers)
        t0 = time.perf_counter()
        for t in range(steps):  # over time steps; each is vectorised over all carriers
            cells, carriers = flow.step(cells, carriers)
            carriers = respawn(carriers, cfg, g)
            if (t + 1) % check_every == 0:
                ok &= finite(cells, carriers)
                max_abs = max(max_abs, float(cells.abs().max()))
        dt = time.perf_counter() - t0
    ok &= finite(cells, carriers)
    return {"carriers": cfg.carriers, "size": list(lattice.size), "channels": lattice.channels, "steps": steps,
            "create_s": create_s, "steps_per_s": steps / dt, "finite": ok, "max_abs_cell": max_abs,
            "loadavg": os.getloadavg()[0]}


def bench_train(steps: int) -> dict:
    import lightning as L

    from neat_lightning.data.qa import QADataModule
    from neat_lightning.modules.lattice import LatticeNetwork

    L.seed_everything(0)
    model = LatticeNetwork(
        mode="energy_flow", lattice=dict(depth=16, height=16, width=16, channels=8, hidden=16, steps=18),
        energy_flow=dict(carriers=2048),
        text=dict(encoder_dim=64, decoder_dim=96, decoder_layers=2, max_question_bytes=40, max_answer_bytes=40),
        optim=dict(warmup_steps=20),
    )
    data = QADataModule(kinds=["arithmetic", "facts"], max_operand=20, max_factor=10, max_question_bytes=40,
                        max_answer_bytes=40, batch_size=8, batches_per_epoch=steps + 10, val_batch_size=64,
                        max_val_pairs=64)
    losses = []

    class Rec(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, max_steps=steps, limit_val_batches=1, val_check_interval=steps,
                        check_val_every_n_epoch=None, callbacks=[Rec()])
    t0 = time.perf_counter()
    trainer.fit(model, data)
    head, tail = losses[:10], losses[-10:]
    return {"steps": steps, "s_per_step": (time.perf_counter() - t0) / steps,
            "loss_first10": sum(head) / len(head), "loss_last10": sum(tail) / len(tail),
            "val_loss": float(trainer.callback_metrics.get("val/loss", float("nan")))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--carriers", type=int, default=100_000)
    parser.add_argument("--steps", type=int, default=200, help="timed steps of the speed case")
    parser.add_argument("--long", type=int, default=5000, help="steps of the stability run (0 to skip)")
    parser.add_argument("--long-carriers", type=int, default=None, help="carriers of the long run (default --carriers)")
    parser.add_argument("--skip-speed", action="store_true", help="keep the stored speed result")
    parser.add_argument("--train", type=int, default=0, help="QA training steps of the energy-flow LatticeNetwork")
    args = parser.parse_args()
    cfg = EnergyFlowConfig(carriers=args.carriers)
    lattice = LatticeConfig(depth=25, height=50, width=50, channels=16)
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    data.update({"when": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": platform.machine(), "cpus": os.cpu_count(),
                 "omp_threads": os.environ.get("OMP_NUM_THREADS"), "torch_threads": torch.get_num_threads()})
    print(f"{'case':>10} {'carriers':>9} {'lattice':>10} {'steps':>6} {'create s':>9} {'steps/s':>8} {'finite':>6}")
    if not args.skip_speed:
        speed = bench_steps(cfg, lattice, args.steps)
        data["speed"] = speed
        print(f"{'speed':>10} {speed['carriers']:>9} {'50×50×25':>10} {speed['steps']:>6} {speed['create_s']:>9.3f} "
              f"{speed['steps_per_s']:>8.1f} {speed['finite']!s:>6}")
    if args.long:
        long = bench_steps(dataclasses.replace(cfg, carriers=args.long_carriers or cfg.carriers), lattice, args.long)
        data["long"] = long
        print(f"{'long':>10} {long['carriers']:>9} {'50×50×25':>10} {long['steps']:>6} {long['create_s']:>9.3f} "
              f"{long['steps_per_s']:>8.1f} {long['finite']!s:>6}   max |cell| {long['max_abs_cell']:.3g}")
    if args.train:
        data["train"] = bench_train(args.train)
        r = data["train"]
        print(f"energy-flow LatticeNetwork on QA, {r['steps']} steps: {r['s_per_step']:.2f} s/step, loss "
              f"{r['loss_first10']:.3f} -> {r['loss_last10']:.3f}, val/loss {r['val_loss']:.3f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(RESULTS)


if __name__ == "__main__":
    main()
