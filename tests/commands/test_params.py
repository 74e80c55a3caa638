"""`neat params`: parameters by component against the 100M split 40/20/20/10/10 (latent/local/Titans/MVoT/other);
the 100M config meets its targets."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from neat_lightning.commands.params import COMPONENTS, count_by_component, main
from neat_lightning.modules.byte_lm import ByteLM

REPO = Path(__file__).resolve().parents[2]


def save_untrained(lm: L.LightningModule, path: Path) -> str:
    torch.save({"state_dict": lm.state_dict(), "hyper_parameters": dict(lm.hparams),
                "pytorch-lightning_version": L.__version__}, path)
    return str(path)


def run(tmp_path: Path, capsys, *argv: str) -> tuple[int, dict | None, str]:
    out = tmp_path / "params.json"
    code = main([*argv, "--json", str(out)])
    captured = capsys.readouterr()
    return code, json.loads(out.read_text()) if out.exists() else None, captured.out + captured.err


def test_small_blt_config_counts_every_parameter_once(tmp_path, capsys):
    code, table, text = run(tmp_path, capsys, "--config", str(REPO / "configs/neat_blt.yaml"))
    assert code == 0
    assert "latent transformer" in text and "BLT local encoder/decoder" in text
    assert "entropy_model_ckpt 'runs/quickstart/checkpoints/last.ckpt' not found" in " ".join(text.split())
    rows = {r["component"]: r for r in table["rows"]}
    assert sum(rows[c]["total"] for c in COMPONENTS) == rows["total"]["total"]
    from neat_lightning.modules.neat import NeatModel  # the same model built by hand: same count

    cfg = yaml.safe_load((REPO / "configs/neat_blt.yaml").read_text())["model"]["init_args"]
    from neat_lightning.components.blt import BLTConfig
    from neat_lightning.components.titans import TitansConfig

    blt = cfg["blt_config"]
    static = BLTConfig(**{**blt, "patcher": {**blt["patcher"], "mode": "static"}})
    cfg.update(entropy_model_ckpt=None, blt_config=static, titans_config=TitansConfig(**cfg["titans_config"]))
    model = NeatModel(**cfg)
    assert rows["total"]["total"] == sum(p.numel() for p in model.parameters())
    assert rows["blt"]["total"] == sum(p.numel() for p in model.blt.parameters())
    counts = count_by_component(model)
    assert counts["titans"]["total"] > 0 and counts["mvot"]["total"] == 0


def vqvae_config(tmp_path: Path, **init_args) -> Path:
    path = tmp_path / "vqvae.yaml"
    path.write_text(yaml.safe_dump({"model": {"class_path": "neat_lightning.modules.VQVAE", "init_args": init_args}}))
    return path


def test_mvot_path_counts_its_visual_rows_decision_head_and_the_frozen_vqvae(tmp_path, capsys):
    tiny_vq = dict(channels=8, n_res_blocks=0, stem="patch", codebook_size=128, embed_dim=4, kmeans_init=False)
    code, table, text = run(tmp_path, capsys, "--config", str(REPO / "configs/neat_mvot.yaml"),
                            "--model.init_args.mvot_config.vqvae_ckpt", str(tmp_path / "missing.ckpt"),
                            "--vqvae-config", str(vqvae_config(tmp_path, **tiny_vq)))
    assert code == 0, text
    rows = {r["component"]: r for r in table["rows"]}
    from neat_lightning.modules import VQVAE

    frozen = sum(p.numel() for p in VQVAE(**tiny_vq).parameters())
    dim = yaml.safe_load((REPO / "configs/neat_mvot.yaml").read_text())["model"]["init_args"]["dim"]
    assert rows["mvot"]["frozen"] == frozen and rows["total"]["frozen"] == frozen  # nothing else is frozen here
    assert rows["mvot"]["trainable"] == (2 + 128) * dim + (dim + 1)  # visual rows of the tied embedding + decision
    assert sum(rows[c]["total"] for c in COMPONENTS) == rows["total"]["total"]
    text = " ".join(text.split())
    assert f"MVoT visual path includes the frozen VQ-VAE: {frozen / 1e6:.2f}M" in text
    assert "missing.ckpt' not found: counted with an untrained VQ-VAE built from" in text


@pytest.mark.slow
def test_100m_config_meets_the_40_20_20_10_10_split(tmp_path, capsys):
    entropy = ByteLM(dim=368, n_layers=6, heads=8, block_size=512, window=512, tie_weights=False)
    ckpt = save_untrained(entropy, tmp_path / "entropy.ckpt")
    code, table, text = run(tmp_path, capsys, "--config", str(REPO / "configs/neat_100m.yaml"),
                            "--model.init_args.entropy_model_ckpt", ckpt,
                            "--model.init_args.mvot_config.vqvae_ckpt", str(tmp_path / "missing.ckpt"),
                            "--vqvae-config", str(REPO / "configs/vqvae.yaml"))
    assert code == 0, text
    rows = {r["component"]: r for r in table["rows"]}
    for name in (*COMPONENTS, "total"):
        assert abs(rows[name]["deviation_pct"]) <= 10.0, rows[name]
    # MVoT: the trained part alone (visual rows of the BLT embedding / head, decision head) also meets its target;
    # the frozen part is the VQ-VAE of configs/vqvae.yaml (K 8192 x 512), the rest of the model's frozen part the
    # entropy LM
    assert abs(rows["mvot"]["trainable"] - 10e6) <= 1e6, rows["mvot"]
    from neat_lightning.modules import VQVAE

    vq = VQVAE(**yaml.safe_load((REPO / "configs/vqvae.yaml").read_text())["model"]["init_args"])
    assert rows["mvot"]["frozen"] == sum(p.numel() for p in vq.parameters())
    assert rows["other"]["frozen"] == sum(p.numel() for p in entropy.parameters())
    text = " ".join(text.split())
    assert "MVoT visual path includes the frozen VQ-VAE" in text and "frozen BLT entropy model" in text


def test_gpu_config_is_a_ddp_trainer_overlay_on_the_100m_config(capsys):
    gpu = yaml.safe_load((REPO / "configs/neat_100m_gpu.yaml").read_text())
    assert set(gpu) == {"run_name", "trainer"}  # an overlay: model and data come from neat_100m.yaml
    from neat_lightning.cli import NeatCLI

    capsys.readouterr()
    with pytest.raises(SystemExit):  # --print_config prints the merged config and exits
        NeatCLI(args=["fit", "--config", str(REPO / "configs/neat_100m.yaml"), "--config",
                      str(REPO / "configs/neat_100m_gpu.yaml"), "--print_config"])
    merged = yaml.safe_load(capsys.readouterr().out)
    base = yaml.safe_load((REPO / "configs/neat_100m.yaml").read_text())
    assert merged["model"]["init_args"]["dim"] == base["model"]["init_args"]["dim"]
    assert merged["data"]["init_args"]["batch_size"] == base["data"]["init_args"]["batch_size"]
    assert merged["trainer"]["strategy"] == "ddp_find_unused_parameters_true"
    assert merged["trainer"]["precision"] == "bf16-mixed" and merged["trainer"]["accelerator"] == "gpu"
    assert merged["trainer"]["max_steps"] == base["trainer"]["max_steps"] and merged["run_name"] == "neat_100m_gpu"
    assert [c["class_path"] for c in merged["trainer"]["callbacks"]] == ["neat_lightning.callbacks.ComponentSchedule"]
    from lightning.pytorch.strategies import StrategyRegistry

    assert gpu["trainer"]["strategy"] in StrategyRegistry


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--config", "nowhere.yaml"], r"--config: no such file: 'nowhere.yaml'"),
        (["--config", "configs/neat_blt.yaml", "--trainer.max_steps", "3"], r"unknown option '--trainer.max_steps'"),
        (["--config", "configs/neat_blt.yaml", "--target", "svf=3"], r"--target 'svf=3': expected NAME=N"),
        (["--config", "configs/neat_blt.yaml", "--model.init_args.frontend", "tokens"], r"cannot build the model"),
        (["--config", "configs/neat_mvot.yaml", "--model.init_args.mvot_config.vqvae_ckpt", "missing.ckpt"],
         r"--vqvae-config 'configs/vqvae.yaml': codebook_size=8192, but the model has visual_vocab_size=128"),
        (["--config", "configs/neat_mvot.yaml", "--model.init_args.mvot_config.vqvae_ckpt", "missing.ckpt",
          "--vqvae-config", "nowhere.yaml"], r"vqvae_ckpt not found and --vqvae-config: no such file: 'nowhere.yaml'"),
    ],
)
def test_bad_arguments_fail_with_a_clear_message(argv, match, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert main(argv) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert err.startswith("neat params: error:")
    import re

    assert re.search(match, err), err
