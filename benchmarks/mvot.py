"""MVoT next-state prediction on generated mazes: NeatModel with the token discrepancy loss L_D (lambda = 0.1) vs
without (lambda = 0), same model, data, seed and step budget.

    OMP_NUM_THREADS=1 python benchmarks/mvot.py --vqvae-ckpt runs/mvot/vqvae_quickstart.ckpt --steps 1500
    # one variant per process (run both side by side, then merge):
    OMP_NUM_THREADS=1 python benchmarks/mvot.py --lambdas 0.1 --steps 1500 --part runs/mvot/l01.json &
    OMP_NUM_THREADS=1 python benchmarks/mvot.py --lambdas 0.0 --steps 1500 --part runs/mvot/l00.json &
    python benchmarks/mvot.py --merge runs/mvot/l01.json runs/mvot/l00.json   # -> benchmarks/results/mvot.json

The VQ-VAE is a trained ``configs/vqvae_quickstart.yaml`` checkpoint (32x32 images -> 8x8 codes, K = 128);
train one with ``OMP_NUM_THREADS=1 neat fit --config configs/vqvae_quickstart.yaml``.

Training rows are interleaved maze episodes from ``MultimodalDataModule`` (two transitions per 256-id row). The
held-out evaluation takes ``--eval`` next-state predictions from the validation seed space: the prompt is the
family header, the image of state s_t, the action text and BOI; the target is the image of s_{t+1}. Reported:

* ``teacher_forced_token_acc``: argmax accuracy over the 64 target codes, given the true preceding codes;
* ``generated_token_acc``: codes of the greedily generated image (constrained decoding) that equal the target's;
* ``generated_state_correct``: share of generated images whose decoded grid (VQ-VAE decode, then the grids
  module's ``cells_from_images``) equals the true next state in every cell; ``generated_cell_acc`` per cell;
* baselines: copying the previous image (token accuracy, state correct) and the VQ-VAE ceiling (decode of the
  target's own codes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_VQVAE = ROOT / "runs" / "mvot" / "vqvae_quickstart.ckpt"


def atomic_write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def model_args(args, lam: float) -> dict:
    from neat_lightning.modules.neat_config import MVoTConfig

    mvot = MVoTConfig(vqvae_ckpt=str(args.vqvae_ckpt), visual_vocab_size=128, image_size=32, discrepancy_weight=lam)
    return dict(dim=args.dim, n_layers=args.layers, heads=args.heads, block_size=args.block_size, window=None,
                titans=False, svf=False, active_components=["mvot"], mvot=True, mvot_config=mvot,
                learning_rate=args.lr, warmup_steps=50)


@torch.no_grad()
def evaluate(model, examples) -> dict:
    """Teacher-forced and generated next-state metrics over the examples (prompts grouped by length)."""
    from neat_lightning.data.generators.grids import cells_from_images

    vocab = model.mvot.vocab
    n = len(examples.prompts)
    hw = vocab.tokens_per_image
    tf_hits = torch.zeros(n)
    generated = torch.zeros(n, *vocab.grid, dtype=torch.long)
    lengths = torch.tensor([len(p) for p in examples.prompts])
    model.eval()
    for length in lengths.unique().tolist():
        idx = torch.nonzero(lengths == length).flatten()
        for chunk in idx.split(64):
            prompts = torch.stack([examples.prompts[i] for i in chunk.tolist()])  # (b, T0)
            target = rearrange_codes(examples.target_codes[chunk], vocab)  # (b, h w) ids
            logits = model(torch.cat([prompts, target[:, :-1]], dim=1))[:, -hw:]  # (b, h w, V)
            tf_hits[chunk] = (logits.argmax(-1) == target).float().mean(-1)
            new = model.generate_interleaved(prompts, hw, stop_at_eos=False)  # (b, h w) constrained to codes
            generated[chunk] = vocab.codes_from_ids(new)
    decode = model.mvot.decode_images
    grid = examples.target_states.shape[-1]
    cells = cells_from_images(decode(generated), grid)
    cells_ceiling = cells_from_images(decode(examples.target_codes), grid)
    cells_copy = cells_from_images(decode(examples.previous_codes), grid)
    truth = examples.target_states

    def state_correct(c):
        return float((c == truth).flatten(1).all(1).float().mean())

    return {
        "examples": n,
        "teacher_forced_token_acc": float(tf_hits.mean()),
        "generated_token_acc": float((generated == examples.target_codes).float().mean()),
        "generated_state_correct": state_correct(cells),
        "generated_cell_acc": float((cells == truth).float().mean()),
        "copy_previous_token_acc": float((examples.previous_codes == examples.target_codes).float().mean()),
        "copy_previous_state_correct": state_correct(cells_copy),
        "vqvae_ceiling_state_correct": state_correct(cells_ceiling),
    }


def rearrange_codes(codes: torch.Tensor, vocab) -> torch.Tensor:
    return codes.flatten(1) + vocab.offset


def run_variant(args, lam: float) -> dict:
    import lightning as L

    from neat_lightning.data.multimodal import MultimodalDataModule, next_state_examples
    from neat_lightning.modules.neat import NeatModel
    from neat_lightning.modules.vqvae import VQVAETokenizer

    L.seed_everything(args.seed)
    model = NeatModel(**model_args(args, lam))
    data = MultimodalDataModule(families=["maze"], block_size=args.block_size, batch_size=args.batch_size,
                                batches_per_epoch=10_000, val_rows=64, seed=args.seed,
                                tokenizer=VQVAETokenizer(str(args.vqvae_ckpt)))
    trainer = L.Trainer(accelerator="cpu", max_steps=args.steps, max_time={"minutes": args.max_minutes},
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                        gradient_clip_val=1.0, deterministic=True)
    start, cpu0 = time.perf_counter(), time.process_time()
    trainer.fit(model, data)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu0
    val = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    metrics = {k: float(v) for k, v in val.validate(model, data, verbose=False)[0].items()}
    examples = next_state_examples(data.episode_tokenizer, args.eval, data.val_seed, ["maze"])
    result = evaluate(model, examples)
    return {
        "mvot_lambda": lam, "steps": int(trainer.global_step), "train_wall_s": round(wall, 1),
        "train_cpu_s": round(cpu, 1), "params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "val": metrics, **result,
    }


def table(results: list[dict]) -> str:
    cols = ["mvot_lambda", "steps", "train_cpu_s", "teacher_forced_token_acc", "generated_token_acc",
            "generated_state_correct", "generated_cell_acc", "copy_previous_token_acc", "vqvae_ceiling_state_correct"]
    lines = [" | ".join(cols), " | ".join("---" for _ in cols)]
    for r in results:
        lines.append(" | ".join(f"{r[c]:.4f}" if isinstance(r[c], float) else str(r[c]) for c in cols))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vqvae-ckpt", type=Path, default=DEFAULT_VQVAE)
    p.add_argument("--lambdas", type=float, nargs="+", default=[0.1, 0.0])
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--max-minutes", type=float, default=12.0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eval", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--part", type=Path, help="write this run's results here instead of benchmarks/results")
    p.add_argument("--merge", type=Path, nargs="+", help="merge --part files into benchmarks/results/mvot.json")
    args = p.parse_args(argv)
    if args.merge:
        parts = [json.loads(f.read_text()) for f in args.merge]
        keep = ("command", "config", "load_average_at_end", "peak_rss_mib")  # per run: parts may differ
        results = [{**r, **{k: part[k] for k in keep}} for part in parts for r in part["results"]]
        out = {k: v for k, v in parts[0].items() if k not in keep} | {"results": results}
    else:
        if not args.vqvae_ckpt.is_file():
            print(f"--vqvae-ckpt {args.vqvae_ckpt}: no such file; train one with\n"
                  "  OMP_NUM_THREADS=1 neat fit --config configs/vqvae_quickstart.yaml", file=sys.stderr)
            return 2
        results = [run_variant(args, lam) for lam in args.lambdas]
        out = {
            "benchmark": "mvot next-state prediction (held-out generated mazes)",
            "command": "OMP_NUM_THREADS=1 python benchmarks/mvot.py " + " ".join(argv or sys.argv[1:]),
            "vqvae_ckpt": str(args.vqvae_ckpt),
            "config": {k: v for k, v in vars(args).items() if k not in ("merge", "part", "vqvae_ckpt", "lambdas")},
            "threads": torch.get_num_threads(),
            "machine": platform.machine(),
            "load_average_at_end": os.getloadavg()[0],
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "results": results,
        }
    print(table(out["results"]))
    atomic_write_json(args.part or RESULTS / "mvot.json", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
