"""Held-out QA with the quickstart lattice and the no-lattice baseline: train each for a budget (wall time and/or
steps) with a real ``lightning.Trainer`` and the config's callbacks, then answer every held-out question greedily
and score corpus BLEU (sacrebleu, 0–100) and exact match, overall and per kind.

    python benchmarks/lattice_qa.py                          # 10 min each, 2 threads, writes the JSON
    python benchmarks/lattice_qa.py --seconds 0 --steps 900  # a fixed number of steps (on a busy machine)
    python benchmarks/lattice_qa.py --only lattice --seconds 60 --out /tmp/x.json
    python benchmarks/lattice_qa.py --only lattice_no_plasticity --seconds 0 --steps 550 --threads 1  # plasticity off

The baseline is the same config with ``use_lattice: false``: the encoder's input face goes through a per-cell MLP
with the lattice rule's parameter count straight to the decoder (same total parameter count ± a few). Held-out means
arithmetic problems never seen in training (split by a hash of the question) plus the 80 taught facts (recall), as
:class:`~neat_lightning.data.QADataModule` splits them; ``max_val_pairs=None`` scores all of them.

Each model trains in its own subprocess so its thread count and timing are its own. The JSON records the steps
reached, the wall time, the load average before/after (the machine may be shared), and sample answers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "lattice_qa.json"
CONFIG = REPO / "configs" / "lattice_quickstart.yaml"
# lattice_no_plasticity: the lattice with its connections fixed at their init (plasticity.enabled false, no
# PlasticityStages); run it with --only
VARIANTS = ("lattice", "baseline", "lattice_no_plasticity")


def _instantiate(spec: dict):
    import importlib

    from neat_lightning.callbacks.plasticity_stages import Stage

    module, name = spec["class_path"].rsplit(".", 1)
    kwargs = dict(spec.get("init_args", {}))
    if name == "PlasticityStages":  # the YAML's stage dicts, as jsonargparse would build them
        kwargs["stages"] = [Stage(**s) if isinstance(s, dict) else s for s in kwargs.get("stages", [])]
    return getattr(importlib.import_module(module), name)(**kwargs)


def face_transfer(model, questions) -> dict:
    """How much of the question reaches the output face (eval mode): the spread of each face cell across questions
    (std over the batch, mean over cells and channels) on the input and on the output face, their ratio, and the mean
    |∂ output face / ∂ input face| of a random projection."""
    import torch
    from einops import rearrange

    from neat_lightning.components.lattice import run_lattice
    from neat_lightning.codec import PAD_ID

    model.eval()
    face = rearrange(model.encoder(questions, PAD_ID), "b n c -> n b c").detach().requires_grad_(True)
    state, _ = run_lattice(model.rule, face, model.cells.effective_connections(), model.config.steps, stochastic=False)
    out = state[-face.shape[0]:]
    (grad,) = torch.autograd.grad((out * torch.randn_like(out)).sum(), face)
    spread_in, spread_out = float(face.std(1).mean()), float(out.std(1).mean())
    return {"input_face_spread": spread_in, "output_face_spread": spread_out,
            "spread_ratio": spread_out / max(spread_in, 1e-30), "mean_abs_grad": float(grad.abs().mean())}


def _progress_callback():
    import lightning as L

    class Progress(L.Callback):
        """Every 50 steps: append (step, wall s, last monitor BLEU) to ``progress.jsonl`` and save ``last.ckpt``, so
        a run cut short on a busy machine can still be scored at the step it reached."""

        def __init__(self, run_dir: Path, variant: str) -> None:
            self.run_dir, self.variant, self.t0 = run_dir, variant, time.perf_counter()
            run_dir.mkdir(parents=True, exist_ok=True)

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            step = trainer.global_step
            if step % 50:
                return
            monitors = [c for c in trainer.callbacks if type(c).__name__ == "DecoderBLEUMonitor"]
            last = monitors[0].history[-1] if monitors and monitors[0].history else None
            with open(self.run_dir / "progress.jsonl", "a") as f:
                f.write(json.dumps({"variant": self.variant, "step": step, "wall_s": time.perf_counter() - self.t0,
                                    "monitor_bleu": last, "load": os.getloadavg()[0]}) + "\n")
            trainer.save_checkpoint(self.run_dir / "last.ckpt")

    return Progress


def run_one(config: Path, variant: str, seconds: float, steps: int | None, seed: int, run_dir: Path) -> dict:
    """Train one variant (``lattice``, ``baseline`` or ``lattice_no_plasticity``) in this process and score it on every held-out pair."""
    import lightning as L
    import torch
    import yaml

    from neat_lightning.callbacks.bleu_monitor import corpus_bleu, exact_match

    Progress = _progress_callback()
    cfg = yaml.safe_load(config.read_text())
    model_spec, data_spec = dict(cfg["model"]), dict(cfg["data"])
    model_spec["init_args"] = {**model_spec.get("init_args", {}), "use_lattice": variant != "baseline"}
    if variant == "lattice_no_plasticity":  # connections stay at their init: no plasticity rules, no stage table
        plasticity = {**model_spec["init_args"].get("plasticity", {}), "enabled": False}
        model_spec["init_args"]["plasticity"] = plasticity
    data_spec["init_args"] = {**data_spec.get("init_args", {}), "max_val_pairs": None}
    tcfg = cfg.get("trainer", {})
    L.seed_everything(seed, workers=True)
    model = _instantiate(model_spec)
    data = _instantiate(data_spec)
    specs = [c for c in tcfg.get("callbacks", [])
             if not (variant == "lattice_no_plasticity" and c["class_path"].endswith("PlasticityStages"))]
    callbacks = [_instantiate(c) for c in specs] + [Progress(run_dir, variant)]
    max_steps = steps if steps else int(tcfg.get("max_steps", -1))
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, max_steps=max_steps, max_epochs=-1,
        max_time={"seconds": seconds} if seconds > 0 else None,
        gradient_clip_val=tcfg.get("gradient_clip_val"), precision=tcfg.get("precision", "32-true"),
        limit_val_batches=0, callbacks=callbacks, default_root_dir=str(run_dir),
    )
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    trainer.fit(model, datamodule=data)
    wall = time.perf_counter() - t0
    load_after = os.getloadavg()
    pairs = data.val_pairs
    t1 = time.perf_counter()
    answers = model.generate_text([p.question for p in pairs], max_new_bytes=data.max_answer_bytes)
    gen_s = time.perf_counter() - t1
    refs = [p.answer for p in pairs]
    trainer.save_checkpoint(run_dir / "final.ckpt")
    face = face_transfer(model, data.val_q[:64]) if variant != "baseline" else {}
    by_kind = {}
    for kind in sorted({p.kind for p in pairs}):
        idx = [i for i, p in enumerate(pairs) if p.kind == kind]
        h, r = [answers[i] for i in idx], [refs[i] for i in idx]
        by_kind[kind] = {"pairs": len(idx), "bleu": corpus_bleu(h, r), "exact_match": exact_match(h, r)}
    monitor = [c for c in callbacks if type(c).__name__ == "DecoderBLEUMonitor"]
    return {
        "variant": variant, "params": sum(p.numel() for p in model.parameters()), "steps": int(trainer.global_step),
        "batch_size": data.batch_size, "samples_seen": int(trainer.global_step) * data.batch_size,
        "train_wall_s": wall, "generate_s": gen_s, "threads": torch.get_num_threads(),
        "load_avg_before": load_before, "load_avg_after": load_after,
        "val_pairs": len(pairs), "bleu": corpus_bleu(answers, refs), "exact_match": exact_match(answers, refs),
        "by_kind": by_kind, "bleu_history": monitor[0].history if monitor else [], "face_transfer": face,
        "samples": [{"question": p.question, "reference": p.answer, "answer": a} for p, a in zip(pairs[:12], answers)],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--seconds", type=float, default=600.0, help="wall-time budget per model (0: none)")
    parser.add_argument("--steps", type=int, default=None, help="step budget per model (default: the config's)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", choices=VARIANTS, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.seconds <= 0 and not args.steps:
        parser.error("give a time budget (--seconds > 0) or a step budget (--steps)")
    run_dir = REPO / "runs" / "lattice_qa"
    if args._child:  # one variant, in a subprocess with its own thread count
        import torch

        torch.set_num_threads(args.threads)
        result = run_one(args.config, args._child, args.seconds, args.steps, args.seed, run_dir / args._child)
        print("RESULT " + json.dumps(result))
        return 0
    variants = [args.only] if args.only else ["lattice", "baseline"]
    results = []
    for variant in variants:  # one subprocess per variant
        cmd = [sys.executable, __file__, "--config", str(args.config), "--seconds", str(args.seconds),
               "--threads", str(args.threads), "--seed", str(args.seed), "--_child", variant]
        if args.steps:
            cmd += ["--steps", str(args.steps)]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
            raise SystemExit(f"{variant} run failed with exit code {proc.returncode}")
        results.append(json.loads(lines[-1][len("RESULT "):]))
    print(f"{'variant':>21} {'params':>8} {'steps':>6} {'wall s':>7} {'load':>10} {'BLEU':>6} {'EM':>6} "
          f"{'arith BLEU/EM':>14} {'facts BLEU/EM':>14}")
    for r in results:
        a, f = r["by_kind"].get("arithmetic", {}), r["by_kind"].get("facts", {})
        print(f"{r['variant']:>21} {r['params']:>8} {r['steps']:>6} {r['train_wall_s']:>7.0f} "
              f"{r['load_avg_before'][0]:>4.1f}-{r['load_avg_after'][0]:<4.1f} {r['bleu']:>6.2f} {r['exact_match']:>6.3f} "
              f"{a.get('bleu', 0):>7.2f}/{a.get('exact_match', 0):<6.3f} {f.get('bleu', 0):>7.2f}/{f.get('exact_match', 0):<6.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.only and args.out.exists():  # keep the other variant's last result
        kept = [r for r in json.loads(args.out.read_text()).get("results", []) if r["variant"] != args.only]
        results = sorted(kept + results, key=lambda r: r["variant"] != "lattice")
    payload = {
        "command": "python benchmarks/lattice_qa.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "config": str(args.config.relative_to(REPO)) if args.config.is_relative_to(REPO) else str(args.config),
        "seconds": args.seconds, "steps": args.steps, "threads": args.threads, "cpu_count": os.cpu_count(),
        "platform": platform.platform(), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "results": results,
    }
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
