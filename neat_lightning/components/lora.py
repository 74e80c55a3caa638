"""LoRA: low-rank adapters for ``nn.Linear`` layers of any ``nn.Module``.

Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models" (arXiv 2106.09685), eq. (3):

    h = W0 x + (alpha / r) * B A x,      A: (r, in) Kaiming-uniform,  B: (out, r) zeros

so a freshly injected adapter leaves the model's outputs unchanged. ``merge`` folds ``(alpha / r) B A`` into ``W0``
(zero inference cost); ``unmerge`` takes it out again.

Plain ``torch``; no Lightning. Hand-written on purpose: ``peft`` pulls in ``transformers``; the ~200 lines here cover
plain ``nn.Module`` trees, keep the base weight's state-dict key (``LoRALinear`` *is* an ``nn.Linear`` and shares the
original ``weight`` Parameter) and are replayable from a checkpoint through :func:`restore_lora`.

Structural state (what :func:`restore_lora` replays, recorded by ``LoRAFinalStage`` under the name ``"lora"``)::

    {"names": ["model.blocks.0.attn.qkv", ...], "r": 1, "alpha": 2.0, "dropout": 0.0,
     "merged": False, "frozen": True}
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# attention qkv / output projection of every block (names as in ByteTransformer). Hu et al. 2021 (LoRA, sec. 4.2)
# adapt attention weights only; it also keeps the quickstart-size model within a 1% adapter budget at rank 2,
# where adding the SwiGLU matrices costs 1.01% at rank 1. MLP_TARGETS adds them for larger models.
DEFAULT_TARGETS = r"(^|\.)attn\.(qkv|proj)$"
MLP_TARGETS = r"(^|\.)(attn\.(qkv|proj)|mlp\.(w1|w2|w3))$"


# ----------------------------------------------------------------------------------------------------------------------
# the adapted layer


class LoRALinear(nn.Linear):
    """``nn.Linear`` plus a low-rank update: ``y = x W0ᵀ + b + (alpha / r) · dropout(x) Aᵀ Bᵀ``.

    Args:
        in_features, out_features, bias: as ``nn.Linear``.
        r: adapter rank (>= 1).
        alpha: scale numerator; the update is multiplied by ``alpha / r``.
        dropout: dropout on the adapter's input only (the base path is untouched).

    Attributes:
        lora_A: (r, in) float, Kaiming-uniform at init.
        lora_B: (out, r) float, zeros at init (the update starts at exactly zero).
        merged: whether ``(alpha / r) B A`` is currently folded into ``weight``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        r: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if not isinstance(r, int) or r < 1:
            raise ValueError(f"r={r!r} must be an int >= 1")
        if alpha <= 0:
            raise ValueError(f"alpha={alpha} must be > 0")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout={dropout} must be in [0, 1)")
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.r, self.alpha = r, float(alpha)
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, device=device, dtype=dtype))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self._premerge_weight: torch.Tensor | None = None  # exact copy of W0 while merged (memory only)
        if self.lora_A.device.type != "meta":
            self.reset_lora_parameters()

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    @property
    def dropout(self) -> float:
        return self.lora_dropout.p if isinstance(self.lora_dropout, nn.Dropout) else 0.0

    def reset_lora_parameters(self, generator: torch.Generator | None = None) -> None:
        """A ~ Kaiming-uniform (as ``nn.Linear``), B = 0: the adapted layer starts equal to the base layer."""
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5), generator=generator)
            self.lora_B.zero_()

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        generator: torch.Generator | None = None,
        init: bool = True,
    ) -> LoRALinear:
        """Wrap ``linear``: the new layer shares its ``weight`` / ``bias`` Parameters (ties and references survive).

        ``init=False`` leaves the adapter uninitialised (``torch.empty``; used when a state dict will overwrite it,
        so no random numbers are drawn).
        """
        w = linear.weight
        lora = cls(linear.in_features, linear.out_features, linear.bias is not None, r, alpha, dropout, device="meta")
        lora.weight = w
        lora.bias = linear.bias
        lora.lora_A = nn.Parameter(torch.empty(r, linear.in_features, device=w.device, dtype=w.dtype))
        lora.lora_B = nn.Parameter(torch.zeros(linear.out_features, r, device=w.device, dtype=w.dtype))
        if init:
            lora.reset_lora_parameters(generator)
        lora.train(linear.training)
        return lora

    def delta_weight(self) -> torch.Tensor:
        """The low-rank update (alpha / r) · B A: (out, in)."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in) -> (..., out)."""
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            return y
        return y + F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into ``weight``. A copy of ``W0`` is kept in memory so :meth:`unmerge` is exact."""
        if self.merged:
            return
        self._premerge_weight = self.weight.detach().clone()
        self.weight.add_(self.delta_weight().to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update out of ``weight``: bit-exact when this layer did the merge in this process; after a
        merged checkpoint is loaded (no copy of ``W0`` exists) the update is subtracted, exact to float rounding."""
        if not self.merged:
            return
        if self._premerge_weight is not None:
            self.weight.copy_(self._premerge_weight)
        else:
            self.weight.sub_(self.delta_weight().to(self.weight.dtype))
        self._premerge_weight = None
        self.merged = False

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding the merged weight (shares this layer's ``weight``/``bias`` Parameters)."""
        self.merge()
        self._premerge_weight = None
        linear = nn.Linear(self.in_features, self.out_features, self.bias is not None, device="meta")
        linear.weight = self.weight
        linear.bias = self.bias
        linear.train(self.training)
        return linear

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, alpha={self.alpha}, merged={self.merged}"


# ----------------------------------------------------------------------------------------------------------------------
# whole-module operations


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


def lora_layers(module: nn.Module) -> dict[str, LoRALinear]:
    """Name -> adapted layer, in ``named_modules`` order."""
    return {name: m for name, m in module.named_modules() if isinstance(m, LoRALinear)}


def target_names(module: nn.Module, targets: str = DEFAULT_TARGETS) -> list[str]:
    """Names of the plain ``nn.Linear`` layers whose qualified name matches the regex ``targets`` (``re.search``).

    Raises:
        ValueError: ``targets`` is not a valid regex, or it matches no ``nn.Linear`` (the message lists them).
    """
    try:
        pattern = re.compile(targets)
    except re.error as e:
        raise ValueError(f"targets={targets!r} is not a valid regular expression: {e}") from None
    linears = [n for n, m in module.named_modules() if isinstance(m, nn.Linear) and not isinstance(m, LoRALinear)]
    names = [n for n in linears if pattern.search(n)]
    if not names:
        shown = ", ".join(linears[:12]) + (", ..." if len(linears) > 12 else "")
        raise ValueError(
            f"targets={targets!r} matches no nn.Linear in {type(module).__name__}; its linear layers are: "
            f"{shown or '(none)'}"
        )
    return names


def inject_lora(
    module: nn.Module,
    targets: str | list[str] = DEFAULT_TARGETS,
    r: int = 8,
    alpha: float | None = None,
    dropout: float = 0.0,
    generator: torch.Generator | None = None,
    init: bool = True,
) -> list[str]:
    """Replace each target ``nn.Linear`` of ``module`` by a :class:`LoRALinear` sharing its weights, in place.

    Args:
        module: any ``nn.Module`` (a LightningModule included: names then start with its attributes, e.g. ``model.``).
        targets: a regex searched in qualified module names, or an explicit list of names.
        r: adapter rank.
        alpha: scale numerator; ``None`` -> ``2 * r`` (update scale 2).
        dropout: adapter-input dropout.
        generator: random source of the ``A`` init (a seeded one makes injection independent of the global RNG).
        init: ``False`` leaves adapters uninitialised (a state dict is about to be loaded).

    Returns:
        The injected layer names, in module order.
    """
    alpha = float(2 * r if alpha is None else alpha)
    if isinstance(targets, str):
        names = target_names(module, targets)
    else:
        names = list(targets)
        for name in names:
            layer = module.get_submodule(name)  # raises AttributeError naming the missing part
            if not isinstance(layer, nn.Linear) or isinstance(layer, LoRALinear):
                raise TypeError(f"cannot inject LoRA into {name!r}: it is a {type(layer).__name__}, not a plain nn.Linear")
    for name in names:
        _set_submodule(module, name, LoRALinear.from_linear(module.get_submodule(name), r, alpha, dropout, generator, init))
    return names


def merge_lora(module: nn.Module, remove: bool = False) -> list[str]:
    """Fold every adapter into its base weight. ``remove=True`` also puts plain ``nn.Linear`` layers back (the
    module then has exactly its original architecture and state-dict keys). Returns the layer names."""
    layers = lora_layers(module)
    for name, layer in layers.items():
        if remove:
            _set_submodule(module, name, layer.to_linear())
        else:
            layer.merge()
    return list(layers)


def unmerge_lora(module: nn.Module) -> list[str]:
    """Take every merged adapter's update out of its base weight again. Returns the layer names."""
    layers = lora_layers(module)
    for layer in layers.values():
        layer.unmerge()
    return list(layers)


def adapter_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The ``lora_A`` / ``lora_B`` Parameters, in module order (a deterministic order: optimizer state depends on it)."""
    return [p for layer in lora_layers(module).values() for p in (layer.lora_A, layer.lora_B)]


def freeze_base(module: nn.Module) -> list[str]:
    """Set ``requires_grad=False`` on every parameter except the adapters. Returns the names it froze."""
    adapters = {id(p) for p in adapter_parameters(module)}
    frozen = []
    for name, p in module.named_parameters():
        if id(p) not in adapters and p.requires_grad:
            p.requires_grad_(False)
            frozen.append(name)
    return frozen


def adapter_size(module: nn.Module, targets: str = DEFAULT_TARGETS, r: int = 1) -> int:
    """Parameters that rank-``r`` adapters on ``targets`` would add: Σ r · (in + out)."""
    return sum(r * (m.in_features + m.out_features) for m in map(module.get_submodule, target_names(module, targets)))


def rank_for_budget(module: nn.Module, targets: str = DEFAULT_TARGETS, max_fraction: float = 0.01) -> int:
    """The largest rank whose adapters are at most ``max_fraction`` of the module's parameters (at least 1).

    The fraction of a (in, out) layer is r (in + out) / (in · out) ≈ 2 r / dim, so tiny models may not fit even
    r = 1 under 1 %; rank 1 is returned then (check it with :func:`lora_report`).
    """
    if not 0.0 < max_fraction < 1.0:
        raise ValueError(f"max_fraction={max_fraction} must be in (0, 1)")
    base = sum(p.numel() for p in module.parameters())
    per_rank = adapter_size(module, targets, 1)
    return max(1, int(max_fraction * base // per_rank))


@dataclass(frozen=True)
class LoRAReport:
    """Parameter counts of a module with adapters (shared/tied Parameters counted once)."""

    total: int  # all parameters, adapters included
    trainable: int  # requires_grad
    adapter: int  # lora_A + lora_B
    layers: int  # adapted layers

    @property
    def adapter_fraction(self) -> float:
        """Adapter parameters over the base model's parameters."""
        return self.adapter / max(1, self.total - self.adapter)

    def __str__(self) -> str:
        return (
            f"LoRA: {self.layers} layers, {self.adapter:,} adapter parameters = {100 * self.adapter_fraction:.3f}% of "
            f"{self.total - self.adapter:,} base; trainable {self.trainable:,} of {self.total:,}"
        )


def lora_report(module: nn.Module) -> LoRAReport:
    params = list(module.parameters())  # deduplicated by nn.Module
    return LoRAReport(
        total=sum(p.numel() for p in params),
        trainable=sum(p.numel() for p in params if p.requires_grad),
        adapter=sum(p.numel() for p in adapter_parameters(module)),
        layers=len(lora_layers(module)),
    )


# ----------------------------------------------------------------------------------------------------------------------
# structural state (checkpoints)


def lora_state(module: nn.Module, frozen: bool) -> dict[str, Any]:
    """The plain, picklable description of the adapters in ``module`` that :func:`restore_lora` replays."""
    layers = lora_layers(module)
    if not layers:
        raise ValueError(f"{type(module).__name__} has no LoRA layers to describe")
    first = next(iter(layers.values()))
    merged = {layer.merged for layer in layers.values()}
    if len(merged) != 1:
        raise ValueError("some LoRA layers are merged and others not; merge or unmerge all of them first")
    return {
        "names": list(layers), "r": first.r, "alpha": first.alpha, "dropout": first.dropout,
        "merged": merged.pop(), "frozen": bool(frozen),
    }


def restore_lora(module: nn.Module, state: dict[str, Any]) -> None:
    """Re-inject the adapters described by ``state`` (from :func:`lora_state`) before a state dict is loaded.

    Called by ``ResumableModule.restore_structure`` for the entry ``"lora"``: ``Module.load_from_checkpoint(path)``
    and ``--ckpt_path`` resume call it from ``on_load_checkpoint``. Adapters are left uninitialised (the state dict
    fills them; no random numbers are drawn). Layers already adapted with the same rank are kept.

    Raises:
        ValueError: a recorded layer is missing, not an ``nn.Linear``, or adapted with a different rank.
    """
    for key in ("names", "r", "alpha", "merged"):
        if key not in state:
            raise ValueError(f"LoRA structure entry lacks {key!r}; got keys {sorted(state)}")
    existing = lora_layers(module)
    todo = []
    for name in state["names"]:
        try:
            layer = module.get_submodule(name)
        except AttributeError:
            raise ValueError(
                f"checkpoint records a LoRA adapter on {name!r}, but {type(module).__name__} has no such module"
            ) from None
        if name in existing:
            if layer.r != state["r"]:
                raise ValueError(f"LoRA layer {name!r} has r={layer.r}, the checkpoint records r={state['r']}")
            continue
        if not isinstance(layer, nn.Linear):
            raise ValueError(f"checkpoint records a LoRA adapter on {name!r}, which is a {type(layer).__name__}")
        todo.append(name)
    if todo:
        inject_lora(module, todo, r=int(state["r"]), alpha=float(state["alpha"]),
                    dropout=float(state.get("dropout", 0.0)), init=False)
    for layer in lora_layers(module).values():
        layer.merged = bool(state["merged"])
    if state.get("frozen", False):
        freeze_base(module)


CHECKPOINT_KEY = "lora"  # module-agnostic copy of the structure entry, written by LoRAFinalStage


def restore_from_checkpoint(module: nn.Module, checkpoint: dict[str, Any]) -> bool:
    """For LightningModules that do not subclass ``ResumableModule``: call this first in ``on_load_checkpoint`` so the
    adapters exist before Lightning loads the state dict. Returns whether adapters were restored.

        def on_load_checkpoint(self, checkpoint):
            restore_from_checkpoint(self, checkpoint)

    (``ResumableModule`` subclasses need nothing: the ``"lora"`` structure entry is replayed by ``restore_lora``.)
    """
    state = checkpoint.get("neat_structure", {}).get("lora") or checkpoint.get(CHECKPOINT_KEY)
    if not state:
        return False
    restore_lora(module, state)
    return True
