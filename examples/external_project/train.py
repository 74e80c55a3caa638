"""Train a neat_lightning ByteLM inside another project, with a plain lightning.Trainer."""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning as L

import neat_lightning
from data import CopyDataModule
from neat_lightning.callbacks import DecoderBLEUMonitor
from neat_lightning.modules import ByteLM


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", type=Path, default=Path("runs/external"))
    args = parser.parse_args()

    L.seed_everything(0)
    prompts, references = CopyDataModule.prompts_and_references()
    model = ByteLM(dim=64, n_layers=2, heads=4, block_size=64, learning_rate=3e-3, warmup_steps=10)
    bleu = DecoderBLEUMonitor(every_n_steps=max(1, args.steps // 2), prompts=prompts, references=references,
                              max_new_bytes=8)
    trainer = L.Trainer(
        max_steps=args.steps, accelerator="auto", devices=1, default_root_dir=args.out, callbacks=[bleu],
        enable_progress_bar=False, logger=False, val_check_interval=args.steps // 2, check_val_every_n_epoch=None,
    )
    trainer.fit(model, CopyDataModule())
    ckpt = args.out / "final.ckpt"
    trainer.save_checkpoint(ckpt)

    reloaded = ByteLM.load_from_checkpoint(ckpt, map_location="cpu")
    outputs = reloaded.generate_text(prompts[:3], max_new_bytes=8)
    print(f"neat_lightning from: {neat_lightning.__file__}")
    print(f"BLEU history: {bleu.history}")
    for p, o in zip(prompts[:3], outputs):
        print(f"{p!r} -> {o.splitlines()[0] if o else ''!r}")
    print(f"val/loss: {trainer.callback_metrics['val/loss']:.3f}")


if __name__ == "__main__":
    main()
