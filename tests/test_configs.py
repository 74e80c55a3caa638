"""Every shipped YAML parses and runs a `fast_dev_run` step; every callback fragment composes onto a config."""

import sys
from pathlib import Path
from unittest import mock

import pytest
import yaml

from neat_lightning.cli import NeatCLI, configure_process, import_all_callbacks

REPO = Path(__file__).resolve().parents[1]
# a trainer overlay adds to its base config (`--config base --config overlay`) and runs on top of it
OVERLAYS = {"neat_100m_gpu.yaml": "neat_100m.yaml"}
CONFIGS = sorted(c for c in (REPO / "configs").glob("*.yaml") if c.name not in OVERLAYS)
FRAGMENTS = sorted((REPO / "callbacks").glob("*.yaml"))
# configs whose full batch is too slow for one CPU step in CI: a small batch still runs every code path
# (the BLT entropy model is ~100M parameters in bf16-mixed, which the CPU emulates: 0.6 TFLOP per 512-byte row)
OVERRIDES = {
    # model and data share `block_size` (Lightning refuses to log differing values under one name)
    "blt_entropy_model.yaml": ["--data.init_args.batch_size", "1", "--data.init_args.block_size", "64",
                               "--model.init_args.block_size", "64"],
    "vqvae.yaml": ["--data.init_args.batch_size", "2"],
    "neat.yaml": ["--data.init_args.batch_size", "1"],
    # 24x24x16 lattice, 24 steps: ~9 s per batch-16 step; its BLEU monitor scores every validation pair at train end
    "lattice.yaml": ["--data.init_args.batch_size", "2", "--data.init_args.val_batch_size", "4",
                     "--data.init_args.max_val_pairs", "8"],
    # checkpoints the configs name (runs/...) do not exist on a clean clone: the `checkpoints` fixture makes tiny ones
    "neat_blt.yaml": ["--data.init_args.batch_size", "1", "--model.init_args.entropy_model_ckpt", "{entropy_ckpt}"],
    "neat_mvot.yaml": ["--model.init_args.mvot_config.vqvae_ckpt", "{vqvae_ckpt}",
                       "--data.init_args.tokenizer.init_args.ckpt_path", "{vqvae_ckpt}"],
    # ~100M parameters: one short fp32 row with static patching still runs every component's code path
    "neat_100m.yaml": ["--data.init_args.batch_size", "1", "--data.init_args.block_size", "256",
                       "--model.init_args.block_size", "256", "--trainer.precision", "32-true",
                       "--model.init_args.blt_config.patcher.mode", "static",
                       "--model.init_args.mvot_config.vqvae_ckpt", "{vqvae_8192_ckpt}"],
}
# `make test-fast` skips these (`make test` and CI run them): one step of each takes seconds to minutes on 2 CPU
# cores: ~100M parameters (neat_100m), a ~100M-parameter entropy model in emulated bf16 (blt_entropy_model), and
# lattices stepped 20+ times per batch (the lattice configs, and the fragments composed onto them)
SLOW = {"neat_100m.yaml", "blt_entropy_model.yaml", "lattice.yaml", "lattice_quickstart.yaml",
        "lattice_energy_flow.yaml"}


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    """Tiny stand-ins for the checkpoints configs load frozen: an entropy ByteLM (2 steps) and an untrained VQ-VAE."""
    import lightning as L

    from neat_lightning.data import ByteTextDataModule
    from neat_lightning.modules import VQVAE, ByteLM
    from neat_lightning.modules.vqvae import save_vqvae_checkpoint

    root = tmp_path_factory.mktemp("frozen")
    L.seed_everything(0)
    lm = ByteLM(dim=16, n_layers=1, heads=2, block_size=32, warmup_steps=1)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root)
    trainer.fit(lm, ByteTextDataModule(block_size=32, batch_size=2, batches_per_epoch=4))
    trainer.save_checkpoint(root / "entropy.ckpt")
    vqvae = VQVAE(channels=8, n_res_blocks=0, stem="patch", codebook_size=128, embed_dim=4, kmeans_init=False)
    save_vqvae_checkpoint(vqvae, root / "vqvae.ckpt")
    # the 100M configs' codebook shape (K 8192 x 512, configs/vqvae.yaml), tiny convolutions
    vqvae = VQVAE(channels=8, n_res_blocks=0, stem="patch", codebook_size=8192, embed_dim=512, lookup_dim=8,
                  cosine=True, kmeans_init=False)
    save_vqvae_checkpoint(vqvae, root / "vqvae_8192.ckpt")
    return {"entropy_ckpt": str(root / "entropy.ckpt"), "vqvae_ckpt": str(root / "vqvae.ckpt"),
            "vqvae_8192_ckpt": str(root / "vqvae_8192.ckpt")}


def overrides(name: str, checkpoints: dict[str, str]) -> list[str]:
    return [a.format(**checkpoints) for a in OVERRIDES.get(name, [])]


def fast_dev_run(configs: list[Path | list[str]], tmp_path: Path, extra: list[str] = ()) -> NeatCLI:
    """Run `neat fit` in-process over configs (a list item may be raw arguments, applied in order)."""
    configure_process()
    import_all_callbacks()
    args = ["fit"]
    for c in configs:
        args += c if isinstance(c, list) else ["--config", str(c)]
    args += ["--trainer.fast_dev_run", "1", "--trainer.accelerator", "cpu", "--trainer.devices", "1",
             "--trainer.strategy", "auto", "--runs_dir", str(tmp_path / "runs"), *extra]
    with mock.patch.object(sys, "argv", ["neat"]):  # pytest's own arguments are not the CLI's
        return NeatCLI(args=args)


@pytest.mark.parametrize(
    "config", [pytest.param(c, marks=pytest.mark.slow) if c.name in SLOW else c for c in CONFIGS],
    ids=[c.name for c in CONFIGS],
)
def test_config_runs_fast_dev_run(config, tmp_path, monkeypatch, checkpoints):
    monkeypatch.chdir(tmp_path)
    cli = fast_dev_run([config], tmp_path, overrides(config.name, checkpoints))
    assert cli.trainer.global_step == 1, f"{config.name} did not take a training step"


@pytest.mark.slow
@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_overlay_runs_fast_dev_run_on_its_base(overlay, tmp_path, monkeypatch, checkpoints):
    monkeypatch.chdir(tmp_path)
    base = REPO / "configs" / OVERLAYS[overlay]
    cli = fast_dev_run([base, REPO / "configs" / overlay], tmp_path, overrides(base.name, checkpoints))
    assert cli.trainer.global_step == 1, f"{overlay} on {base.name} did not take a training step"


def test_configs_are_plain_yaml_with_class_paths():
    for config in CONFIGS:
        cfg = yaml.safe_load(config.read_text())
        assert "class_path" in cfg["model"], config.name
        assert "class_path" in cfg["data"], config.name


# every callback fragment, the config it is meant for, and a module it must refuse with the protocol TypeError
COMPATIBLE = {
    "bleu_monitor.yaml": "byte_lm_quickstart.yaml",  # prompts: ByteTextDataModule.validation_pairs
    "component_schedule.yaml": "neat_quickstart.yaml",
    "lora_final_stage.yaml": "byte_lm_quickstart.yaml",
    "memory_cleanup.yaml": "lattice_quickstart.yaml",
    "plasticity_stages.yaml": "lattice_quickstart.yaml",
    "progressive_scaling.yaml": "lattice_quickstart.yaml",
    "sleep_wake.yaml": "neat_quickstart.yaml",
}
# the lattice configs already carry their own PlasticityStages; a second one would share its state key
CLEAR_BASE_CALLBACKS = {"plasticity_stages.yaml"}
INCOMPATIBLE = {
    "bleu_monitor.yaml": ("vqvae_quickstart.yaml", "TextGenerator"),
    "component_schedule.yaml": ("byte_lm_quickstart.yaml", "ComponentSwitchable"),
    "plasticity_stages.yaml": ("byte_lm_quickstart.yaml", "Plastic"),
    "progressive_scaling.yaml": ("byte_lm_quickstart.yaml", "Growable"),
    "sleep_wake.yaml": ("vqvae_quickstart.yaml", "MemoryConsolidator"),  # ByteLM and NeatModel implement it
}


def class_paths(yaml_path: Path) -> list[str]:
    trainer = (yaml.safe_load(yaml_path.read_text()) or {}).get("trainer") or {}
    entries = (trainer.get("callbacks") or []) + (trainer.get("callbacks+") or [])
    return [e["class_path"].rsplit(".", 1)[-1] for e in entries if isinstance(e, dict)]


def test_every_fragment_has_a_compatible_config():
    assert sorted(f.name for f in FRAGMENTS) == sorted(COMPATIBLE), "register new fragments in COMPATIBLE"


@pytest.mark.parametrize(
    "fragment", [pytest.param(f, marks=pytest.mark.slow) if COMPATIBLE[f.name] in SLOW else f for f in FRAGMENTS],
    ids=[f.name for f in FRAGMENTS],
)
def test_fragment_composes_and_appends(fragment, tmp_path, monkeypatch, checkpoints):
    monkeypatch.chdir(tmp_path)
    base = REPO / "configs" / COMPATIBLE[fragment.name]
    text = fragment.read_text()
    assert "callbacks+:" in text, f"{fragment.name} must append (trainer: callbacks+:), not replace"
    clear = fragment.name in CLEAR_BASE_CALLBACKS
    layers = [base, ["--trainer.callbacks", "[]"], fragment] if clear else [base, fragment]
    cli = fast_dev_run(layers, tmp_path, overrides(base.name, checkpoints))
    names = [type(c).__name__ for c in cli.trainer.callbacks]
    for wanted in ([] if clear else class_paths(base)) + class_paths(fragment):
        assert wanted in names, f"{wanted} missing from {names}"
    assert cli.trainer.global_step == 1


@pytest.mark.parametrize("fragment", sorted(INCOMPATIBLE), ids=sorted(INCOMPATIBLE))
def test_fragment_on_an_incompatible_module_fails_at_setup(fragment, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config, protocol = INCOMPATIBLE[fragment]
    with pytest.raises(TypeError, match=rf"needs a module implementing the {protocol} protocol"):
        fast_dev_run([REPO / "configs" / config, REPO / "callbacks" / fragment], tmp_path)
