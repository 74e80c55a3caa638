"""Selective recall beyond the attention window: MQAR and needle tasks, window-only vs full attention vs Titans.

Called through ``benchmarks/neat_memory.py --task mqar`` (or ``--task needle``). Every (variant, k, seed) is one
NeatModel trained in its own process (so its peak RSS and CPU time are its own) on the generator's ``mqar`` task
(``k`` facts ``key=v.``, exactly ``gap`` routine bytes, then ``queries`` queries ``key=`` whose values are scored
each on its own), then evaluated on 200 held-out tasks (another seed stream) at every gap of ``--gaps``. Accuracy is
the per-query exact match of the value (greedy-equivalent, teacher-forced argmax); chance is 1/10.

Variants: ``window_only`` (sliding window ``--window``), ``full_attention`` (the same model, window = the block),
``titans`` (sliding window + Titans memory in the last block) and ablations written ``titans[field=value,...]``: the
fields are ``TitansConfig`` fields or ``answer_weight`` / ``lr`` / ``facts_warmup`` / ``gap_warmup``, e.g.
``titans[conv_kernel=0]`` or ``titans[memory_depth=2,dim_memory=32]``.

    OMP_NUM_THREADS=1 python benchmarks/neat_memory.py --task mqar --k 4 8 --seeds 0 1 2 --max-minutes 8
    python benchmarks/neat_memory.py --task mqar --k 2 --seeds 0 --steps 4 --eval-samples 8   # smoke run
    OMP_NUM_THREADS=1 python benchmarks/neat_memory.py --task needle --depths 0.1 0.5 0.9 --gaps 128

Writes ``benchmarks/results/neat_memory_mqar.json`` (``neat_memory_needle.json``): a list ``rows``, one per
variant x k x gap (variant x depth for the needle), each with the mean accuracy over seeds, the per-seed
accuracies, chance, training steps (mean over seeds), CPU seconds (training + evaluation, mean over seeds) and the
peak RSS (max over seeds).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASES = ("window_only", "full_attention", "titans")
RUN_FIELDS = {"answer_weight": float, "lr": float, "facts_warmup": int, "gap_warmup": int, "steps": int}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=("mqar", "needle"), default="mqar")
    p.add_argument("--variants", nargs="+", default=list(BASES),
                   help="window_only, full_attention, titans, or an ablation titans[field=value,...]")
    p.add_argument("--k", type=int, nargs="+", default=[4, 8], help="facts per task (mqar)")
    p.add_argument("--queries", type=int, default=2, help="scored queries per task (mqar)")
    p.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9],
                   help="relative depths of the fact (needle), evaluated each")
    p.add_argument("--gaps", type=int, nargs="+", default=[64],
                   help="evaluated gaps: routine bytes between the last fact and the first query (mqar), "
                        "the document length (needle)")
    p.add_argument("--train-gaps", type=int, nargs=2, default=None, metavar=("MIN", "MAX"),
                   help="training gap range; default 0 .. max of --gaps")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=3000, help="training steps (the cosine schedule's length)")
    p.add_argument("--max-minutes", type=float, default=None, help="wall-clock training budget per model")
    p.add_argument("--eval-samples", type=int, default=200, help="held-out tasks per gap (or depth) and seed")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--window", type=int, default=16)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--answer-weight", type=float, default=1000.0)
    p.add_argument("--facts-warmup", type=int, default=500,
                   help="batches over which the facts grow from 1 to k (0: k from the start)")
    p.add_argument("--gap-warmup", type=int, default=0, help="batches over which the largest gap grows")
    p.add_argument("--memory-depth", type=int, default=1)
    p.add_argument("--dim-memory", type=int, default=16)
    p.add_argument("--chunk-size", type=int, default=16)
    p.add_argument("--max-lr", type=float, default=4.0)
    p.add_argument("--conv-kernel", type=int, default=4)
    p.add_argument("--jobs", type=int, default=1, help="models trained in parallel (separate processes)")
    p.add_argument("--runs-dir", default=str(REPO / "runs" / "neat_memory_tasks"))
    p.add_argument("--out", default=None, help="default benchmarks/results/neat_memory_<task>.json")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # "variant|k|seed"
    args = p.parse_args(argv)
    if args.train_gaps is None:
        args.train_gaps = (0, max(args.gaps))
    if args.out is None:
        args.out = str(REPO / "benchmarks" / "results" / f"neat_memory_{args.task}.json")
    for v in args.variants:
        parse_variant(v, args)  # refuse bad names before any training
    return args


def parse_variant(spec: str, args: argparse.Namespace) -> tuple[str, dict, dict]:
    """``titans[memory_depth=2,lr=1e-3]`` -> ("titans", TitansConfig overrides, run overrides)."""
    from neat_lightning.components.titans import TitansConfig

    m = re.fullmatch(r"(\w+)(?:\[(.*)\])?", spec)
    if m is None or m.group(1) not in BASES:
        raise SystemExit(f"--variants: {spec!r} is not one of {list(BASES)} or an ablation 'titans[field=value,...]'")
    fields = {f.name: f.type for f in dataclasses.fields(TitansConfig)}
    titans, run = {}, {}
    for item in filter(None, (m.group(2) or "").split(",")):
        key, _, value = item.partition("=")
        if key in RUN_FIELDS:
            run[key] = RUN_FIELDS[key](value)
        elif key in fields and m.group(1) == "titans":
            titans[key] = {"True": True, "False": False}.get(value, None)
            if titans[key] is None:
                titans[key] = float(value) if "." in value or "e" in value else int(value)
        else:
            raise SystemExit(f"--variants {spec!r}: {key!r} is not a TitansConfig field or one of {list(RUN_FIELDS)}")
    return m.group(1), titans, run


# ----------------------------------------------------------------------------------------------------------------------
# one model (runs in its own process)


def block_size(args: argparse.Namespace, k: int) -> int:
    """Bytes per row: the longest task (largest gap, k facts, the queries), rounded up to 16."""
    from neat_lightning.data.generators.math import memory_overhead

    need = max(max(args.gaps), args.train_gaps[1]) + memory_overhead(args.task, 2, k, args.queries)
    return -(-need // 16) * 16


def build_model(args: argparse.Namespace, base: str, titans_over: dict, run: dict, block: int):
    from neat_lightning.components.titans import TitansConfig
    from neat_lightning.modules.neat import NeatModel

    cfg = dict(dim_memory=args.dim_memory, memory_depth=args.memory_depth, chunk_size=args.chunk_size,
               persistent_tokens=4, memory_size=256, max_lr=args.max_lr, conv_kernel=args.conv_kernel)
    titans = base == "titans"
    steps = run.get("steps", args.steps)
    return NeatModel(
        dim=args.dim, n_layers=args.layers, heads=4, block_size=block,
        window=block if base == "full_attention" else args.window,
        titans=titans, titans_config=TitansConfig(**{**cfg, **titans_over}), svf=False,
        active_components=["titans"] if titans else [], answer_weight=run.get("answer_weight", args.answer_weight),
        learning_rate=run.get("lr", args.lr), warmup_steps=min(100, steps // 10 + 1),
    )


def eval_rows(args: argparse.Namespace, k: int, seed: int, gap: int, depth: float | None, block: int):
    """Held-out tasks at exactly ``gap`` (and ``depth``): ids (N, T + 1), completion ids (N, T + 1)."""
    import torch

    from neat_lightning.data.generators.math import generate_problem, pack_problems, rng_for

    ids, ans = [], []
    for i in range(args.eval_samples):
        rng = rng_for(f"{args.task}-eval", seed, k, gap, depth, i)  # a seed stream the training data never uses
        p = generate_problem(args.task, 2, rng, gap=gap, n_facts=k, queries=args.queries, depth=depth)
        row, a, _ = pack_problems([p], block + 1)
        ids.append(row)
        ans.append(a)
    return torch.stack(ids), torch.stack(ans)


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def progress_callback(prefix: str):
    """A Lightning callback that prints ``<prefix> step <N> loss <train/loss> <seconds>s`` to stderr every 50 steps
    (also used by ``neat_memory.py``); the seconds count from its ``t0``, ``time.perf_counter()`` when it is made
    (a caller may set it later). Lightning is imported here, so ``--help`` stays fast."""
    from lightning.pytorch.callbacks import Callback

    class Progress(Callback):
        def __init__(self) -> None:
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step % 50 == 0:
                loss = float(trainer.callback_metrics.get("train/loss", float("nan")))
                print(f"{prefix} step {trainer.global_step} loss {loss:.4f} "
                      f"{time.perf_counter() - self.t0:.0f}s", file=sys.stderr, flush=True)

    return Progress()


def run_worker(args: argparse.Namespace, spec: str, k: int, seed: int) -> dict:
    import lightning as L
    import torch

    from neat_lightning.data.math import TASK_TYPES, MathDataModule
    from neat_lightning.modules.neat_output import exact_match_counts

    warnings.filterwarnings("ignore")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    base, titans_over, run = parse_variant(spec, args)
    block = block_size(args, k)
    steps = run.get("steps", args.steps)
    L.seed_everything(seed, verbose=False)
    model = build_model(args, base, titans_over, run, block)
    data = MathDataModule(
        tasks=[args.task], difficulties=[2], gap_range=tuple(args.train_gaps), n_facts=k, queries=args.queries,
        block_size=block, batch_size=args.batch_size, batches_per_epoch=steps, seed=seed,
        gap_warmup=run.get("gap_warmup", args.gap_warmup),
        facts_warmup=run.get("facts_warmup", args.facts_warmup) if args.task == "mqar" else 0,
    )
    progress = progress_callback(f"{spec} k={k} seed={seed}")
    t0 = progress.t0
    trainer = L.Trainer(
        accelerator="auto", devices=1, max_steps=steps,
        max_time=None if args.max_minutes is None else {"seconds": int(args.max_minutes * 60)},
        callbacks=[progress], logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, limit_val_batches=0, gradient_clip_val=1.0, default_root_dir=args.runs_dir,
    )
    trainer.fit(model, data)
    train_s = time.perf_counter() - t0
    model.eval()
    device = next(model.parameters()).device
    points = [(g, None) for g in args.gaps] if args.task == "mqar" else [(g, d) for g in args.gaps for d in args.depths]
    accuracy = {}
    with torch.inference_mode():
        for gap, depth in points:
            ids, ans = eval_rows(args, k, seed, gap, depth, block)
            correct = total = 0.0
            for s in range(0, len(ids), 50):
                x, y, seg = (z[s : s + 50].to(device) for z in (ids[:, :-1], ids[:, 1:], ans[:, 1:]))
                task = torch.full((len(x),), TASK_TYPES.index(args.task), device=device)
                c, t = exact_match_counts(model(x), y, seg, task, len(TASK_TYPES))
                correct, total = correct + float(c.sum()), total + float(t.sum())
            accuracy[f"{gap}" if depth is None else f"{gap}@{depth}"] = round(correct / total, 4)
    return {
        "variant": spec, "k": k, "seed": seed, "block": block, "steps": int(trainer.global_step),
        "train_s": round(train_s, 1), "cpu_s": round(cpu_seconds(), 1), "accuracy": accuracy,
        "final_train_loss": round(float(trainer.callback_metrics.get("train/loss", float("nan"))), 4),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


# ----------------------------------------------------------------------------------------------------------------------
# driver


def collect_rows(args: argparse.Namespace, runs: list[dict]) -> list[dict]:
    """One row per variant x k x gap (mqar) or variant x gap x depth (needle), averaged over seeds."""
    rows = []
    chance = 0.1  # one-digit values
    for spec in args.variants:
        for k in args.k if args.task == "mqar" else [1]:
            mine = sorted((r for r in runs if r["variant"] == spec and r["k"] == k), key=lambda r: r["seed"])
            if not mine:
                continue
            for key in mine[0]["accuracy"]:
                per_seed = [r["accuracy"][key] for r in mine]
                gap, _, depth = key.partition("@")
                row = {"variant": spec, "k": k, "queries": args.queries if args.task == "mqar" else 1, "gap": int(gap)}
                if depth:
                    row["depth"] = float(depth)
                row.update({
                    "window": mine[0]["block"] if spec.startswith("full_attention") else args.window,
                    "accuracy": round(sum(per_seed) / len(per_seed), 4), "accuracy_per_seed": per_seed,
                    "chance": chance, "steps": round(sum(r["steps"] for r in mine) / len(mine)),
                    "cpu_s": round(sum(r["cpu_s"] for r in mine) / len(mine), 1),
                    "peak_rss_mb": max(r["peak_rss_mb"] for r in mine),
                })
                rows.append(row)
    return rows


def print_table(args: argparse.Namespace, rows: list[dict]) -> None:
    extra = "depth " if args.task == "needle" else ""
    print(f"{args.task}: per-query exact match (mean over seeds {args.seeds}; {args.eval_samples} tasks each); "
          f"chance {rows[0]['chance'] if rows else 0.1}")
    print(f"{'variant':<34} {'k':>2} {'q':>2} {'gap':>5} {extra}{'window':>6} {'accuracy':>8}  per seed"
          f"{'':<16} {'steps':>6} {'cpu s':>7} {'RSS MB':>7}")
    for r in rows:
        d = f"{r['depth']:>5} " if "depth" in r else ""
        seeds = " ".join(f"{a:.3f}" for a in r["accuracy_per_seed"])
        print(f"{r['variant']:<34} {r['k']:>2} {r['queries']:>2} {r['gap']:>5} {d}{r['window']:>6} "
              f"{r['accuracy']:>8.3f}  {seeds:<24} {r['steps']:>6} {r['cpu_s']:>7.0f} {r['peak_rss_mb']:>7.0f}")


class WorkerFailed(RuntimeError):
    """A worker process exited non-zero; ``job`` names it."""

    def __init__(self, job) -> None:
        super().__init__(f"worker {job} failed")
        self.job = job


def run_workers(jobs: list, command, log_path, env: dict[str, str], parallel: int):
    """Run one worker process per job, ``parallel`` at a time, in order; yield ``(job, result)`` as each finishes, its
    result the JSON after ``RESULT `` on its stdout. ``command(job)`` is the argv, ``log_path(job)`` the file that gets
    its stderr. A worker exiting non-zero raises :class:`WorkerFailed`."""
    pending, running = list(jobs), []
    while pending or running:
        while pending and len(running) < max(1, parallel):
            job = pending.pop(0)
            log = open(log_path(job), "w")
            proc = subprocess.Popen(command(job), stdout=subprocess.PIPE, stderr=log, text=True, env=env)
            running.append((job, proc))
        job, proc = running.pop(0)
        out, _ = proc.communicate()
        if proc.returncode != 0:
            raise WorkerFailed(job)
        yield job, json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.worker:
        spec, k, seed = args.worker.split("|")
        print("RESULT " + json.dumps(run_worker(args, spec, int(k), int(seed))), flush=True)
        return 0
    runs_dir = Path(args.runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONWARNINGS": "ignore"}
    ks = args.k if args.task == "mqar" else [1]
    jobs = [(v, k, s) for v in args.variants for k in ks for s in args.seeds]
    script = str(REPO / "benchmarks" / "neat_memory.py")
    runs: list[dict] = []

    def command(job: tuple) -> list[str]:
        return [sys.executable, script, *argv, "--worker", "|".join(map(str, job))]

    def log_path(job: tuple) -> Path:
        name = re.sub(r"[^\w=.-]+", "_", f"{job[0]}_k{job[1]}_s{job[2]}")
        return runs_dir / f"{args.task}_{name}.log"

    try:
        for job, result in run_workers(jobs, command, log_path, env, args.jobs):
            runs.append(result)
            print(f"done {job}: {result['accuracy']} in {result['steps']} steps, {result['cpu_s']} CPU s",
                  file=sys.stderr, flush=True)
    except WorkerFailed as err:
        print(f"{err.job} failed; see the logs in {runs_dir}", file=sys.stderr)
        return 1
    rows = collect_rows(args, runs)
    print_table(args, rows)
    settings = {k: v for k, v in vars(args).items() if k not in ("worker", "out", "runs_dir", "jobs")}
    payload = {"benchmark": f"neat_memory_{args.task}", "settings": settings,
               "cpu_threads": int(env["OMP_NUM_THREADS"]), "rows": rows, "runs": runs}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, out)
    print(f"wrote {out}")
    return 0
