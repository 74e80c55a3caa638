"""LoRA adapters: exact start, merge == base + adapter, exact unmerge, targets, budget, restore from structure."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from neat_lightning.components.lora import (
    DEFAULT_TARGETS,
    MLP_TARGETS,
    LoRALinear,
    adapter_parameters,
    freeze_base,
    inject_lora,
    lora_layers,
    lora_report,
    lora_state,
    merge_lora,
    rank_for_budget,
    restore_lora,
    unmerge_lora,
)
from neat_lightning.components.transformer import ByteTransformer, TransformerConfig


def tiny_model(dim: int = 32, n_layers: int = 2, seed: int = 0) -> ByteTransformer:
    torch.manual_seed(seed)
    return ByteTransformer(TransformerConfig(dim=dim, n_layers=n_layers, heads=2, block_size=16))


def randomise_adapters(module: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_parameters(module):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


IDS = torch.randint(4, 260, (2, 16), generator=torch.Generator().manual_seed(0))


def test_default_targets_pick_attention_linears_and_mlp_targets_add_the_mlp():
    model = tiny_model()
    names = inject_lora(model, DEFAULT_TARGETS, r=2)
    assert names == [f"blocks.{i}.{n}" for i in range(2) for n in ("attn.qkv", "attn.proj")]
    wider = tiny_model()
    assert inject_lora(wider, MLP_TARGETS, r=2) == [
        f"blocks.{i}.{n}" for i in range(2) for n in ("attn.qkv", "attn.proj", "mlp.w1", "mlp.w3", "mlp.w2")
    ]
    assert not isinstance(model.head, LoRALinear)  # the tied output head stays plain
    assert model.head.weight is model.embed.weight


def test_fresh_adapters_leave_outputs_unchanged_and_keep_base_keys():
    model = tiny_model()
    before = model(IDS)
    keys_before = set(model.state_dict())
    inject_lora(model, r=4)
    assert torch.equal(model(IDS), before)  # B = 0 at init: the update is exactly zero
    new_keys = set(model.state_dict()) - keys_before
    assert keys_before <= set(model.state_dict())  # base weights keep their keys (LoRALinear is an nn.Linear)
    assert new_keys and all(k.endswith(("lora_A", "lora_B")) for k in new_keys)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("r", [1, 3, 8])
def test_merge_equals_base_plus_adapter_and_unmerge_is_exact(r: int, bias: bool):
    torch.manual_seed(0)
    base = nn.Linear(24, 40, bias=bias)
    w0 = base.weight.detach().clone()
    layer = LoRALinear.from_linear(base, r=r, alpha=2.0 * r)
    randomise_adapters(layer)
    x = torch.randn(5, 7, 24)
    expected = base(x) + (x @ layer.lora_A.T @ layer.lora_B.T) * layer.scaling  # base + adapter, spelled out
    unmerged = layer(x)
    layer.merge()
    merged = layer(x)
    assert (merged - expected).abs().max() <= 1e-5
    assert (merged - unmerged).abs().max() <= 1e-5
    assert not torch.equal(layer.weight, w0)
    layer.unmerge()
    assert torch.equal(layer.weight, w0)  # restored bit for bit
    assert torch.equal(layer(x), unmerged)


def test_unmerge_without_premerge_copy_subtracts_to_float_precision():
    torch.manual_seed(0)
    base = nn.Linear(16, 16)
    w0 = base.weight.detach().clone()
    layer = LoRALinear.from_linear(base, r=2, alpha=4.0)
    randomise_adapters(layer)
    layer.merge()
    layer._premerge_weight = None  # as after loading a merged checkpoint
    layer.unmerge()
    assert (layer.weight - w0).abs().max() <= 1e-6


def test_merge_lora_remove_restores_plain_architecture_with_merged_weights():
    model = tiny_model()
    keys = set(model.state_dict())
    inject_lora(model, r=2)
    randomise_adapters(model)
    adapted = model(IDS)
    names = merge_lora(model, remove=True)
    assert len(names) == 4 and not lora_layers(model)
    assert set(model.state_dict()) == keys
    assert (model(IDS) - adapted).abs().max() <= 1e-5


def test_merge_unmerge_whole_model_roundtrip():
    model = tiny_model()
    inject_lora(model, r=2)
    randomise_adapters(model)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    adapted = model(IDS)
    merge_lora(model)
    assert all(layer.merged for layer in lora_layers(model).values())
    assert (model(IDS) - adapted).abs().max() <= 1e-5
    unmerge_lora(model)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_freeze_base_leaves_only_adapters_trainable_and_a_step_changes_only_them():
    model = tiny_model()
    inject_lora(model, r=2)
    frozen = freeze_base(model)
    assert frozen and all("lora_" not in n for n in frozen)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        model(IDS).logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in base.items())
    assert any(not torch.equal(params[n], v) for n, v in adapters.items())


def test_report_counts_adapters_once_and_budget_rank_fits_one_percent():
    model = tiny_model(dim=256, n_layers=2)
    r = rank_for_budget(model, DEFAULT_TARGETS, 0.01)
    inject_lora(model, r=r)
    freeze_base(model)
    report = lora_report(model)
    assert report.layers == 4
    assert report.adapter == report.trainable == sum(p.numel() for p in adapter_parameters(model))
    assert 0 < report.adapter_fraction <= 0.01
    assert "adapter parameters" in str(report)
    # one rank more would exceed the budget
    bigger = tiny_model(dim=256, n_layers=2)
    inject_lora(bigger, r=r + 1)
    assert lora_report(bigger).adapter_fraction > 0.01


def test_restore_lora_rebuilds_structure_and_state_dict_loads():
    model = tiny_model()
    inject_lora(model, r=3, alpha=5.0)
    randomise_adapters(model)
    merge_lora(model)
    state = lora_state(model, frozen=True)
    assert state["merged"] and state["r"] == 3 and state["alpha"] == 5.0
    fresh = tiny_model(seed=1)
    rng_before = torch.get_rng_state()
    restore_lora(fresh, state)
    assert torch.equal(torch.get_rng_state(), rng_before)  # no random init on restore
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh(IDS), model(IDS))
    assert all(not p.requires_grad for n, p in fresh.named_parameters() if "lora_" not in n)
    unmerge_lora(fresh), unmerge_lora(model)
    assert (fresh(IDS) - model(IDS)).abs().max() <= 1e-5


def test_seeded_generator_makes_injection_deterministic():
    a, b = tiny_model(), tiny_model()
    inject_lora(a, r=2, generator=torch.Generator().manual_seed(3))
    inject_lora(b, r=2, generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(x, y) for x, y in zip(adapter_parameters(a), adapter_parameters(b)))


def test_errors_name_the_field():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"targets='nothing_here' matches no nn\.Linear in ByteTransformer; .*blocks\.0\.attn\.qkv"):
        inject_lora(model, "nothing_here")
    with pytest.raises(ValueError, match=r"targets='\(' is not a valid regular expression"):
        inject_lora(model, "(")
    with pytest.raises(ValueError, match=r"r=0 must be an int >= 1"):
        inject_lora(model, r=0)
    with pytest.raises(TypeError, match=r"cannot inject LoRA into 'blocks\.0\.norm1': it is a RMSNorm"):
        inject_lora(model, ["blocks.0.norm1"])
    with pytest.raises(ValueError, match=r"records a LoRA adapter on 'blocks\.9\.attn\.qkv'.*no such module"):
        restore_lora(model, {"names": ["blocks.9.attn.qkv"], "r": 1, "alpha": 2.0, "merged": False})
    inject_lora(model, ["blocks.0.attn.qkv"], r=2)
    with pytest.raises(ValueError, match=r"'blocks\.0\.attn\.qkv' has r=2, the checkpoint records r=4"):
        restore_lora(model, {"names": ["blocks.0.attn.qkv"], "r": 4, "alpha": 2.0, "merged": False})
