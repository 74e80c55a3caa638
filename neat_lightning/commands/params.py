"""``neat params``: build a config's model and print its parameters by component, against the 100M split.

    neat params --config configs/neat_100m.yaml
    neat params --config configs/neat_100m.yaml --model.init_args.entropy_model_ckpt other.ckpt
    neat params --config configs/neat_blt.yaml --target latent=5e6 --target blt=1e6 --json params.json
    neat params --config configs/neat_100m.yaml --vqvae-config configs/vqvae.yaml

The model is instantiated from the config's ``model:`` section exactly as ``neat fit`` would (jsonargparse, the
same class_path / init_args; ``--model.init_args.X V`` overrides apply). Components of a NeatModel:

* ``latent``: the NeatBackbone's transformer blocks and norms (attention, MLP);
* ``blt``: the BLT local encoder / decoder (byte and hash n-gram embeddings, local blocks, cross-attentions, head);
* ``titans``: the Titans memory of the memory blocks (neural memory projections and MLP, persistent tokens);
* ``mvot``: the MVoT visual path: the visual-token rows (BOI, EOI, K codes) of the embedding and output head (the
  BLT byte embedding / head in BLT mode, at its width), the visualization-decision head, and the frozen VQ-VAE
  (``mvot.frozen.module.*``, loaded from ``mvot_config.vqvae_ckpt``; saved in the checkpoint, never trained, marked
  frozen);
* ``other``: SVF ``z`` vectors and dispatcher, whatever else the module holds, and the frozen BLT entropy model
  (loaded from ``entropy_model_ckpt``; not part of the checkpoint, marked frozen).

Targets default to the 100M split 40/20/20/10/10 (latent/local/Titans/MVoT/other, in M parameters); ``--target
NAME=N`` changes one. The
entropy model checkpoint is optional here: without it the parameters are counted with static patching (the same
trainable parameters) and the entropy model row says it was not found. The VQ-VAE checkpoint is optional too:
without it an untrained VQ-VAE is built from ``--vqvae-config`` (default ``configs/vqvae.yaml``, the one that
trains it), which has the same parameters; its ``codebook_size`` must equal the model's
``mvot_config.visual_vocab_size``.
The table's ``frozen`` column is ``actual - trainable``.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.console import Console
from rich.table import Table

from neat_lightning.codec import VOCAB_SIZE

COMPONENTS = ("latent", "blt", "titans", "mvot", "other")
LABELS = {
    "latent": "latent transformer",
    "blt": "BLT local encoder/decoder",
    "titans": "Titans memory",
    "mvot": "MVoT visual path",
    "other": "SVF / other",
}
TARGETS_100M = {"latent": 40e6, "blt": 20e6, "titans": 20e6, "mvot": 10e6, "other": 10e6}
MEMORY_PARAM = re.compile(r"model\.blocks\.\d+\.(memory|persistent|readout_gate)\b")


class CommandError(Exception):
    """A user-facing error: ``neat params: error: ...`` with exit status 1."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="neat params", description="Parameters of a config's model, by component.")
    p.add_argument("--config", type=Path, required=True, help="A neat config YAML (its model: section is built).")
    p.add_argument("--target", action="append", default=[], metavar="NAME=N",
                   help=f"Target of a component ({', '.join(COMPONENTS)}, or total); "
                        "default: the 100M split 40/20/20/10/10.")
    p.add_argument("--json", type=Path, help="Also write the table as JSON here.")
    p.add_argument("--vqvae-config", type=Path, default=Path("configs/vqvae.yaml"),
                   help="Builds the frozen VQ-VAE (untrained, same parameters) when vqvae_ckpt is missing.")
    return p


def model_section(config: Path, overrides: list[str]) -> dict[str, Any]:
    """The config's ``model:`` (class_path + init_args) with ``--model.init_args.X V`` overrides applied."""
    if not config.is_file():
        raise CommandError(f"--config: no such file: {str(config)!r}")
    cfg = yaml.safe_load(config.read_text()) or {}
    model = cfg.get("model")
    if not isinstance(model, dict) or "class_path" not in model:
        raise CommandError(f"{config}: expected a `model:` section with `class_path` and `init_args`")
    model = copy.deepcopy(model)
    init = model.setdefault("init_args", {}) or {}
    model["init_args"] = init
    it = iter(overrides)
    for flag in it:
        key, _, value = flag.partition("=")
        if not key.startswith("--model.init_args."):
            raise CommandError(f"unknown option {flag!r}; only --model.init_args.NAME VALUE overrides are accepted")
        if not _:
            value = next(it, None)
            if value is None:
                raise CommandError(f"{key} needs a value")
        node = init
        *parents, leaf = key[len("--model.init_args."):].split(".")
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = yaml.safe_load(value)
    return model


def stand_in_vqvae(vqvae_config: Path, visual_vocab_size: int, directory: Path) -> str:
    """An untrained VQ-VAE built from ``vqvae_config``'s ``model:`` section, saved as a checkpoint in ``directory``:
    the parameters a trained one has (counting needs shapes, not values)."""
    from neat_lightning.modules.vqvae import VQVAE, save_vqvae_checkpoint

    if not vqvae_config.is_file():
        raise CommandError(f"vqvae_ckpt not found and --vqvae-config: no such file: {str(vqvae_config)!r}")
    section = (yaml.safe_load(vqvae_config.read_text()) or {}).get("model")
    if not isinstance(section, dict) or not str(section.get("class_path", "")).endswith("VQVAE"):
        raise CommandError(f"--vqvae-config {str(vqvae_config)!r}: expected a `model:` section with a VQVAE class_path")
    init = dict(section.get("init_args") or {})
    codebook = init.get("codebook_size")
    if codebook != visual_vocab_size:
        raise CommandError(f"--vqvae-config {str(vqvae_config)!r}: codebook_size={codebook}, but the model has "
                           f"visual_vocab_size={visual_vocab_size}; they must be equal")
    try:
        with torch.random.fork_rng(devices=[]):
            vqvae = VQVAE(**init)
    except (TypeError, ValueError) as err:
        raise CommandError(f"--vqvae-config {str(vqvae_config)!r}: cannot build its VQVAE: {err}") from None
    return str(save_vqvae_checkpoint(vqvae, directory / "vqvae_stand_in.ckpt"))


def instantiate(model: dict[str, Any], vqvae_config: Path = Path("configs/vqvae.yaml"),
                scratch: Path | None = None) -> tuple[torch.nn.Module, list[str]]:
    """Build the model as LightningCLI would; returns it and notes about what was substituted.

    ``scratch`` is a directory for a stand-in VQ-VAE checkpoint (needed only when ``mvot_config.vqvae_ckpt`` is
    missing)."""
    import lightning as L
    from jsonargparse import ArgumentParser

    notes: list[str] = []
    init = model["init_args"]
    if init.get("mvot"):
        mvot = dict(init.get("mvot_config") or {})
        ckpt = mvot.get("vqvae_ckpt")
        if ckpt is None or not Path(ckpt).is_file():
            if scratch is None:
                raise CommandError(f"vqvae_ckpt {ckpt!r} not found and no scratch directory for a stand-in")
            mvot["vqvae_ckpt"] = stand_in_vqvae(vqvae_config, int(mvot.get("visual_vocab_size", 128)), scratch)
            init["mvot_config"] = mvot
            notes.append(f"vqvae_ckpt {ckpt!r} not found: counted with an untrained VQ-VAE built from "
                         f"{str(vqvae_config)!r} (same parameters)")
    blt = init.get("blt_config") or {}
    patcher = blt.get("patcher") or {}
    if init.get("frontend") == "blt" and patcher.get("mode", "entropy") == "entropy":
        ckpt = init.get("entropy_model_ckpt")
        if ckpt is None or not Path(ckpt).is_file():  # static patching: the same trainable parameters, no checkpoint
            init["blt_config"] = {**blt, "patcher": {**patcher, "mode": "static"}}
            notes.append(f"entropy_model_ckpt {ckpt!r} not found: counted with static patching (same trainable "
                         "parameters); the frozen entropy model is not counted")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(L.LightningModule, "model", required=True)
    try:
        ns = parser.parse_object({"model": model})
        return parser.instantiate(ns).model, notes
    except Exception as err:  # jsonargparse / the module's own validation: show it as a command error
        raise CommandError(f"cannot build the model: {err}") from None


def count_by_component(model: torch.nn.Module) -> dict[str, dict[str, int]]:
    """Parameters of a NeatModel (or any module: everything lands in ``other``) by component.

    Returns:
        ``{component: {"total": n, "trainable": n}}`` for the five components, plus ``entropy_model`` (frozen,
        counted under ``other``) and ``vqvae`` (frozen, counted under ``mvot``) when the module has them.
    """
    counts = {c: {"total": 0, "trainable": 0} for c in COMPONENTS}

    def add(component: str, n: int, trainable: bool) -> None:
        counts[component]["total"] += n
        counts[component]["trainable"] += n if trainable else 0

    for name, p in model.named_parameters():
        n, trainable = p.numel(), p.requires_grad
        if name.startswith("mvot."):
            add("mvot", n, trainable)
        elif name.startswith("blt."):
            if name in ("blt.embed.embed.weight", "blt.head.weight") and p.shape[0] > VOCAB_SIZE:
                visual = (p.shape[0] - VOCAB_SIZE) * p.shape[1]  # visual-token rows belong to the MVoT path
                add("mvot", visual, trainable)
                add("blt", n - visual, trainable)
            else:
                add("blt", n, trainable)
        elif MEMORY_PARAM.match(name):
            add("titans", n, trainable)
        elif name.endswith(".z") or name.startswith("dispatcher."):
            add("other", n, trainable)
        elif name == "model.embed.weight" and p.shape[0] > VOCAB_SIZE:  # byte front end with visual tokens
            visual = (p.shape[0] - VOCAB_SIZE) * p.shape[1]
            add("mvot", visual, trainable)
            add("other", n - visual, trainable)
        elif name.startswith("model.blocks.") or name == "model.norm.weight":
            add("latent", n, trainable)
        else:
            add("other", n, trainable)
    blt = getattr(model, "blt", None)
    entropy = getattr(blt, "entropy_model", None) if blt is not None else None
    if isinstance(entropy, torch.nn.Module):
        n = sum(p.numel() for p in entropy.parameters())
        counts["entropy_model"] = {"total": n, "trainable": 0}
        add("other", n, False)
    mvot = getattr(model, "mvot", None)
    if isinstance(mvot, torch.nn.Module) and hasattr(mvot, "vqvae"):  # already counted under mvot (mvot.frozen.*)
        counts["vqvae"] = {"total": sum(p.numel() for p in mvot.vqvae.parameters()), "trainable": 0}
    return counts


def parse_targets(items: list[str]) -> dict[str, float]:
    targets = dict(TARGETS_100M)
    for item in items:
        name, _, value = item.partition("=")
        if name not in (*COMPONENTS, "total") or not value:
            raise CommandError(f"--target {item!r}: expected NAME=N with NAME one of {', '.join(COMPONENTS)}, total")
        try:
            targets[name] = float(value)
        except ValueError:
            raise CommandError(f"--target {item!r}: {value!r} is not a number") from None
    targets.setdefault("total", sum(targets[c] for c in COMPONENTS))
    if not any(i.startswith("total=") for i in items):
        targets["total"] = sum(targets[c] for c in COMPONENTS)
    return targets


def deviation(actual: float, target: float) -> float | None:
    return None if target <= 0 else 100.0 * (actual - target) / target


def main(argv: list[str]) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    console = Console(highlight=False)
    try:
        targets = parse_targets(args.target)
        section = model_section(args.config, rest)
        vqvae_config = args.vqvae_config
        if not vqvae_config.is_file() and vqvae_config == Path("configs/vqvae.yaml"):  # the default, from elsewhere
            vqvae_config = args.config.parent / "vqvae.yaml"
        with tempfile.TemporaryDirectory(prefix="neat_params_") as scratch:
            model, notes = instantiate(section, vqvae_config, Path(scratch))
    except CommandError as err:
        print(f"neat params: error: {err}", file=sys.stderr)
        return 1
    counts = count_by_component(model)
    total = sum(counts[c]["total"] for c in COMPONENTS)
    trainable = sum(counts[c]["trainable"] for c in COMPONENTS)
    rows = []
    for c in COMPONENTS:
        rows.append({"component": c, "label": LABELS[c], "target": targets[c], **counts[c],
                     "deviation_pct": deviation(counts[c]["total"], targets[c])})
    rows.append({"component": "total", "label": "total", "target": targets["total"], "total": total,
                 "trainable": trainable, "deviation_pct": deviation(total, targets["total"])})
    for r in rows:
        r["frozen"] = r["total"] - r["trainable"]

    table = Table(title=f"{type(model).__name__} parameters: {args.config}")
    for col in ("component", "target", "actual", "±%", "trainable", "frozen"):
        table.add_column(col, justify="left" if col == "component" else "right")
    for r in rows:
        dev = r["deviation_pct"]
        table.add_row(r["label"], f"{r['target'] / 1e6:.1f}M", f"{r['total'] / 1e6:.2f}M",
                      "-" if dev is None else f"{dev:+.1f}%", f"{r['trainable'] / 1e6:.2f}M",
                      f"{r['frozen'] / 1e6:.2f}M")
    console.print(table)
    if "entropy_model" in counts:
        console.print(f"SVF / other includes the frozen BLT entropy model: {counts['entropy_model']['total'] / 1e6:.2f}M "
                      "(loaded from entropy_model_ckpt, not trained, not in the checkpoint)")
    if "vqvae" in counts:
        m = counts["mvot"]
        console.print(f"MVoT visual path includes the frozen VQ-VAE: {counts['vqvae']['total'] / 1e6:.2f}M "
                      f"(loaded from vqvae_ckpt, not trained, saved in the checkpoint); trained: "
                      f"{m['trainable'] / 1e6:.2f}M "
                      f"({deviation(m['trainable'], targets['mvot']):+.1f}% of its target)")
    if counts["mvot"]["total"] == 0:
        console.print("MVoT visual path: not built by this config (mvot: false); its target is not met")
    for note in notes:
        console.print(f"note: {note}")
    if args.json:
        args.json.write_text(json.dumps({"config": str(args.config), "rows": rows, "notes": notes}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
