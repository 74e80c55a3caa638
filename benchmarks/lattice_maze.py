"""Mazes: does the lattice's iterated local rule extrapolate where a fixed-depth network cannot, and do plasticity
and emergence feedback change anything?

Four models, each trained on 9x9-cell mazes with a real ``lightning.Trainer`` from ``configs/lattice_maze.yaml``
(seeds 0, 1, 2 by default), then tested on held-out mazes of 1x, 2x, 4x and 8x the rooms a side (9, 17, 33 and 65
cells) with ``test_steps = val_steps·f²`` lattice steps:

- ``lattice``: the config as shipped (plasticity with emergence feedback and emergence-aware pruning, stage table);
- ``lattice_no_emergence``: the same, ``plasticity.emergence_feedback: false``, ``emergence_pruning: 0``;
- ``lattice_no_plasticity``: ``plasticity.enabled: false`` and no stage table (connections stay at their init);
- ``fixed_depth``: ``use_lattice: false``, a residual 3x3 conv net of ``lattice.steps`` layers with the lattice
  model's parameter count (its receptive field is its depth; step counts do not apply);
- ``fixed_depth_wide`` (only with ``--models``): the same network 16 channels wide, not parameter-matched;
- ``lattice_axial``, ``lattice_d4`` and their ``_no_plasticity`` / ``_no_emergence`` forms (only with ``--models``):
  the three lattice models with ``maze.taps`` set to ``axial`` (the rule sees its four neighbours in a fixed order)
  or ``d4`` (averaged over the square's 8 symmetries), whatever the config says.

    python benchmarks/lattice_maze.py                                  # everything; resumes what the JSON has
    python benchmarks/lattice_maze.py --models lattice --seeds 0 --sizes 1 2 4     # one run, three sizes
    python benchmarks/lattice_maze.py --report                         # rebuild table, rows and PNG from the JSON
    python benchmarks/lattice_maze.py --sweep 120 240 480 960 1920 --sizes 4 --mazes 100   # seed 0's lattice
    python benchmarks/lattice_maze.py --views 8 --mazes 256 128 100 16   # also score 8 views with the path check

The JSON (``benchmarks/results/lattice_maze.json``) keeps every (model, seed) run under ``runs`` (written after each
run, atomically, so a long benchmark can be done in pieces) and the aggregate ``rows``: one per model x size factor
with ``model``, ``size_factor``, ``maze_cells``, ``test_steps``, ``exact_path_accuracy`` (mean over seeds),
``per_seed``, ``cell_f1``, ``params``, ``cpu_s`` (training CPU-seconds, mean over seeds), ``eval_cpu_s`` (CPU-seconds
to test that size) and ``seeds``; with ``--views 8`` (every seed tested so) also ``views8_exact_path_accuracy``,
``views8_per_seed``, ``views8_cell_f1`` and ``views8_path_checked``: each maze run in its 8 rotations and reflections,
the answer the shortest prediction that is one simple path from start to goal (a label-free check, exact on the
generator's perfect mazes), else the per-cell majority; ``views8_path_checked`` is the share of answers that passed.
CPU-seconds are ``time.process_time`` of this process, which a busy machine does not inflate as it does wall time;
the load average is recorded beside them. The PNG shows one solved maze per size.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results" / "lattice_maze.json"
CONFIG = REPO / "configs" / "lattice_maze.yaml"
MODELS = ("lattice", "fixed_depth", "lattice_no_plasticity", "lattice_no_emergence")
# run with --models: a fixed-depth network wide enough to learn the training size (not parameter-matched), and the
# lattice models with a given rule (the infix after "lattice_" sets maze.taps)
TAPS = ("axial", "d4")
EXTRA_MODELS = ("fixed_depth_wide",) + tuple(
    f"lattice_{taps}{ablation}" for taps in TAPS for ablation in ("", "_no_plasticity", "_no_emergence"))
WIDE = 16  # channels of fixed_depth_wide


def variant(config: dict, model: str) -> tuple[dict, bool]:
    """The model's init_args for one variant and whether it keeps the config's stage table."""
    args = copy.deepcopy(config["model"]["init_args"])
    for taps in TAPS:
        if model.startswith(f"lattice_{taps}"):
            args.setdefault("maze", {})["taps"] = taps
            model = model.replace(f"_{taps}", "", 1)
    plasticity = args.setdefault("plasticity", {})
    if model in ("fixed_depth", "fixed_depth_wide"):
        args["use_lattice"] = False
        if model == "fixed_depth_wide":
            args["baseline_width"] = WIDE
        return args, False
    if model == "lattice_no_plasticity":
        plasticity["enabled"] = False
        return args, False
    if model == "lattice_no_emergence":
        plasticity["emergence_feedback"] = False
        plasticity["emergence_pruning"] = 0.0
    return args, True


def stage_callbacks(config: dict) -> list:
    from neat_lightning.callbacks.plasticity_stages import PlasticityStages, Stage

    out = []
    for spec in config["trainer"].get("callbacks", []):
        if spec["class_path"].endswith("PlasticityStages"):
            kw = dict(spec.get("init_args", {}))
            kw["stages"] = [Stage(**s) for s in kw.get("stages", [])]
            out.append(PlasticityStages(**kw))
    return out


def train(config: dict, model: str, seed: int, steps: int, run_dir: Path):
    """Train one (model, seed); returns the module and the run record."""
    import lightning as L

    from neat_lightning.data.maze import MazeDataModule
    from neat_lightning.modules.lattice_maze import LatticeMazeSolver

    args, stages = variant(config, model)
    L.seed_everything(seed)
    module = LatticeMazeSolver(**{**args, "lattice_seed": seed})
    data_args = {**config["data"]["init_args"], "seed": 1234 + seed}
    tcfg = config["trainer"]
    trainer = L.Trainer(
        max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        gradient_clip_val=tcfg.get("gradient_clip_val"), deterministic=True,
        callbacks=stage_callbacks(config) if stages else [], default_root_dir=run_dir,
    )
    load0, wall0, cpu0 = os.getloadavg(), time.perf_counter(), time.process_time()
    trainer.fit(module, MazeDataModule(**data_args))
    cpu_s, wall_s = time.process_time() - cpu0, time.perf_counter() - wall0
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer.save_checkpoint(run_dir / f"{model}_s{seed}.ckpt")
    record = {
        "model": model, "seed": seed, "steps": trainer.global_step, "train_cpu_s": round(cpu_s, 1),
        "train_wall_s": round(wall_s, 1), "load_average_before": load0, "load_average_after": os.getloadavg(),
        "params": sum(p.numel() for p in module.parameters()),
        "taps": module.maze_config.taps if module.hparams.use_lattice else None,
        "train_loss": float(trainer.callback_metrics.get("train/loss", float("nan"))),
        "sparsity": module.sparsity, "profile": module.profile.name, "sizes": {},
    }
    if not module.hparams.use_lattice:
        record["fixed_depth_width"], record["fixed_depth_layers"] = module.net.width, module.net.depth
    return module, record


def evaluate(module, data, factor: int, n_mazes: int, batch: int, views: int = 1) -> dict:
    """Exact-path accuracy and per-cell F1 on ``n_mazes`` held-out mazes at ``factor`` x the training rooms, of the
    maze as given; with ``views=8`` also of the answer picked from the maze's 8 rotations and reflections
    (``LatticeMazeSolver.solve``: the shortest view prediction that passes the label-free path check, else the
    per-cell majority), under ``views8_*`` keys, and the share of those answers that passed the check."""
    import torch
    from torchmetrics.functional.classification import binary_f1_score

    from neat_lightning.components.maze_lattice import select_path
    from neat_lightning.modules.lattice_maze import exact_paths

    size = 2 * factor * (module.config.height // 2) + 1
    steps = module.val_steps * factor**2 if module.hparams.use_lattice else module.config.steps
    mazes = data.eval_set(size, n_mazes)
    target = mazes["target"]
    plain, answers, checked = [], [], []
    cpu0 = time.process_time()
    module.eval()
    with torch.no_grad():
        for i in range(0, n_mazes, batch):  # over batches of test mazes
            maze = mazes["maze"][i : i + batch]
            logits = module.view_logits(maze, steps, views)  # (V, b, S, S), the maze as given first
            plain.append((logits[0] > 0).long())
            if views > 1:
                answer, ok = select_path(maze, (logits > 0).long())
                answers.append(answer)
                checked.append(ok)
    exact = lambda pred: float(exact_paths(pred, target).mean())
    f1 = lambda pred: float(binary_f1_score(pred.flatten(), target.flatten()))
    pred = torch.cat(plain)
    out = {"maze_cells": size, "test_steps": steps, "n_mazes": n_mazes,
           "exact_path_accuracy": exact(pred), "cell_f1": f1(pred)}
    if views > 1:
        answer = torch.cat(answers)
        out.update({"views8_exact_path_accuracy": exact(answer), "views8_cell_f1": f1(answer),
                    "views8_path_checked": float(torch.cat(checked).float().mean())})
    return out | {"views": views, "eval_cpu_s": round(time.process_time() - cpu0, 1), "load_average": os.getloadavg()}


def sweep_steps(module, data, factor: int, n_mazes: int, marks: list[int]) -> list[dict]:
    """One run of the lattice on ``n_mazes`` held-out mazes at ``factor`` x the training rooms, continued and scored
    at each step count of ``marks`` (increasing): exact-path accuracy, how many mazes have a false or a missed path
    cell, and how many predictions changed since the previous count (the label-free halting signal)."""
    import torch

    from neat_lightning.modules.lattice_maze import path_scores

    size = 2 * factor * (module.config.height // 2) + 1
    mazes = data.eval_set(size, n_mazes)
    target, rows, state, done, prev = mazes["target"], [], None, 0, None
    module.eval()
    with torch.no_grad():
        for mark in marks:  # over step counts: the run continues from the last count
            state = module.run(mazes["maze"], mark - done, state=state)
            done = mark
            exact, pred = path_scores(module._logits(state, size), target)
            rows.append({
                "maze_cells": size, "test_steps": mark, "n_mazes": n_mazes,
                "exact_path_accuracy": float(exact.mean()),
                "mazes_with_false_cells": int(((pred == 1) & (target == 0)).flatten(1).any(1).sum()),
                "mazes_with_missed_cells": int(((pred == 0) & (target == 1)).flatten(1).any(1).sum()),
                "changed_since_previous": None if prev is None else int((pred != prev).flatten(1).any(1).sum()),
                "load_average": os.getloadavg(),
            })
            prev = pred
            print(json.dumps(rows[-1]), flush=True)
    return rows


def aggregate(runs: list[dict]) -> list[dict]:
    rows = []
    for model in MODELS + EXTRA_MODELS:
        mine = [r for r in runs if r["model"] == model]
        factors = sorted({int(f) for r in mine for f in r["sizes"]})
        for f in factors:
            have = [r for r in mine if str(f) in r["sizes"]]
            sizes = [r["sizes"][str(f)] for r in have]
            mean = lambda xs: round(sum(xs) / len(xs), 4)
            rows.append({
                "model": model, "size_factor": f, "maze_cells": sizes[0]["maze_cells"],
                "test_steps": sizes[0]["test_steps"], "n_mazes": sizes[0]["n_mazes"],
                "exact_path_accuracy": mean([s["exact_path_accuracy"] for s in sizes]),
                "per_seed": {str(r["seed"]): round(s["exact_path_accuracy"], 4) for r, s in zip(have, sizes)},
                "cell_f1": mean([s["cell_f1"] for s in sizes]),
                "per_seed_cell_f1": {str(r["seed"]): round(s["cell_f1"], 4) for r, s in zip(have, sizes)},
                "params": have[0]["params"], "cpu_s": mean([r["train_cpu_s"] for r in have]),
                "eval_cpu_s": mean([s["eval_cpu_s"] for s in sizes]), "seeds": [r["seed"] for r in have],
            })
            if all("views8_exact_path_accuracy" in s for s in sizes):  # every seed also tested in 8 views
                rows[-1].update({
                    "views8_exact_path_accuracy": mean([s["views8_exact_path_accuracy"] for s in sizes]),
                    "views8_per_seed": {str(r["seed"]): round(s["views8_exact_path_accuracy"], 4)
                                        for r, s in zip(have, sizes)},
                    "views8_cell_f1": mean([s["views8_cell_f1"] for s in sizes]),
                    "views8_path_checked": mean([s["views8_path_checked"] for s in sizes]),
                })
    return rows


def table(rows: list[dict]) -> str:
    header = ("| model | size factor | maze cells | test steps | exact-path accuracy (mean) | per seed | cell F1 | "
              "8 views + path check (mean) | per seed | params | train CPU s | eval CPU s |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    seeds = lambda values: ", ".join(f"{v:.2f}" for v in values)
    for r in rows:
        views = (f"{r['views8_exact_path_accuracy']:.3f} | {seeds(r['views8_per_seed'].values())}"
                 if "views8_exact_path_accuracy" in r else "— | —")
        lines.append(f"| {r['model']} | {r['size_factor']} | {r['maze_cells']}x{r['maze_cells']} | {r['test_steps']} "
                     f"| {r['exact_path_accuracy']:.3f} | {seeds(r['per_seed'].values())} | {r['cell_f1']:.3f} | "
                     f"{views} | {r['params']:,} | {r['cpu_s']:.0f} | {r['eval_cpu_s']:.0f} |")
    return "\n".join(lines)


def plot(run_dir: Path, runs: list[dict], config: dict, out: Path) -> None:
    """One held-out maze per size factor, solved by each model's first seed: walls dark, the predicted path
    coloured (green where right, orange where extra), missed path cells red, start blue, goal violet."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from neat_lightning.data.generators.maze import GOAL, START, WALL
    from neat_lightning.data.maze import MazeDataModule
    from neat_lightning.modules.lattice_maze import LatticeMazeSolver

    models = [m for m in ("lattice", "fixed_depth") if (run_dir / f"{m}_s0.ckpt").exists()]
    factors = sorted({int(f) for r in runs for f in r["sizes"]})
    if not models or not factors:
        return
    data = MazeDataModule(**config["data"]["init_args"])
    fig, axes = plt.subplots(len(models), len(factors), figsize=(3.2 * len(factors), 3.4 * len(models)),
                             squeeze=False)
    for i, name in enumerate(models):
        module = LatticeMazeSolver.load_from_checkpoint(run_dir / f"{name}_s0.ckpt", map_location="cpu").eval()
        for j, f in enumerate(factors):
            size = 2 * f * (module.config.height // 2) + 1
            sample = data.eval_set(size, 1)
            maze, target = sample["maze"], sample["target"][0]
            steps = module.val_steps * f**2 if module.hparams.use_lattice else module.config.steps
            with torch.no_grad():
                pred = (module(maze, steps)[0] > 0).long()
            img = torch.ones(size, size, 3)
            img[maze[0] == WALL] = torch.tensor([0.25, 0.25, 0.28])
            img[(pred == 1) & (target == 1)] = torch.tensor([0.2, 0.75, 0.3])
            img[(pred == 1) & (target == 0)] = torch.tensor([1.0, 0.6, 0.1])
            img[(pred == 0) & (target == 1)] = torch.tensor([0.9, 0.1, 0.1])
            img[maze[0] == START] = torch.tensor([0.15, 0.35, 0.95])
            img[maze[0] == GOAL] = torch.tensor([0.6, 0.2, 0.8])
            ax = axes[i][j]
            ax.imshow(img.numpy(), interpolation="nearest")
            ok = "solved" if torch.equal(pred, target) else "not solved"
            ax.set_title(f"{name}, {size}x{size}, {steps} steps: {ok}", fontsize=8)
            ax.axis("off")
    fig.tight_layout()
    tmp = out.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, out)


def write(path: Path, result: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, path)  # atomic: an interrupted run never leaves half a JSON file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS + EXTRA_MODELS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--sizes", nargs="+", type=int, default=[1, 2, 4, 8], help="size factors (rooms a side)")
    parser.add_argument("--mazes", nargs="+", type=int, default=[256, 128, 100, 32],
                        help="held-out mazes per size factor, in the order of --sizes")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the config's max_steps)")
    parser.add_argument("--eval-batch", type=int, default=32)
    parser.add_argument("--views", type=int, default=1, choices=(1, 8),
                        help="8: also test each maze in its 8 rotations and reflections, answering with the shortest "
                             "prediction that passes the path check (views8_* keys); sizes without them are retested")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--run-dir", type=Path, default=REPO / "runs" / "lattice_maze_benchmark")
    parser.add_argument("--fresh", action="store_true", help="retrain runs the JSON already has")
    parser.add_argument("--report", action="store_true", help="only rebuild rows, table and PNG from the JSON")
    parser.add_argument("--sweep", nargs="+", type=int, default=None, metavar="STEPS",
                        help="only score the saved lattice_s{first seed} checkpoint at these step counts, per --sizes")
    args = parser.parse_args()
    if len(args.mazes) < len(args.sizes):
        parser.error(f"--mazes has {len(args.mazes)} counts for {len(args.sizes)} --sizes")

    import torch
    import yaml

    torch.set_num_threads(args.threads)
    config = yaml.safe_load(args.config.read_text())
    steps = args.steps or config["trainer"]["max_steps"]
    config_path = args.config.resolve()
    config_name = str(config_path.relative_to(REPO)) if config_path.is_relative_to(REPO) else str(config_path)
    if args.sweep:
        from neat_lightning.data.maze import MazeDataModule
        from neat_lightning.modules.lattice_maze import LatticeMazeSolver

        module = LatticeMazeSolver.load_from_checkpoint(args.run_dir / f"lattice_s{args.seeds[0]}.ckpt",
                                                        map_location="cpu")
        data = MazeDataModule(**config["data"]["init_args"])
        for f, n in zip(args.sizes, args.mazes):
            sweep_steps(module, data, f, n, sorted(args.sweep))
        return
    result = json.loads(args.out.read_text()) if args.out.exists() else {}
    runs = result.get("runs", [])
    if not args.report:
        from neat_lightning.data.maze import MazeDataModule

        data = MazeDataModule(**config["data"]["init_args"])

        def tested(run: dict, factor: int) -> bool:  # the run has this size, with 8 views when they are asked for
            size = run["sizes"].get(str(factor))
            return size is not None and (args.views == 1 or "views8_exact_path_accuracy" in size)

        for seed in args.seeds:  # seeds outermost: a cut-short benchmark still has every model at seed 0
            for model in args.models:
                old = next((r for r in runs if r["model"] == model and r["seed"] == seed and r["steps"] == steps),
                           None)
                if old is not None and not args.fresh and all(tested(old, f) for f in args.sizes):
                    print(f"{model} seed {seed}: in {args.out.name}, skipped", flush=True)
                    continue
                ckpt = args.run_dir / f"{model}_s{seed}.ckpt"
                if old is not None and not args.fresh and ckpt.exists():  # trained: test the missing sizes only
                    from neat_lightning.modules.lattice_maze import LatticeMazeSolver

                    module, record = LatticeMazeSolver.load_from_checkpoint(ckpt, map_location="cpu"), old
                    print(f"{model} seed {seed}: testing {ckpt.name} at the missing sizes", flush=True)
                else:
                    module, record = train(config, model, seed, steps, args.run_dir)
                    print(f"{model} seed {seed}: {record['steps']} steps, {record['train_cpu_s']} CPU s, "
                          f"{record['params']} params, load {record['load_average_after'][0]:.1f}", flush=True)
                for f, n in zip(args.sizes, args.mazes):
                    if record is old and tested(record, f):
                        continue
                    record["sizes"][str(f)] = evaluate(module, data, f, n, args.eval_batch, args.views)
                    print(f"  x{f}: {json.dumps(record['sizes'][str(f)])}", flush=True)
                runs = [r for r in runs if not (r["model"] == model and r["seed"] == seed)] + [record]
                result.update({
                    "config": config_name, "train_steps": steps, "threads": args.threads,
                    "machine": f"{platform.machine()} {platform.system()}, torch {torch.__version__}",
                    "runs": runs, "rows": aggregate(runs),
                })
                write(args.out, result)
    result["rows"] = aggregate(runs)
    write(args.out, result)
    print(table(result["rows"]))
    plot(args.run_dir, runs, config, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
