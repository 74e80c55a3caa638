"""Every shipped YAML parses and runs a `fast_dev_run` step; every callback fragment composes onto a config."""

from pathlib import Path

import pytest
import yaml

from neat_lightning.cli import NeatCLI, configure_process, import_all_callbacks

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
FRAGMENTS = sorted((REPO / "callbacks").glob("*.yaml"))
# configs whose full batch is too slow for one CPU step in CI: a small batch still runs every code path
# (the BLT entropy model is ~100M parameters in bf16-mixed, which the CPU emulates: 0.6 TFLOP per 512-byte row)
OVERRIDES = {
    # model and data share `block_size` (Lightning refuses to log differing values under one name)
    "blt_entropy_model.yaml": ["--data.init_args.batch_size", "1", "--data.init_args.block_size", "64",
                               "--model.init_args.block_size", "64"],
    "vqvae.yaml": ["--data.init_args.batch_size", "2"],
}


def fast_dev_run(configs: list[Path], tmp_path: Path, extra: list[str] = ()) -> NeatCLI:
    configure_process()
    import_all_callbacks()
    args = ["fit"]
    for c in configs:
        args += ["--config", str(c)]
    args += ["--trainer.fast_dev_run", "1", "--trainer.accelerator", "cpu", "--trainer.devices", "1",
             "--trainer.strategy", "auto", "--runs_dir", str(tmp_path / "runs"), *extra]
    return NeatCLI(args=args)


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_config_runs_fast_dev_run(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = fast_dev_run([config], tmp_path, OVERRIDES.get(config.name, []))
    assert cli.trainer.global_step == 1, f"{config.name} did not take a training step"


def test_configs_are_plain_yaml_with_class_paths():
    for config in CONFIGS:
        cfg = yaml.safe_load(config.read_text())
        assert "class_path" in cfg["model"], config.name
        assert "class_path" in cfg["data"], config.name
