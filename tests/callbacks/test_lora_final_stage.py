"""LoRAFinalStage with a real Trainer: freeze + inject + adapter optimizer + scene switch mid-epoch, merge at the
end, checkpoints that rebuild LoRA with ``load_from_checkpoint`` alone, exact resume from the middle of the stage."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from neat_lightning.callbacks import LoRAFinalStage
from neat_lightning.components.lora import LoRALinear, adapter_parameters, lora_layers, restore_from_checkpoint
from neat_lightning.components.transformer import ByteTransformer, TransformerConfig
from neat_lightning.data import ByteTextDataModule, SceneDataModule
from neat_lightning.data.bytes import RandomWindowBatches
from neat_lightning.modules import ByteLM

T, B, BPE = 32, 4, 5  # block size, batch size, batches per epoch: the stage starts and resumes mid-epoch


def tiny_lm() -> ByteLM:
    return ByteLM(dim=32, n_layers=1, heads=2, block_size=T, warmup_steps=2, learning_rate=3e-3)


def staged_data() -> SceneDataModule:
    return SceneDataModule(block_size=T, batch_size=B, pretrain=ByteTextDataModule(block_size=T, batch_size=B,
                                                                                   batches_per_epoch=BPE))


def trainer(max_steps: int, callbacks: list[Callback], root: Path, **kwargs) -> L.Trainer:
    checkpointing = any(isinstance(c, ModelCheckpoint) for c in callbacks)
    return L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False, max_steps=max_steps,
        limit_val_batches=0, deterministic=True, callbacks=callbacks, default_root_dir=root,
        enable_checkpointing=checkpointing, **kwargs,
    )


class Probe(Callback):
    """Records, per step, the batch, the optimizer's parameters and the base weights at the stage start."""

    def __init__(self) -> None:
        self.batches: dict[int, torch.Tensor] = {}
        self.opt_params: dict[int, list[torch.Tensor]] = {}
        self.base_at_start: dict[str, torch.Tensor] | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        step = trainer.global_step
        self.batches[step] = batch.clone()
        self.opt_params[step] = [p for g in trainer.optimizers[0].param_groups for p in g["params"]]
        if lora_layers(pl_module) and self.base_at_start is None:
            self.base_at_start = {n: p.detach().clone() for n, p in pl_module.named_parameters() if "lora_" not in n}


def test_stage_freezes_base_trains_adapters_and_switches_to_scenes_mid_epoch(tmp_path: Path):
    L.seed_everything(0)
    probe, stage = Probe(), LoRAFinalStage(start=3, start_unit="step", r=2, at_end="keep")
    model, dm = tiny_lm(), staged_data()
    trainer(7, [stage, probe], tmp_path).fit(model, datamodule=dm)
    assert stage.began_at == 3 and stage.active is False and stage.done
    # optimizer: the module's own before, adapters only from the stage start on
    adapters = {id(p) for p in adapter_parameters(model)}
    assert len(adapters) == 2 * 2  # qkv and proj of both blocks
    assert all(id(p) not in adapters for p in probe.opt_params[2])
    assert all({id(p) for p in probe.opt_params[s]} == adapters for s in range(3, 7))
    # base weights unchanged during the stage, adapters trained
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in probe.base_at_start.items())
    assert all(layer.lora_B.abs().sum() > 0 for layer in lora_layers(model).values())
    assert all(p.requires_grad for p in params.values())  # the stage is over: requires_grad restored
    # data: pretraining windows before step 3, scene windows (batch k = f(seed, k)) from step 3 on
    scenes = RandomWindowBatches(dm.train_stream, T, B, BPE, dm.seed)
    assert not any(torch.equal(probe.batches[s], scenes.batch(s)) for s in range(3))
    assert all(torch.equal(probe.batches[s], scenes.batch(s)) for s in range(3, 7))
    assert model.structure["lora"]["merged"] is False and model.structure["lora"]["r"] == 2
    assert model.structure["lora"]["frozen"] is False


def test_training_continues_from_the_final_merged_checkpoint(tmp_path: Path):
    L.seed_everything(0)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=100)
    trainer(5, [LoRAFinalStage(start=3, start_unit="step", r=2), ckpt], tmp_path).fit(tiny_lm(), datamodule=staged_data())
    final = torch.load(tmp_path / "last.ckpt", weights_only=False)  # written at train end, after the merge
    assert final["global_step"] == 5 and "lora" not in final and "neat_structure" not in final
    assert final["optimizer_states"] == []  # the adapter optimizer's state is dropped with the adapters
    model = tiny_lm()
    t = trainer(7, [LoRAFinalStage(start=3, start_unit="step", r=2)], tmp_path)
    t.fit(model, datamodule=staged_data(), ckpt_path=tmp_path / "last.ckpt")
    assert t.global_step == 7 and not lora_layers(model)
    assert len(t.optimizers[0].param_groups) == 2  # ByteLM's own AdamW (decay / no-decay groups)


def test_merge_at_end_restores_plain_layers_and_equals_the_adapted_model(tmp_path: Path):
    L.seed_everything(0)
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=6, save_top_k=-1)
    model = tiny_lm()
    trainer(6, [LoRAFinalStage(start=0.5, r=2), ckpt], tmp_path).fit(model, datamodule=staged_data())
    assert not lora_layers(model) and "lora" not in model.structure
    assert all(p.requires_grad for p in model.parameters())
    adapted = ByteLM.load_from_checkpoint(tmp_path / "epoch=1-step=6.ckpt")  # saved just before the merge
    assert len(lora_layers(adapted)) == 2  # qkv and proj of the single block
    ids = torch.randint(4, 260, (2, T), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        assert (model(ids) - adapted(ids)).abs().max() <= 1e-5


def test_load_from_checkpoint_alone_rebuilds_lora_mid_stage(tmp_path: Path):
    L.seed_everything(0)
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1)
    model = tiny_lm()
    trainer(6, [LoRAFinalStage(start=2, start_unit="step", r=3, at_end="keep"), ckpt], tmp_path).fit(model, datamodule=staged_data())
    saved = torch.load(tmp_path / "epoch=0-step=4.ckpt", weights_only=False)
    assert saved["neat_structure"]["lora"]["r"] == 3 and saved["lora"] == saved["neat_structure"]["lora"]
    loaded = ByteLM.load_from_checkpoint(tmp_path / "epoch=0-step=4.ckpt")
    assert sorted(lora_layers(loaded)) == sorted(lora_layers(model))
    assert all(isinstance(m, LoRALinear) and m.r == 3 for m in lora_layers(loaded).values())
    assert all(torch.equal(v, saved["state_dict"][k]) for k, v in loaded.state_dict().items())
    assert all(not p.requires_grad for n, p in loaded.named_parameters() if "lora_" not in n)


def test_resume_in_the_middle_of_the_stage_equals_the_uninterrupted_run(tmp_path: Path):
    def run(ckpt_path: str | None = None) -> ByteLM:
        L.seed_everything(0)
        ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=6, save_top_k=-1)
        model = tiny_lm()
        stage = LoRAFinalStage(start=3, start_unit="step", r=2, warmup_steps=2, at_end="keep")
        trainer(9, [stage, ckpt], tmp_path).fit(model, datamodule=staged_data(), ckpt_path=ckpt_path)
        assert stage.began_at == 3
        return model

    full = run()
    mid = tmp_path / "epoch=1-step=6.ckpt"  # stage began at step 3 (epoch 0), checkpoint mid-epoch 1
    assert torch.load(mid, weights_only=False)["lora"]["merged"] is False
    resumed = run(str(mid))
    full_sd, resumed_sd = full.state_dict(), resumed.state_dict()
    assert full_sd.keys() == resumed_sd.keys() and any("lora_A" in k for k in full_sd)
    assert all(torch.equal(full_sd[k], resumed_sd[k]) for k in full_sd)


def test_epoch_start_and_default_budget_rank(tmp_path: Path):
    L.seed_everything(0)
    stage = LoRAFinalStage(start=1, start_unit="epoch", at_end="keep")
    model = tiny_lm()
    probe = Probe()
    dm = staged_data()
    trainer(7, [stage, probe], tmp_path).fit(model, datamodule=dm)
    assert stage.began_at == BPE and stage.rank == 1  # dim 32: even rank 1 is over 1 %, so the floor
    scenes = RandomWindowBatches(dm.train_stream, T, B, BPE, dm.seed)
    assert torch.equal(probe.batches[BPE], scenes.batch(BPE))
    assert not torch.equal(probe.batches[BPE - 1], scenes.batch(BPE - 1))


class PlainLM(L.LightningModule):
    """Not a ResumableModule: restores adapters itself with one line in on_load_checkpoint."""

    def __init__(self) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = ByteTransformer(TransformerConfig(dim=32, n_layers=1, heads=2, block_size=T))

    def on_load_checkpoint(self, checkpoint):
        restore_from_checkpoint(self, checkpoint)

    def training_step(self, batch, batch_idx):
        logits = self.model(batch[:, :-1])
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def test_any_lightning_module_with_the_restore_hook(tmp_path: Path):
    L.seed_everything(0)
    model = PlainLM()
    t = trainer(4, [LoRAFinalStage(start=2, start_unit="step", r=2, at_end="keep")], tmp_path)
    t.fit(model, datamodule=staged_data())
    t.save_checkpoint(tmp_path / "plain.ckpt")
    loaded = PlainLM.load_from_checkpoint(tmp_path / "plain.ckpt")
    assert sorted(lora_layers(loaded)) == sorted(lora_layers(model))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_errors_name_the_setting(tmp_path: Path):
    with pytest.raises(ValueError, match=r"start=1.5 must be in \(0, 1\) with start_unit='fraction'"):
        LoRAFinalStage(start=1.5)
    with pytest.raises(ValueError, match=r"start=2.5 must be a whole number >= 0 with start_unit='step'"):
        LoRAFinalStage(start=2.5, start_unit="step")
    with pytest.raises(ValueError, match=r"at_end='drop' must be 'merge' or 'keep'"):
        LoRAFinalStage(at_end="drop")
    with pytest.raises(ValueError, match=r"needs Trainer\(max_steps\) > 0; got max_steps=-1"):
        trainer(-1, [LoRAFinalStage()], tmp_path, max_epochs=1).fit(tiny_lm(), datamodule=staged_data())
    bytes_only = ByteTextDataModule(block_size=T, batch_size=B, batches_per_epoch=BPE)
    with pytest.raises(TypeError, match=r"LoRAFinalStage\(switch_data=True\) needs a DataModule with "
                                        r"`schedule_switch`.*but ByteTextDataModule lacks it"):
        trainer(4, [LoRAFinalStage(switch_data=True)], tmp_path).fit(tiny_lm(), datamodule=bytes_only)
    with pytest.raises(ValueError, match=r"targets='decoder' matches no nn\.Linear in ByteLM; .*model\.blocks\.0"):
        trainer(4, [LoRAFinalStage(targets="decoder")], tmp_path).fit(tiny_lm(), datamodule=bytes_only)


@pytest.mark.slow
def test_cli_pipeline_config_runs_the_stage_and_resumes_mid_stage(tmp_path: Path):
    from tests.conftest import REPO, neat

    tiny = [
        "--config", str(REPO / "configs" / "byte_lm_initiation.yaml"), "--runs_dir", str(tmp_path),
        "--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar",
        "false", "--trainer.enable_model_summary", "false", "--checkpoint.every_n_train_steps", "3",
        "--model.init_args.dim", "32", "--model.init_args.n_layers", "1", "--model.init_args.heads", "2",
        "--model.init_args.block_size", "32", "--data.init_args.block_size", "32", "--data.init_args.batch_size", "2",
        "--data.init_args.pretrain.init_args.block_size", "32", "--data.init_args.pretrain.init_args.batch_size", "2",
        "--data.init_args.pretrain.init_args.batches_per_epoch", "4",
    ]
    neat("fit", *tiny, "--trainer.max_steps", "6", cwd=tmp_path)  # stage from round(0.8 * 6) = 5
    last = tmp_path / "byte_lm_initiation" / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=False)
    assert saved["global_step"] == 6 and saved["lora"]["merged"] is False
    assert len(lora_layers(ByteLM.load_from_checkpoint(last))) == 2
    proc = neat("fit", *tiny, "--trainer.max_steps", "8", "--ckpt_path", "last", cwd=tmp_path)
    assert "Restored all states" in proc.stdout + proc.stderr
    assert "adapters merged" in proc.stdout + proc.stderr
    final = torch.load(last, weights_only=False)  # save_last at train end: the merged model
    assert final["global_step"] == 8 and "lora" not in final
    state = next(v for k, v in final["callbacks"].items() if k.startswith("LoRAFinalStage"))
    assert state["began_at"] == 5 and state["done"]
    assert not lora_layers(ByteLM.load_from_checkpoint(last))
