"""LoRA final stage ("initiation"): bits per byte on held-out scenes and on the built-in corpus, before and after.

One ``fit`` runs the real pipeline: ByteLM pretrains on the built-in corpus (CPython docs topics) through
``SceneDataModule(pretrain=ByteTextDataModule)``; ``LoRAFinalStage`` starts at step ``--pretrain-steps``, freezes the
base, injects adapters, trains them on the scene corpus for ``--stage-steps`` and merges them. A probe evaluates both
validation sets (each covered once, PAD ignored) just before the stage and after the merge. Further ranks resume
from the checkpoint taken just before the stage (``ckpt_path``), so every rank starts from the same weights.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/lora_initiation.py            # ~10 min on a busy 2-core CPU
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/lora_initiation.py --quick    # smoke run, ~1 min

Writes ``benchmarks/results/lora_initiation.json`` (``--out`` to change). Targets: held-out scene bpb
drops after the stage; built-in corpus bpb rises by less than 5 %.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from neat_lightning.callbacks import LoRAFinalStage
from neat_lightning.components.lora import lora_report
from neat_lightning.data import ByteTextDataModule, SceneDataModule
from neat_lightning.modules import ByteLM

RESULTS = Path(__file__).parent / "results" / "lora_initiation.json"


@torch.no_grad()
def bpb(model: ByteLM, loader) -> float:
    """Bits per byte over a loader that covers a text once (the same measure as ByteLM's val/bpb)."""
    was_training = model.training
    model.eval()
    nats, count = 0.0, 0
    for batch in loader:
        loss, n = model.loss(batch.to(model.device))
        nats += float(loss) * n
        count += n
    model.train(was_training)
    return nats / count / math.log(2)


class Probe(Callback):
    """Evaluates both corpora just before the stage begins (before LoRAFinalStage's own hook) and after the merge."""

    def __init__(self, dm: SceneDataModule, stage_step: int) -> None:
        self.dm, self.stage_step = dm, stage_step
        self.results: dict[str, float] = {}

    def evaluate(self, model: ByteLM, when: str) -> None:
        self.results[f"scenes_bpb_{when}"] = bpb(model, self.dm.scene_val_dataloader())
        self.results[f"builtin_bpb_{when}"] = bpb(model, self.dm.pretrain.val_dataloader())

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.stage_step and "scenes_bpb_before" not in self.results:
            self.evaluate(pl_module, "before")
            self.results["time_to_stage_s"] = time.perf_counter() - self.t0
            self.t1 = time.perf_counter()

    def on_train_start(self, trainer, pl_module):
        self.t0 = time.perf_counter()

    def on_train_end(self, trainer, pl_module):  # runs after LoRAFinalStage.on_train_end (callback order)
        self.results["time_stage_s"] = time.perf_counter() - self.t1
        self.evaluate(pl_module, "after")


def make_data(args, replay: float) -> SceneDataModule:
    pretrain = ByteTextDataModule(block_size=args.block_size, batch_size=args.batch_size, batches_per_epoch=200)
    return SceneDataModule(block_size=args.block_size, batch_size=args.batch_size, pretrain=pretrain, replay=replay)


def run(args, rank: int | None, lora_lr: float, replay: float, workdir: Path, ckpt_path: str | None) -> dict:
    L.seed_everything(args.seed)
    total = args.pretrain_steps + args.stage_steps
    model = ByteLM(dim=args.dim, n_layers=args.n_layers, heads=args.heads, block_size=args.block_size,
                   learning_rate=3e-3, warmup_steps=50)
    dm = make_data(args, replay)
    stage = LoRAFinalStage(start=args.pretrain_steps, start_unit="step", r=rank, learning_rate=lora_lr,
                           warmup_steps=10, min_lr_ratio=0.1, at_end="merge")
    probe = Probe(dm, args.pretrain_steps)
    callbacks = [probe, stage]
    if ckpt_path is None:
        callbacks.append(ModelCheckpoint(dirpath=workdir, every_n_train_steps=args.pretrain_steps, save_top_k=-1))
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False, max_steps=total,
        limit_val_batches=0, gradient_clip_val=1.0, callbacks=callbacks, default_root_dir=workdir,
        enable_checkpointing=ckpt_path is None,
    )
    report = {}

    class Report(Callback):  # the adapter report, taken right after the injection
        def on_train_batch_end(self, trainer, pl_module, *_):
            if stage.active and not report:
                report.update(vars(lora_report(pl_module)) | {"fraction": lora_report(pl_module).adapter_fraction})

    trainer.callbacks.append(Report())
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    r = probe.results
    return {
        "rank": stage.rank, "rank_requested": rank, "lora_lr": lora_lr, "replay": replay, "adapter_params": report.get("adapter"),
        "adapter_fraction": report.get("fraction"), "base_params": report.get("total", 0) - report.get("adapter", 0),
        **r,
        "scenes_bpb_change": r["scenes_bpb_after"] - r["scenes_bpb_before"],
        "builtin_bpb_rise_pct": 100 * (r["builtin_bpb_after"] / r["builtin_bpb_before"] - 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrain-steps", type=int, default=400)
    parser.add_argument("--stage-steps", type=int, default=100)
    parser.add_argument("--ranks", type=str, default="auto,4", help="comma-separated; 'auto' = 1%% budget rank")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--n-layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lora-lrs", type=str, default="1e-3", help="comma-separated adapter learning rates")
    parser.add_argument("--replays", type=str, default="0,0.5",
                        help="comma-separated SceneDataModule(replay=...): share of pretraining rows in stage batches")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep checkpoints here; a pre-stage checkpoint already there is reused (no pretraining)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.quick:
        args.pretrain_steps, args.stage_steps, args.dim, args.block_size, args.batch_size = 40, 20, 64, 64, 8
    ranks = [None if r == "auto" else int(r) for r in args.ranks.split(",")]

    variants = [(rank, float(lr), float(replay)) for rank in ranks for lr in args.lora_lrs.split(",")
                for replay in args.replays.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        found = sorted(workdir.glob(f"*step={args.pretrain_steps}.ckpt"))
        before_ckpt = str(found[0]) if found else None
        for rank, lr, replay in variants:
            start = time.perf_counter()
            row = run(args, rank, lr, replay, workdir, before_ckpt)
            row["wall_s"] = time.perf_counter() - start
            rows.append(row)
            if before_ckpt is None:  # the checkpoint ModelCheckpoint took just before the stage began
                before_ckpt = str(next(workdir.glob(f"*step={args.pretrain_steps}.ckpt")))

    header = f"{'rank':>5} {'lora lr':>8} {'replay':>6} {'adapter %':>9} {'scenes bpb before':>18} {'after':>7} {'builtin bpb before':>19} " \
             f"{'after':>7} {'rise %':>7}"
    print(header)
    for r in rows:
        print(f"{r['rank']:>5} {r['lora_lr']:>8.0e} {r['replay']:>6.2f} {100 * r['adapter_fraction']:>9.3f} {r['scenes_bpb_before']:>18.3f} "
              f"{r['scenes_bpb_after']:>7.3f} {r['builtin_bpb_before']:>19.3f} {r['builtin_bpb_after']:>7.3f} "
              f"{r['builtin_bpb_rise_pct']:>7.2f}")
    for r in rows:
        r["targets_met"] = r["scenes_bpb_change"] < 0 and r["builtin_bpb_rise_pct"] < 5
    print("targets (scene bpb drops, built-in bpb rises < 5%) met by: "
          + (", ".join(f"r={r['rank']} lr={r['lora_lr']:g} replay={r['replay']:g}" for r in rows if r["targets_met"])
             or "none"))
    result = {
        "benchmark": "lora_initiation",
        "command": "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/lora_initiation.py" + (" --quick" if args.quick else ""),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(result, indent=2) + "\n")
    tmp_out.replace(args.out)  # atomic
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
