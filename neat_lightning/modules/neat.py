"""NeatModel: the unified byte model of Project NEAT — a byte transformer with switchable components.

Components (each an exact bypass when switched off, :class:`~neat_lightning.protocols.ComponentSwitchable`):

* ``titans`` — Titans neural long-term memory as context in chosen blocks (:mod:`neat_lightning.components.titans`),
  with persistent tokens and sliding-window attention for short-term context;
* ``svf`` — Transformer² singular-value fine-tuning experts over the block linears, one per task type, picked or
  mixed by a dispatcher from a first pass (:mod:`neat_lightning.components.svf`);
* ``mvot`` — MVoT visual tokens: a frozen VQ-VAE's codes in their own id range after the 260 byte ids, the token
  discrepancy loss L_D, a visualization-decision head and interleaved text + image generation
  (:mod:`neat_lightning.components.mvot`, ``docs/mvot.md``).

The backbone (:class:`NeatBackbone`) is a plain ``nn.Module``: :meth:`NeatBackbone.forward_hidden` runs over any
(B, T, C) embeddings — byte embeddings today, patch embeddings when the BLT processor plugs in — and returns hidden
states plus the memory state, so segments can be streamed.

The module implements ``TextGenerator`` (``generate_text``), ``MemoryConsolidator`` (``memory_snapshot``,
``consolidation_loss``, ``consolidate``, ``reset_short_term``) and ``ComponentSwitchable``. Which components are
active is written to checkpoints (``"neat_components"``) and replayed before the weights load, so
``NeatModel.load_from_checkpoint(path)`` alone rebuilds it; SVF's decomposition and ``z`` vectors are buffers and
parameters of the state dict.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from neat_lightning.components.mvot import NO_IMAGE, MVoTPath, advance, constrain_logits, image_counts
from neat_lightning.components.sampling import eval_mode, sample
from neat_lightning.components.blt import BLTConfig, BLTProcessor
from neat_lightning.components.svf import TaskDispatcher, inject_svf, svf_layers, svf_mixture
from neat_lightning.components.titans import (
    MemoryBlock,
    MemoryState,
    MemoryStats,
    TitansConfig,
    detach_state,
)
from neat_lightning.components.transformer import ByteTransformer, TransformerConfig, rope_angles
from neat_lightning.codec import EOS_ID, PAD_ID, VOCAB_SIZE
from neat_lightning.data.math import TASK_TYPES
from neat_lightning.modules.base import ResumableModule, load_frozen
from neat_lightning.modules.generation import TextGenerationMixin
from neat_lightning.modules.optim import default_adamw

COMPONENTS_KEY = "neat_components"
COMPONENT_NAMES = ("titans", "svf", "mvot")
DEFAULT_SVF_TASKS = (*TASK_TYPES, "general")  # the seed's 8 experts: the 7 task types and a general one


class BackboneOutput(NamedTuple):
    hidden: torch.Tensor  # (B, T, C) after the final norm
    states: list[MemoryState | None]  # one per memory block
    stats: list[MemoryStats]  # one per active memory block


class NeatBackbone(ByteTransformer):
    """A :class:`ByteTransformer` whose ``memory_layers`` blocks are :class:`MemoryBlock` s.

    The base weights are initialised exactly as ``ByteTransformer(config)`` (the memory blocks are built afterwards
    and take over the plain blocks' weights), so with the same seed a model with and without memory share them.
    """

    def __init__(self, config: TransformerConfig, titans: TitansConfig | None, memory_layers: Sequence[int]) -> None:
        super().__init__(config)
        self.memory_layers = tuple(memory_layers) if titans is not None else ()
        for i in self.memory_layers:
            block = MemoryBlock(config, titans)
            block.load_state_dict(self.blocks[i].state_dict(), strict=False)
            self.blocks[i] = block

    def memory_blocks(self) -> list[MemoryBlock]:
        return [b for b in self.blocks if isinstance(b, MemoryBlock)]

    def forward_hidden(
        self,
        x: torch.Tensor,
        start_pos: int = 0,
        states: Sequence[MemoryState | None] | None = None,
        record: bool = False,
    ) -> BackboneOutput:
        """Embeddings x (B, T, C) -> normalised hidden states (B, T, C), next memory states, surprise stats.

        ``states`` (one per memory block, from a previous segment) continue the long-term memory across calls.
        """
        positions = torch.arange(start_pos, start_pos + x.shape[1], device=x.device)
        cos, sin = rope_angles(positions, self.config.dim_head, self.config.rope_base)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        mem_blocks = self.memory_blocks()
        states = list(states) if states is not None else [None] * len(mem_blocks)
        if len(states) != len(mem_blocks):
            raise ValueError(f"states has {len(states)} entries but the backbone has {len(mem_blocks)} memory blocks")
        new_states: list[MemoryState | None] = []
        stats: list[MemoryStats] = []
        j = 0
        for block in self.blocks:
            if isinstance(block, MemoryBlock):
                x, state, stat = block.forward_memory(x, cos, sin, positions, states[j], record=record)
                new_states.append(state)
                if stat is not None:
                    stats.append(stat)
                j += 1
            else:
                x = block(x, cos, sin, positions)
        return BackboneOutput(self.norm(x), new_states, stats)


class NeatModel(TextGenerationMixin, ResumableModule):
    """Byte transformer with switchable Titans memory and Transformer² SVF experts.

    Batches are the :class:`~neat_lightning.data.math.MathDataModule` dicts (``ids`` (B, T + 1), ``answer_ids``,
    ``task``) or plain ``(B, T + 1)`` id tensors. Logged: ``train/loss``, ``val/loss``, ``val/bpb``,
    ``val/exact_match`` and ``val/exact_match/<task>``, ``memory/surprise``, ``memory/utilization`` and, with SVF
    dispatch, ``train/dispatch_loss`` / ``val/dispatch_acc``.

    Exact match is measured teacher-forced: a completion counts when the argmax prediction of every one of its
    bytes is right, which is exactly when greedy decoding from the prompt would reproduce it (a lower bound on
    generative accuracy: another correct solution text would not count).

    Args:
        dim: model width.
        n_layers: transformer blocks.
        heads: attention heads.
        block_size: training context length in bytes.
        window: sliding-window attention span (bytes) — the short-term context; ``None`` for full attention.
        mlp_hidden: SwiGLU hidden width; ``None`` for 8/3 * dim rounded up to 32.
        dropout: dropout on attention and residual branches.
        rope_base: RoPE base frequency.
        frontend: ``"bytes"`` (byte embeddings straight into the backbone) or ``"blt"``: the BLT processor
            (:mod:`neat_lightning.components.blt`) patches the bytes, its local encoder pools them, the backbone runs
            over patches and its local decoder predicts bytes. Logs ``patch/mean_size`` and ``patch/threshold``.
        blt_config: the BLT local models, hash n-gram embeddings and patching (adaptive entropy threshold by
            default; its state is saved in the checkpoint).
        entropy_model_ckpt: ByteLM checkpoint of the frozen entropy model (``frontend="blt"``, entropy patching).
        titans: build the Titans memory component.
        memory_layers: indices of blocks with memory as context; ``None`` for the last block.
        titans_config: memory settings (seed: persistent 128, memory 2048, surprise threshold 0.5).
        svf: build the SVF component (experts over the block linears matched by ``svf_targets``).
        svf_tasks: expert names; data task types map to the expert of the same name, else to ``general`` if
            present, else to the base model.
        svf_rank: singular directions per matrix; ``None`` for all.
        svf_method: ``"full"`` SVD or ``"randomized"`` (needs ``svf_rank``) for large matrices.
        svf_targets: regex over backbone module names of the linears to adapt.
        svf_dispatch: ``"oracle"`` uses the batch's task labels; ``"classify"`` / ``"mixture"`` use the
            dispatcher's first pass (trained on the labels while SVF is active).
        svf_freeze_base: while SVF is active only ``z`` and the dispatcher train (other gradients are dropped).
        svf_train_experts: experts whose ``z`` trains (e.g. one task type); ``None`` for all.
        dispatch_prefix: leading bytes the dispatcher pools (the start of the prompt).
        active_components: components active from the start (others wait for ``set_component_active`` /
            the ComponentSchedule callback).
        answer_weight: loss weight of completion bytes (solution + answer) relative to other bytes.
        mvot: build the MVoT visual-token path (:mod:`neat_lightning.components.mvot`): ids 260 / 261 mark the
            begin / end of an image, ids 262.. are the codes of the frozen VQ-VAE, a decision head predicts when to
            start an image, and ``mvot_lambda * L_D`` (token discrepancy loss) is added on visual positions.
            Switched off (``set_component_active``), L_D and the decision loss are skipped and generation writes
            text only.
        vqvae_ckpt: the trained VQ-VAE checkpoint (``modules.VQVAE``) the visual path loads frozen.
        visual_vocab_size: visual tokens K; must equal the VQ-VAE's ``codebook_size``.
        image_size: image side in pixels (a multiple of the VQ-VAE's ``downsample``): sets the h x w codes per image.
        mvot_lambda: weight of L_D (MVoT's seed: 0.1; 0 disables it).
        decision_weight: weight of the visualization-decision head's binary cross-entropy.
        learning_rate, weight_decay, warmup_steps, min_lr_ratio: the default AdamW + warm-up/cosine schedule.
    """

    def __init__(
        self,
        dim: int = 128,
        n_layers: int = 2,
        heads: int = 4,
        block_size: int = 256,
        window: int | None = 64,
        mlp_hidden: int | None = None,
        dropout: float = 0.0,
        rope_base: float = 10_000.0,
        frontend: Literal["bytes", "blt"] = "bytes",
        blt_config: BLTConfig = BLTConfig(),
        entropy_model_ckpt: str | None = None,
        titans: bool = True,
        memory_layers: list[int] | None = None,
        titans_config: TitansConfig = TitansConfig(),
        svf: bool = True,
        svf_tasks: list[str] = list(DEFAULT_SVF_TASKS),
        svf_rank: int | None = None,
        svf_method: Literal["full", "randomized"] = "full",
        svf_targets: str = r"blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(w1|w2|w3))",
        svf_dispatch: Literal["oracle", "classify", "mixture"] = "classify",
        svf_freeze_base: bool = True,
        svf_train_experts: list[str] | None = None,
        dispatch_prefix: int = 32,
        active_components: list[str] = ["titans"],
        answer_weight: float = 1.0,
        mvot: bool = False,
        vqvae_ckpt: str | None = None,
        visual_vocab_size: int = 128,
        image_size: int = 32,
        mvot_lambda: float = 0.1,
        decision_weight: float = 1.0,
        learning_rate: float = 3e-3,
        weight_decay: float = 0.1,
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.1,
    ) -> None:
        super().__init__()
        if memory_layers is not None:
            for i in memory_layers:
                if not 0 <= i < n_layers:
                    raise ValueError(f"memory_layers={memory_layers}: layer {i} is not in [0, n_layers={n_layers})")
        if svf and not svf_tasks:
            raise ValueError("svf_tasks=[] must name at least one expert when svf=True")
        if answer_weight <= 0:
            raise ValueError(f"answer_weight={answer_weight} must be > 0")
        if svf_dispatch not in ("oracle", "classify", "mixture"):
            raise ValueError(f"svf_dispatch={svf_dispatch!r} must be 'oracle', 'classify' or 'mixture'")
        for name in svf_train_experts or []:
            if name not in svf_tasks:
                raise ValueError(f"svf_train_experts: {name!r} is not an expert; svf_tasks are {list(svf_tasks)}")
        if mvot and vqvae_ckpt is None:
            raise ValueError("mvot=True needs vqvae_ckpt: the path of a trained VQVAE checkpoint (modules.VQVAE)")
        if mvot_lambda < 0 or decision_weight < 0:
            raise ValueError(f"mvot_lambda={mvot_lambda} and decision_weight={decision_weight} must be >= 0")
        if visual_vocab_size < 1:
            raise ValueError(f"visual_vocab_size={visual_vocab_size} must be >= 1")
        built = [n for n, on in (("titans", titans), ("svf", svf), ("mvot", mvot)) if on]
        for name in active_components:
            if name not in built:
                raise ValueError(f"active_components: {name!r} is not a built component; built: {built}")
        if isinstance(titans_config, dict):  # as stored in checkpoints (plain values load with weights_only=True)
            titans_config = TitansConfig(**titans_config)
        if not isinstance(titans_config, TitansConfig):
            raise TypeError(f"titans_config must be a TitansConfig, got {type(titans_config).__name__}")
        if frontend not in ("bytes", "blt"):
            raise ValueError(f"frontend={frontend!r} must be 'bytes' or 'blt'")
        if isinstance(blt_config, dict):  # as stored in checkpoints
            blt_config = BLTConfig(**blt_config)
        if not isinstance(blt_config, BLTConfig):
            raise TypeError(f"blt_config must be a BLTConfig, got {type(blt_config).__name__}")
        # mvot with BLT entropy patching: BLTProcessor.patch_lengths hides ids >= 260 from the 260-id entropy ByteLM
        # (PAD in their place) and makes each of them a patch of its own (components/blt.py, tested there)
        self.save_hyperparameters(ignore=["titans_config", "blt_config"])
        self.hparams["titans_config"] = asdict(titans_config)
        self.hparams["blt_config"] = asdict(blt_config)
        self.config = TransformerConfig(
            vocab_size=VOCAB_SIZE + 2 + visual_vocab_size if mvot else VOCAB_SIZE,  # MVoT: BOI, EOI, K codes
            dim=dim, n_layers=n_layers, heads=heads, block_size=block_size, window=window,
            mlp_hidden=mlp_hidden, dropout=dropout, tie_weights=True, rope_base=rope_base,
        )
        layers = list(memory_layers) if memory_layers is not None else [n_layers - 1]
        self.model = NeatBackbone(self.config, titans_config if titans else None, layers)
        self.components: tuple[str, ...] = tuple(built)
        self.svf_tasks = tuple(svf_tasks) if svf else ()
        self.svf_names: list[str] = []
        self.dispatcher: TaskDispatcher | None = None
        if svf:
            self.svf_names = inject_svf(self.model, svf_targets, len(svf_tasks), svf_rank, svf_method)
            if svf_dispatch != "oracle":
                self.dispatcher = TaskDispatcher(dim, len(svf_tasks), svf_dispatch, dispatch_prefix)
        # data task index -> expert index (-1: no expert, base model)
        general = self.svf_tasks.index("general") if "general" in self.svf_tasks else -1
        expert = [self.svf_tasks.index(t) if t in self.svf_tasks else general for t in TASK_TYPES]
        self.register_buffer("task_to_expert", torch.tensor(expert, dtype=torch.long), persistent=False)
        self.mvot: MVoTPath | None = None
        if mvot:
            with torch.random.fork_rng(devices=[]):  # building the VQ-VAE must not shift anyone's random stream
                vqvae = load_frozen_vqvae(vqvae_ckpt, visual_vocab_size)
            self.mvot = MVoTPath(vqvae, dim, vqvae.grid_shape(image_size))
        # BLT front end (components/blt.py): bytes -> patches -> this backbone -> bytes; built last, so the byte
        # path (frontend='bytes') draws exactly the random numbers it always did
        self.blt: BLTProcessor | None = None
        self._patches: tuple[torch.Tensor, torch.Tensor] | None = None  # (ids, lengths) of the step in progress
        if frontend == "blt":
            entropy_model = load_entropy_model(entropy_model_ckpt) if blt_config.patching == "entropy" else None
            self.blt = BLTProcessor(blt_config, self.config.vocab_size, dim, dropout, rope_base, entropy_model)
            self.model.embed, self.model.head = None, None  # bytes enter and leave through the BLT local models
        self.active: set[str] = set()
        for name in built:
            self.set_component_active(name, name in active_components)
        self._val: dict[str, torch.Tensor] = {}

    # -- components (ComponentSwitchable) --------------------------------------------------------------------------

    def set_component_active(self, name: str, active: bool, decompose: bool = True) -> None:
        """Switch a component on or off. Switching SVF on decomposes its weights the first time (``decompose``)."""
        if name not in self.components:
            raise ValueError(f"unknown component {name!r}; this NeatModel has {list(self.components)}")
        if name == "titans":
            for block in self.model.memory_blocks():
                block.memory_active = active
        elif name == "svf":
            for layer in svf_layers(self.model):
                if active and decompose and not bool(layer.decomposed):
                    layer.decompose()
                layer.svf_active = active
        if active:
            self.active.add(name)
        else:
            self.active.discard(name)

    def is_active(self, name: str) -> bool:
        return name in self.active

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[COMPONENTS_KEY] = {"built": list(self.components), "active": sorted(self.active)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint.get(COMPONENTS_KEY)
        if saved is None:
            return
        if list(saved["built"]) != list(self.components):
            raise ValueError(
                f"checkpoint components {saved['built']} do not match this NeatModel's components "
                f"{list(self.components)} (fields titans= / svf=)"
            )
        for name in self.components:  # decomposition buffers come with the state dict loaded right after
            self.set_component_active(name, name in saved["active"], decompose=False)

    # -- model -----------------------------------------------------------------------------------------------------

    def run(
        self,
        ids: torch.Tensor,
        states: Sequence[MemoryState | None] | None = None,
        mix: torch.Tensor | None = None,
        record: bool = False,
        start_pos: int = 0,
    ) -> tuple[torch.Tensor, BackboneOutput]:
        """ids (B, T) -> logits (B, T, 260) and the backbone output; ``mix`` (B, n_experts) selects SVF experts."""
        if self.blt is not None:
            return self.run_blt(ids, states, mix, record)
        with svf_mixture(svf_layers(self.model), mix if self.is_active("svf") else None):
            out = self.model.forward_hidden(self.model.embed(ids), start_pos, states, record)
        return self.model.head(out.hidden), out

    def run_blt(
        self,
        ids: torch.Tensor,
        states: Sequence[MemoryState | None] | None = None,
        mix: torch.Tensor | None = None,
        record: bool = False,
    ) -> tuple[torch.Tensor, BackboneOutput]:
        """BLT front end: ids (B, T) -> logits (B, T, V) and the backbone output over patches, whose ``hidden`` is
        brought back to bytes (B, T, C): each byte gets the latent output its decoder reads last (its own patch's
        summary of the patches before it), so byte-level heads (SVF dispatcher, MVoT decision) see causal states."""
        cached = self._patches
        lengths = cached[1] if cached is not None and cached[0] is ids else None
        outs: list[BackboneOutput] = []

        def latent(x: torch.Tensor) -> torch.Tensor:  # (B, P, C) patch embeddings -> (B, P, C)
            outs.append(self.model.forward_hidden(x, 0, states, record))
            return outs[-1].hidden

        with svf_mixture(svf_layers(self.model), mix if self.is_active("svf") else None):
            res = self.blt(ids, latent, lengths)
        out = outs[0]
        hidden = torch.gather(out.hidden, 1, res["patch_ids"][..., None].expand(-1, -1, out.hidden.shape[-1]))
        return res["logits"], BackboneOutput(hidden, out.states, out.stats)

    def patch_lengths(self, ids: torch.Tensor, update: bool = False) -> torch.Tensor:
        """BLT patches of ids (B, T) -> (B, P) lengths; ``update`` lets the adaptive threshold observe the batch
        (averaged over DDP ranks, so every rank keeps the same threshold)."""
        if self.blt is None:
            raise ValueError("patch_lengths needs frontend='blt'")
        reduce_mean = None
        if self._trainer is not None and self.trainer.world_size > 1:
            reduce_mean = lambda t: self.trainer.strategy.reduce(t, reduce_op="mean")  # noqa: E731
        return self.blt.patch_lengths(ids, update=update, reduce_mean=reduce_mean)

    def forward(self, ids: torch.Tensor, mix: torch.Tensor | None = None) -> torch.Tensor:
        """ids: (B, T) int64 -> next-byte logits (B, T, 260)."""
        return self.run(ids, mix=mix)[0]

    def expert_mix(self, task: torch.Tensor) -> torch.Tensor:
        """Data task indices (B,) -> one-hot expert weights (B, n_experts) (zeros where no expert applies)."""
        expert = self.task_to_expert[task]  # (B,)
        mix = F.one_hot(expert.clamp_min(0), len(self.svf_tasks)).float()
        return mix * (expert >= 0).unsqueeze(-1).float()

    def dispatch(self, ids: torch.Tensor) -> torch.Tensor:
        """The dispatcher's first pass: base model (no experts) hidden states -> expert logits (B, n_experts)."""
        with torch.no_grad():
            hidden = self.run(ids, mix=None)[1].hidden
        return self.dispatcher(hidden.detach(), ids != PAD_ID)

    def choose_mix(self, ids: torch.Tensor, task: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """SVF expert weights for a batch (``None`` when SVF is off) and the dispatcher logits (or ``None``)."""
        if not self.is_active("svf"):
            return None, None
        if self.dispatcher is None or (self.training and task is not None):
            logits = self.dispatch(ids) if self.dispatcher is not None else None
            if task is None:
                raise ValueError("svf_dispatch='oracle' needs task labels in the batch (a 'task' entry)")
            return self.expert_mix(task), logits
        logits = self.dispatch(ids)
        return self.dispatcher.mix(logits), logits

    @staticmethod
    def unpack(batch: torch.Tensor | dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        if isinstance(batch, torch.Tensor):
            return batch, None, None
        return batch["ids"], batch.get("answer_ids"), batch.get("task")

    def loss_terms(self, batch, record: bool = False) -> dict[str, Any]:
        """Forward a batch: weighted next-byte loss, per-byte nats, argmax correctness and memory stats."""
        ids, answer_ids, task = self.unpack(batch)
        x, y = ids[:, :-1], ids[:, 1:]
        if self.blt is not None:  # patch once per step (the dispatcher's first pass reuses the patches)
            self._patches = (x, self.patch_lengths(x, update=self.training and torch.is_grad_enabled()))
        mix, dispatch_logits = self.choose_mix(x, task)
        logits, out = self.run(x, mix=mix, record=record)
        nats = F.cross_entropy(rearrange(logits, "b t v -> b v t").float(), y, ignore_index=PAD_ID, reduction="none")
        valid = y != PAD_ID
        weight = valid.float()
        seg = answer_ids[:, 1:] if answer_ids is not None else None
        if seg is not None and self.hparams.answer_weight != 1.0:
            weight = torch.where(seg > 0, weight * self.hparams.answer_weight, weight)
        loss = (nats * weight).sum() / weight.sum().clamp_min(1.0)
        terms = {"loss": loss, "nats": nats, "valid": valid, "logits": logits, "seg": seg, "task": task, "out": out}
        if self._patches is not None:
            terms["patch_lengths"] = self._patches[1]
            self._patches = None
        if self.mvot is not None and self.is_active("mvot"):  # L_CE + lambda L_D (+ the decision head's BCE)
            m = self.mvot.losses(logits, out.hidden, y)
            hp = self.hparams
            terms["loss"] = loss + hp.mvot_lambda * m["loss_d"] + hp.decision_weight * m["decision_loss"]
            terms["mvot"] = m
        if dispatch_logits is not None and task is not None:
            target = self.task_to_expert[task]
            keep = target >= 0
            terms["dispatch_loss"] = F.cross_entropy(dispatch_logits[keep], target[keep]) if keep.any() else None
            terms["dispatch_acc"] = (dispatch_logits.argmax(-1) == target)[keep].float()
        return terms

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        terms = self.loss_terms(batch, record=self.is_active("titans"))
        loss = terms["loss"]
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/bpb", (terms["nats"] * terms["valid"]).sum() / terms["valid"].sum().clamp_min(1) / math.log(2))
        if terms.get("dispatch_loss") is not None:
            self.log("train/dispatch_loss", terms["dispatch_loss"])
            loss = loss + terms["dispatch_loss"]
        self.log_memory(terms["out"].stats)
        if "patch_lengths" in terms:
            lengths = terms["patch_lengths"]
            self.log("patch/mean_size", lengths.sum() / (lengths > 0).sum().clamp_min(1))
            self.log("patch/threshold", self.blt.threshold)
        if "mvot" in terms:
            m = terms["mvot"]
            self.log("train/loss_d", m["loss_d"])
            self.log("train/decision_loss", m["decision_loss"])
            self.log("train/visual_acc", m["visual_correct"] / m["visual_total"].clamp_min(1))
        return loss

    def log_memory(self, stats: list[MemoryStats], prefix: str = "memory") -> None:
        if not stats:
            return
        surprise = torch.stack([s.surprise.detach() for s in stats]).mean()
        util = torch.stack([b.memory.utilization() for b in self.model.memory_blocks()]).mean()
        self.log(f"{prefix}/surprise", surprise)
        self.log(f"{prefix}/utilization", util)

    def on_before_optimizer_step(self, optimizer) -> None:
        if self.is_active("svf") and self.hparams.svf_freeze_base:  # only z (and the dispatcher) train
            trainable = {id(layer.z) for layer in svf_layers(self.model)}
            if self.dispatcher is not None:
                trainable |= {id(p) for p in self.dispatcher.parameters()}
            for p in self.parameters():
                if id(p) not in trainable:
                    p.grad = None
        if self.is_active("svf") and self.hparams.svf_train_experts is not None:
            frozen = [i for i, t in enumerate(self.svf_tasks) if t not in self.hparams.svf_train_experts]
            for layer in svf_layers(self.model):
                if layer.z.grad is not None:
                    layer.z.grad[frozen] = 0.0

    # -- validation: loss, bpb, exact match per task type ----------------------------------------------------------

    def on_validation_epoch_start(self) -> None:
        n = len(TASK_TYPES)
        self._val = {
            "nats": torch.zeros((), dtype=torch.float64, device=self.device),
            "bytes": torch.zeros((), dtype=torch.float64, device=self.device),
            "correct": torch.zeros(n, dtype=torch.float64, device=self.device),
            "total": torch.zeros(n, dtype=torch.float64, device=self.device),
            "dispatch_ok": torch.zeros((), dtype=torch.float64, device=self.device),
            "dispatch_n": torch.zeros((), dtype=torch.float64, device=self.device),
        }

    def validation_step(self, batch, batch_idx: int) -> None:
        if not self._val:
            self.on_validation_epoch_start()
        terms = self.loss_terms(batch)
        v = self._val
        v["nats"] += (terms["nats"] * terms["valid"]).sum().double()
        v["bytes"] += terms["valid"].sum().double()
        if terms["seg"] is not None and terms["task"] is not None:
            correct, total = exact_match_counts(terms["logits"], batch["ids"][:, 1:], terms["seg"], terms["task"],
                                                len(TASK_TYPES))
            v["correct"] += correct
            v["total"] += total
        if "dispatch_acc" in terms:
            v["dispatch_ok"] += terms["dispatch_acc"].sum().double()
            v["dispatch_n"] += terms["dispatch_acc"].numel()
        if "mvot" in terms:
            m = terms["mvot"]
            n_visual = m["visual_total"].double()
            for key, value in (("visual_correct", m["visual_correct"].double()), ("visual_total", n_visual),
                               ("loss_d_sum", m["loss_d"].detach().double() * n_visual),
                               ("decision_correct", m["decision_correct"].double()),
                               ("decision_total", m["decision_total"].double())):
                v[key] = v.get(key, 0.0) + value

    def on_validation_epoch_end(self) -> None:
        v = self._val
        if not v or v["bytes"] == 0:
            return
        nats = v["nats"] / v["bytes"]
        self.log("val/loss", nats.float(), prog_bar=True)
        self.log("val/bpb", (nats / math.log(2)).float(), prog_bar=True)
        if v["total"].sum() > 0:
            self.log("val/exact_match", (v["correct"].sum() / v["total"].sum()).float())
            for i, name in enumerate(TASK_TYPES):
                if v["total"][i] > 0:
                    self.log(f"val/exact_match/{name}", (v["correct"][i] / v["total"][i]).float())
        if v["dispatch_n"] > 0:
            self.log("val/dispatch_acc", (v["dispatch_ok"] / v["dispatch_n"]).float())
        if "visual_total" in v and v["visual_total"] > 0:
            self.log("val/visual_acc", (v["visual_correct"] / v["visual_total"]).float())
            self.log("val/loss_d", (v["loss_d_sum"] / v["visual_total"]).float())
        if "decision_total" in v and v["decision_total"] > 0:
            self.log("val/decision_acc", (v["decision_correct"] / v["decision_total"]).float())
        self._val = {}

    def configure_optimizers(self):
        hp = self.hparams
        config = default_adamw(self, hp.learning_rate, hp.weight_decay, hp.warmup_steps, hp.min_lr_ratio)
        # z vectors are scales around 1: decaying them towards 0 would shrink every expert, trained or not
        z_ids = {id(layer.z) for layer in svf_layers(self.model)}
        decay, no_decay = config["optimizer"].param_groups
        no_decay["params"].extend(p for p in decay["params"] if id(p) in z_ids)
        decay["params"] = [p for p in decay["params"] if id(p) not in z_ids]
        return config

    # -- MemoryConsolidator ----------------------------------------------------------------------------------------

    def memory_snapshot(self) -> dict[str, torch.Tensor]:
        """High-surprise items of every memory block: ``keys`` (M, d), ``values`` (M, d), ``importance`` (M,),
        ``layer`` (M,) int64 (which memory block holds the item)."""
        snaps = [b.memory.snapshot() for b in self.model.memory_blocks()]
        if not snaps:
            return {"keys": torch.empty(0, 0), "values": torch.empty(0, 0), "importance": torch.empty(0),
                    "layer": torch.empty(0, dtype=torch.long)}
        layer = torch.cat([torch.full((len(s["importance"]),), j, dtype=torch.long) for j, s in enumerate(snaps)])
        return {
            "keys": torch.cat([s["keys"] for s in snaps]),
            "values": torch.cat([s["values"] for s in snaps]),
            "importance": torch.cat([s["importance"] for s in snaps]),
            "layer": layer.to(self.device),
        }

    def consolidation_loss(self, max_items: int | None = None) -> torch.Tensor | None:
        """Importance-weighted associative loss of the episodic items under the slow memory weights, averaged over
        memory blocks (differentiable; ``None`` when nothing is stored)."""
        losses = [b.memory.consolidation_loss(max_items) for b in self.model.memory_blocks()]
        losses = [loss for loss in losses if loss is not None]
        return torch.stack(losses).mean() if losses else None

    def consolidate(self, steps: int = 1, lr: float = 1e-2, max_items: int | None = 512) -> dict[str, float]:
        """Replay the episodic items into the slow memory weights: ``steps`` SGD steps of :meth:`consolidation_loss`
        on the memories' initial weights only. Returns the loss before and after and the item count."""
        if steps < 1:
            raise ValueError(f"steps={steps} must be >= 1")
        params = [w for b in self.model.memory_blocks() for w in b.memory.weights]
        items = float(sum(int((b.memory.episodic_importance > 0).sum()) for b in self.model.memory_blocks()))
        with torch.enable_grad():
            first = None
            for _ in range(steps):
                loss = self.consolidation_loss(max_items)
                if loss is None:
                    return {"consolidation_loss": 0.0, "consolidation_loss_after": 0.0, "items": 0.0}
                first = float(loss) if first is None else first
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                with torch.no_grad():
                    for p, g in zip(params, grads):
                        if g is not None:
                            p.sub_(lr * g)
            with torch.no_grad():
                after = self.consolidation_loss(max_items)
        return {"consolidation_loss": first, "consolidation_loss_after": float(after), "items": items}

    def reset_short_term(self) -> None:
        """Forget the episodic (short-term) buffers; fast weights are per call and never outlive it."""
        for block in self.model.memory_blocks():
            block.memory.clear_episodic()

    # -- generation (TextGenerator) --------------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(
        self,
        ids: torch.Tensor,
        max_new_bytes: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        stop_at_eos: bool = True,
        task: int | None = None,
    ) -> torch.Tensor:
        """Continue one prompt ``ids`` (T0,) by up to ``max_new_bytes`` ids -> the new ids (N,).

        The context beyond ``block_size`` is folded into the long-term memory in segments of ``block_size // 2``
        (with Titans active; otherwise it is dropped), and the live tail is re-read at every step (no KV cache: the
        memory-as-context attention needs the readouts). SVF experts come from the dispatcher, or ``task``.
        """
        with eval_mode(self):
            device = self.device
            seq = ids.to(device).reshape(-1)
            if len(seq) == 0:
                seq = torch.tensor([EOS_ID], device=device)
            mix = None
            if self.is_active("svf"):
                head = seq[None, -self.config.block_size :]
                mix = self.choose_mix(head, torch.tensor([task], device=device) if task is not None else None)[0]
            states, start = None, 0
            out: list[torch.Tensor] = []
            fold = max(1, self.config.block_size // 2)
            for _ in range(max_new_bytes):
                while len(seq) - start > self.config.block_size:  # fold the oldest half-block into the memory
                    segment = seq[None, start : start + fold]
                    states = self.run(segment, states, mix=mix)[1].states
                    states = [detach_state(s) for s in states]
                    start += fold
                logits = self.run(seq[None, start:], states, mix=mix)[0][0, -1, :VOCAB_SIZE]  # text only
                nxt = sample(logits, temperature, top_k, generator)
                out.append(nxt)
                seq = torch.cat([seq, nxt.view(1)])
                if stop_at_eos and int(nxt) == EOS_ID:
                    break
        return torch.stack(out) if out else torch.empty(0, dtype=torch.long, device=device)

    @torch.inference_mode()
    def generate_interleaved(
        self,
        ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        stop_at_eos: bool = True,
    ) -> torch.Tensor:
        """Continue prompts ``ids`` (B, T0) (or (T0,)) with interleaved text and images -> new ids (B, N).

        Needs the MVoT path. At a text position the visualization-decision head decides whether an image starts
        (BOI); otherwise a byte is sampled. Inside an image exactly ``h * w`` visual tokens are sampled (constrained
        to the visual range), then EOI is forced. Rows that ended (EOS) are padded with PAD. Long contexts are folded
        into the Titans memory as in :meth:`generate`. Decode the images with
        ``self.mvot.vocab.segments(row)`` and ``self.mvot.decode_images``.
        """
        if self.mvot is None:
            raise ValueError("generate_interleaved needs the MVoT path (mvot=True, vqvae_ckpt=...)")
        with eval_mode(self):
            vocab = self.mvot.vocab
            seq = ids.to(self.device).long()
            seq = seq[None] if seq.ndim == 1 else seq
            if seq.shape[1] == 0:
                seq = torch.full((seq.shape[0], 1), EOS_ID, dtype=torch.long, device=self.device)
            count = image_counts(seq, vocab)  # (B,) codes written in the open image, or NO_IMAGE
            done = torch.zeros(seq.shape[0], dtype=torch.bool, device=self.device)
            states, start, out = None, 0, []
            fold = max(1, self.config.block_size // 2)
            for _ in range(max_new_tokens):
                while seq.shape[1] - start > self.config.block_size:  # fold the oldest half-block into the memory
                    states = [detach_state(s) for s in self.run(seq[:, start : start + fold], states)[1].states]
                    start += fold
                logits, backbone = self.run(seq[:, start:], states)
                if self.is_active("mvot"):
                    decide = self.mvot.decision(backbone.hidden[:, -1]).squeeze(-1) > 0  # (B,)
                else:
                    decide = torch.zeros_like(done)
                logits = constrain_logits(logits[:, -1].float(), count, decide, vocab)  # (B, V)
                nxt = sample(logits, temperature, top_k, generator)
                nxt = torch.where(done, torch.full_like(nxt, PAD_ID), nxt)
                out.append(nxt)
                count = advance(count, nxt, vocab)
                seq = torch.cat([seq, nxt[:, None]], dim=1)
                if stop_at_eos:
                    done = done | ((nxt == EOS_ID) & (count == NO_IMAGE))
                    if bool(done.all()):
                        break
        return torch.stack(out, dim=1) if out else seq.new_empty(seq.shape[0], 0)


def load_entropy_model(path: str | None) -> nn.Module:
    """The frozen entropy model of BLT entropy patching: a ByteLM checkpoint's transformer, in eval mode, no grads."""
    from neat_lightning.modules.byte_lm import ByteLM

    hint = ("train one with `neat fit --config configs/blt_entropy_model.yaml` (or the small "
            "configs/byte_lm_quickstart.yaml) first, or use blt_config.patching: static / space")
    if path is None:
        raise ValueError(f"frontend='blt' with entropy patching needs entropy_model_ckpt: a ByteLM checkpoint; {hint}")
    return load_frozen(ByteLM, path, "entropy_model_ckpt", hint).model


def load_frozen_vqvae(path: str, visual_vocab_size: int) -> torch.nn.Module:
    """The VQ-VAE of ``vqvae_ckpt``, frozen, on CPU; its codebook must have ``visual_vocab_size`` codes."""
    from neat_lightning.modules.vqvae import VQVAE

    vqvae = load_frozen(VQVAE, path, f"vqvae_ckpt={path!r}")
    codebook = tuple(vqvae.codebook.shape)
    if codebook[0] != visual_vocab_size:
        raise ValueError(
            f"vqvae_ckpt={path!r}: the VQVAE codebook has shape (codebook_size, embed_dim) = {codebook}, but this "
            f"NeatModel is configured for visual_vocab_size={visual_vocab_size}, i.e. a codebook of shape "
            f"({visual_vocab_size}, {codebook[1]}); set visual_vocab_size={codebook[0]} or use another VQVAE"
        )
    return vqvae


def exact_match_counts(
    logits: torch.Tensor, targets: torch.Tensor, seg: torch.Tensor, task: torch.Tensor, n_tasks: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy-equivalent exact match of every completion, counted per task type.

    Args:
        logits: (B, T, V) next-byte logits.
        targets: (B, T) target ids.
        seg: (B, T) completion index of each target (``k >= 1``), 0 elsewhere.
        task: (B,) task type of each row.
        n_tasks: number of task types.

    Returns:
        correct (n_tasks,) and total (n_tasks,) completion counts, float64.
    """
    b, t = seg.shape
    n_seg = int(seg.max()) + 1 if seg.numel() else 1
    ok = (logits.argmax(dim=-1) == targets) | (seg == 0)
    gid = (torch.arange(b, device=seg.device)[:, None] * n_seg + seg).reshape(-1)  # (B·T,) unique per completion
    all_ok = torch.ones(b * n_seg, dtype=torch.long, device=seg.device)
    all_ok = all_ok.scatter_reduce(0, gid, ok.reshape(-1).long(), reduce="amin")
    present = torch.zeros(b * n_seg, dtype=torch.bool, device=seg.device)
    present[gid[seg.reshape(-1) > 0]] = True
    row_task = task.repeat_interleave(n_seg)
    correct = torch.zeros(n_tasks, dtype=torch.float64, device=seg.device)
    total = torch.zeros(n_tasks, dtype=torch.float64, device=seg.device)
    correct.index_add_(0, row_task[present], all_ok[present].double())
    total.index_add_(0, row_task[present], torch.ones_like(all_ok[present], dtype=torch.float64))
    return correct, total
