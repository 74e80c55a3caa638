"""Fact recall vs gap length: sliding-window attention alone vs with Titans long-term memory.

Both variants are the same NeatModel (same seed, same data, same steps); one has the Titans memory as context in
its last block. Each is trained on ``temporal_gap`` memory tasks (facts, then ``gap`` bytes of routine text, then
the question) with gaps drawn from ``--train-gaps``, then evaluated on held-out generated tasks (another seed
stream) at each gap of ``--gaps``: a task counts as recalled when the whole completion ``#### <value>\\n<eos>`` is
the greedy (argmax) prediction. Chance is 1/10 (one-digit values). Each variant runs in its own process so its peak
RSS is its own; training and inference throughput are measured in it.

    OMP_NUM_THREADS=1 python benchmarks/neat_memory.py --max-minutes 14  # the measured run (docs/neat.md, Results)
    python benchmarks/neat_memory.py --steps 20 --eval-samples 20      # smoke run
    OMP_NUM_THREADS=1 python benchmarks/neat_memory.py --svf           # the SVF experiment (key "svf" of the JSON)
    OMP_NUM_THREADS=1 python benchmarks/neat_memory.py --task mqar     # multi-query recall (neat_memory_tasks.py)

Writes ``benchmarks/results/neat_memory.json`` (atomically) and keeps the checkpoints in ``runs/neat_memory/``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "neat_memory.json"
VARIANTS = ("window", "titans")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3000, help="training steps per variant (the cosine schedule's length)")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="wall-clock training budget per variant (the steps reached are reported)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--block-size", type=int, default=176)
    p.add_argument("--window", type=int, default=16, help="sliding-window attention span (bytes)")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--n-facts", type=int, default=1)
    p.add_argument("--train-gaps", type=int, nargs=2, default=(0, 128), metavar=("MIN", "MAX"))
    p.add_argument("--gaps", type=int, nargs="+", default=[8, 64, 128])
    p.add_argument("--eval-samples", type=int, default=200, help="held-out tasks per gap")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--answer-weight", type=float, default=1000.0,
                   help="loss weight of the completion bytes (the answer) relative to the routine text")
    p.add_argument("--memory-depth", type=int, default=1)
    p.add_argument("--dim-memory", type=int, default=16)
    p.add_argument("--chunk-size", type=int, default=16)
    p.add_argument("--max-lr", type=float, default=4.0, help="upper bound of the memory's inner step θ")
    p.add_argument("--conv-kernel", type=int, default=4, help="causal depthwise conv over the memory's q/k/v (0: none)")
    p.add_argument("--readout-gate", action=argparse.BooleanOptionalAction, default=True,
                   help="also add the memory readouts to the residual stream (gated), not only as attention context")
    p.add_argument("--gap-warmup", type=int, default=0,
                   help="curriculum: batches over which the largest training gap grows from MIN to MAX")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--jobs", type=int, default=2, help="variants trained in parallel (separate processes)")
    p.add_argument("--runs-dir", default=str(REPO / "runs" / "neat_memory"))
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--eval-only", action="store_true", help="reuse the checkpoints in --runs-dir")
    p.add_argument("--resume", action="store_true",
                   help="continue training from the checkpoints in --runs-dir (steps, optimizer and the elapsed time "
                        "count on, so --max-minutes is the total budget)")
    p.add_argument("--svf", action="store_true",
                   help="run the SVF experiment instead: train a base model on the math tasks, then only the z vector "
                        "of one task's expert; report exact match per task before and after (key 'svf' of the JSON)")
    p.add_argument("--svf-task", default="arithmetic")
    p.add_argument("--svf-base-minutes", type=float, default=8.0)
    p.add_argument("--svf-z-minutes", type=float, default=4.0)
    p.add_argument("--svf-lr", type=float, default=2e-3)
    p.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------------------
# one variant (runs in its own process)


def build_model(args: argparse.Namespace, variant: str):
    from neat_lightning.components.titans import TitansConfig
    from neat_lightning.modules.neat import NeatModel

    titans = variant == "titans"
    tc = TitansConfig(
        dim_memory=args.dim_memory, memory_depth=args.memory_depth, memory_expansion=2.0,
        chunk_size=args.chunk_size, persistent_tokens=4, memory_size=256, max_lr=args.max_lr,
        conv_kernel=args.conv_kernel, readout_gate=args.readout_gate,
    )
    return NeatModel(
        dim=args.dim, n_layers=args.layers, heads=4, block_size=args.block_size, window=args.window,
        titans=titans, titans_config=tc, svf=False, active_components=["titans"] if titans else [],
        answer_weight=args.answer_weight, learning_rate=args.lr, warmup_steps=min(100, args.steps // 10 + 1),
    )


def recall_rows(args: argparse.Namespace, gap: int):
    """Held-out temporal-gap tasks at exactly ``gap``: ids (N, T + 1), answer ids (N, T + 1)."""
    import torch

    from neat_lightning.data.generators.math import generate_problem, pack_problems, rng_for

    ids, ans = [], []
    for i in range(args.eval_samples):
        rng = rng_for("recall-eval", args.seed, gap, i)  # a seed stream the training data never uses
        p = generate_problem("temporal_gap", 2, rng, gap=gap, n_facts=args.n_facts)
        row, a, _ = pack_problems([p], args.block_size + 1)
        ids.append(row)
        ans.append(a)
    return torch.stack(ids), torch.stack(ans)


def run_worker(args: argparse.Namespace, variant: str) -> dict:
    import lightning as L
    import torch
    from neat_memory_tasks import progress_callback

    from neat_lightning.data.math import TASK_TYPES, MathDataModule
    from neat_lightning.modules.neat import NeatModel
    from neat_lightning.modules.neat_output import exact_match_counts

    warnings.filterwarnings("ignore")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    runs = Path(args.runs_dir)
    runs.mkdir(parents=True, exist_ok=True)
    ckpt = runs / f"{variant}.ckpt"
    result: dict = {"variant": variant}
    if args.eval_only:
        model = NeatModel.load_from_checkpoint(ckpt, map_location="cpu")
        result.update(json.loads((runs / f"{variant}.train.json").read_text()))
    else:
        resume = args.resume and ckpt.exists()
        before = json.loads((runs / f"{variant}.train.json").read_text()) if resume else {}
        L.seed_everything(args.seed, verbose=False)
        model = build_model(args, variant)
        data = MathDataModule(
            tasks=["temporal_gap"], difficulties=[2], gap_range=tuple(args.train_gaps), n_facts=args.n_facts,
            block_size=args.block_size, batch_size=args.batch_size, batches_per_epoch=args.steps, seed=args.seed,
            gap_warmup=args.gap_warmup,
        )
        progress = progress_callback(variant)
        max_time = None if args.max_minutes is None else {"seconds": int(args.max_minutes * 60)}
        trainer = L.Trainer(
            accelerator="cpu", max_steps=args.steps, max_time=max_time, callbacks=[progress], logger=False, enable_progress_bar=False,
            enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0, gradient_clip_val=1.0,
            default_root_dir=str(runs),
        )
        t0 = progress.t0 = time.perf_counter()
        trainer.fit(model, data, ckpt_path=str(ckpt) if resume else None)
        train_s = time.perf_counter() - t0 + before.get("train_seconds", 0.0)
        trainer.save_checkpoint(ckpt)
        train = {
            "train_steps": int(trainer.global_step),
            "train_seconds": round(train_s, 1),
            "train_tokens_per_s": round(trainer.global_step * args.batch_size * args.block_size / train_s, 1),
            "final_train_loss": round(float(trainer.callback_metrics.get("train/loss", float("nan"))), 4),
            "params": sum(p.numel() for p in model.parameters()),
        }
        (runs / f"{variant}.train.json").write_text(json.dumps(train))
        result.update(train)
    model.eval()
    recall = {}
    with torch.inference_mode():
        for gap in args.gaps:
            ids, ans = recall_rows(args, gap)
            correct = total = 0.0
            for s in range(0, len(ids), 50):
                x, y, seg = ids[s : s + 50, :-1], ids[s : s + 50, 1:], ans[s : s + 50, 1:]
                task = torch.full((len(x),), TASK_TYPES.index("temporal_gap"))
                c, t = exact_match_counts(model(x), y, seg, task, len(TASK_TYPES))
                correct, total = correct + float(c.sum()), total + float(t.sum())
            recall[str(gap)] = round(correct / total, 4)
        x = ids[:16, :-1]
        model(x)  # warm-up
        t0, n = time.perf_counter(), 0
        while time.perf_counter() - t0 < 3.0:
            model(x)
            n += 1
        infer_tps = n * x.numel() / (time.perf_counter() - t0)
    result.update({
        "recall": recall,
        "inference_tokens_per_s": round(infer_tps, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    })
    return result


# ----------------------------------------------------------------------------------------------------------------------
# SVF: train one expert's z, compare exact match per task with the base model


def run_svf(args: argparse.Namespace) -> dict:
    import lightning as L
    import torch

    from neat_lightning.data.math import MATH_TASKS, MathDataModule
    from neat_lightning.modules.neat import NeatModel
    from neat_lightning.modules.neat_config import SVFConfig

    warnings.filterwarnings("ignore")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    L.seed_everything(args.seed, verbose=False)
    model = NeatModel(
        dim=args.dim, n_layers=args.layers, heads=4, block_size=128, window=64, titans=False, svf=True,
        svf_config=SVFConfig(dispatch="classify", train_experts=(args.svf_task,)), active_components=[],
        answer_weight=4.0,
        learning_rate=args.lr, warmup_steps=50,
    )
    data = MathDataModule(tasks=list(MATH_TASKS), difficulties=[1], block_size=128, batch_size=16,
                          batches_per_epoch=100_000, val_batches=24, seed=args.seed)

    def phase(minutes: float, name: str) -> tuple[int, float]:
        trainer = L.Trainer(accelerator="cpu", max_steps=100_000, max_time={"seconds": int(minutes * 60)},
                            logger=False, enable_progress_bar=False, enable_model_summary=False,
                            enable_checkpointing=False, limit_val_batches=0, gradient_clip_val=1.0,
                            default_root_dir=args.runs_dir)
        t0 = time.perf_counter()
        trainer.fit(model, data)
        print(f"svf {name}: {trainer.global_step} steps", file=sys.stderr, flush=True)
        return int(trainer.global_step), round(time.perf_counter() - t0, 1)

    def evaluate() -> dict:
        trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
        metrics = trainer.validate(model, data, verbose=False)[0]
        return {k.split("/", 1)[1]: round(float(v), 4) for k, v in metrics.items() if k.startswith("val/")}

    base_steps, base_s = phase(args.svf_base_minutes, "base")
    base = evaluate()
    model.set_component_active("svf", True)  # decompose the trained weights; only z + the dispatcher train now
    model.hparams.learning_rate = args.svf_lr
    z_steps, z_s = phase(args.svf_z_minutes, "z")
    svf = evaluate()
    tasks = [k for k in base if k.startswith("exact_match/")]
    return {
        "task": args.svf_task,
        "base_steps": base_steps, "base_seconds": base_s, "z_steps": z_steps, "z_seconds": z_s,
        "base": base, "svf": svf,
        "delta_points": {k.split("/", 1)[1]: round(100 * (svf[k] - base[k]), 2) for k in tasks},
        "trainable_z": sum(layer.z[0].numel() for layer in model.modules() if hasattr(layer, "svf_active")),
    }


def write_results(out: Path, key: str | None, payload: dict) -> None:
    """Write (or with ``key`` merge into) the JSON atomically."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if key is not None:
        current = json.loads(out.read_text()) if out.exists() else {"benchmark": "neat_memory"}
        current[key] = payload
        payload = current
    elif out.exists() and "svf" in (old := json.loads(out.read_text())):
        payload["svf"] = old["svf"]
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, out)


# ----------------------------------------------------------------------------------------------------------------------
# driver


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a == "--task" or a.startswith("--task=") for a in argv):  # mqar / needle: their own driver
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import neat_memory_tasks

        return neat_memory_tasks.main(argv)
    args = parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(run_worker(args, args.worker)), flush=True)
        return 0
    if args.svf:
        result = run_svf(args)
        print(f"SVF: base {result['base_steps']} steps, z ({args.svf_task} only) {result['z_steps']} steps; "
              f"dispatch accuracy {result['svf'].get('dispatch_acc', float('nan')):.3f}")
        print(f"{'task':<14} {'base':>7} {'svf':>7} {'delta pts':>9}")
        for name, delta in result["delta_points"].items():
            print(f"{name:<14} {result['base']['exact_match/' + name]:>7.3f} {result['svf']['exact_match/' + name]:>7.3f}"
                  f" {delta:>+9.2f}")
        write_results(Path(args.out), "svf", {"settings": {k: v for k, v in vars(args).items() if k.startswith("svf")
                                                            or k in ("dim", "layers", "lr", "seed")}, **result})
        print(f"wrote {args.out}")
        return 0
    Path(args.runs_dir).mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONWARNINGS": "ignore"}
    from neat_memory_tasks import WorkerFailed, run_workers

    def log_path(variant: str) -> Path:
        return Path(args.runs_dir) / f"{variant}.log"

    try:
        results = dict(run_workers(args.variants, lambda v: [sys.executable, __file__, *argv, "--worker", v],
                                   log_path, env, args.jobs))
    except WorkerFailed as err:
        print(f"variant {err.job} failed; see {log_path(err.job)}", file=sys.stderr)
        return 1

    gaps = [str(g) for g in args.gaps]
    header = f"{'variant':<8} " + " ".join(f"gap {g:>4}" for g in gaps) + "  train s  steps  train tok/s  infer tok/s  RSS MB"
    print(f"recall (exact match of the answer) vs gap; window {args.window} bytes; chance 0.10")
    print(header)
    for v in args.variants:
        r = results[v]
        print(f"{v:<8} " + " ".join(f"{r['recall'][g]:>8.3f}" for g in gaps)
              + f"  {r['train_seconds']:>7.0f}  {r['train_steps']:>5}  {r['train_tokens_per_s']:>11.0f}"
              + f"  {r['inference_tokens_per_s']:>11.0f}  {r['peak_rss_mb']:>6.0f}")
    payload = {
        "benchmark": "neat_memory",
        "settings": {k: v for k, v in vars(args).items() if k not in ("worker", "out", "runs_dir", "jobs")},
        "chance": 0.1,
        "cpu_threads": int(env["OMP_NUM_THREADS"]),
        "results": results,
    }
    write_results(Path(args.out), None, payload)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
