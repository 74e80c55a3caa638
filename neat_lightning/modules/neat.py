"""NeatModel: the unified byte model of Project NEAT — a byte transformer with switchable components.

Components (each an exact bypass when switched off, :class:`~neat_lightning.protocols.ComponentSwitchable`):

* ``titans`` — Titans neural long-term memory as context in chosen blocks (:mod:`neat_lightning.components.titans`),
  with persistent tokens and sliding-window attention for short-term context;
* ``svf`` — Transformer² singular-value fine-tuning experts over the block linears, one per task type, picked or
  mixed by a dispatcher from a first pass (:mod:`neat_lightning.components.svf`);
* ``mvot`` — MVoT visual tokens: a frozen VQ-VAE's codes in their own id range after the 260 byte ids, the token
  discrepancy loss L_D, a visualization-decision head and interleaved text + image generation
  (:mod:`neat_lightning.components.mvot`, ``docs/mvot.md``).

The backbone (:class:`~neat_lightning.components.neat_backbone.NeatBackbone`) is a plain ``nn.Module`` that runs
over any (B, T, C) embeddings — byte embeddings, or patch embeddings when the BLT processor plugs in — and holds the
episodic memory that sleep-wake consolidation replays. One batch through :meth:`NeatModel.loss_terms` gives a
:class:`~neat_lightning.modules.neat_output.NeatOutput`; with the BLT front end its patch lengths are computed once
per step and passed explicitly to every forward of that step.

The module implements ``TextGenerator`` (``generate_text``), ``MemoryConsolidator`` and ``MemoryPrunable`` (an
episodic buffer of training windows replayed through the whole model in sleep, :mod:`neat_lightning.modules.replay`)
and ``ComponentSwitchable``. Which components are active
is written to checkpoints (``"neat_components"``) and replayed before the weights load, so
``NeatModel.load_from_checkpoint(path)`` alone rebuilds it; SVF's decomposition and ``z`` vectors are buffers and
parameters of the state dict.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any, Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from neat_lightning.choices import check_choice
from neat_lightning.codec import PAD_ID, VOCAB_SIZE, VisualVocab
from neat_lightning.components.blt import BLTConfig, BLTProcessor
from neat_lightning.components.episodic_buffer import EpisodicConfig
from neat_lightning.components.mvot import MVoTPath
from neat_lightning.components.neat_backbone import BackboneOutput, NeatBackbone
from neat_lightning.components.svf import TaskDispatcher, inject_svf, svf_layers, svf_mixture
from neat_lightning.components.titans import MemoryState, MemoryStats, TitansConfig
from neat_lightning.components.transformer import TransformerConfig
from neat_lightning.data.math import TASK_TYPES
from neat_lightning.modules.base import ResumableModule, load_frozen
from neat_lightning.modules.neat_config import MVoTConfig, SVFConfig, upgrade_hparams_from_format_1
from neat_lightning.modules.neat_generation import NeatGenerationMixin
from neat_lightning.modules.neat_output import NeatOutput, NeatValidationMetrics
from neat_lightning.modules.optim import default_adamw
from neat_lightning.modules.replay import ConsolidationMixin, ReplayTerms, episodic_config
from neat_lightning.protocols import ReplayPlan
from neat_lightning.modules.vqvae import check_tokenizer_matches

Frontend = Literal["bytes", "blt"]
COMPONENTS_KEY = "neat_components"
COMPONENT_NAMES = ("titans", "svf", "mvot")


def typed(value: Any, cls: type, field: str) -> Any:
    """``value`` as a ``cls`` config: checkpoints store config groups as plain dicts."""
    if isinstance(value, dict):
        value = cls(**value)
    if not isinstance(value, cls):
        raise TypeError(f"{field} must be a {cls.__name__}, got {type(value).__name__}")
    return value


class NeatModel(NeatGenerationMixin, ConsolidationMixin, ResumableModule):
    """Byte transformer with switchable Titans memory, Transformer² SVF experts and MVoT visual tokens.

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
        blt_config: the BLT local models, hash n-gram embeddings and patching (``blt_config.patcher``; adaptive
            entropy threshold by default, its state saved in the checkpoint).
        entropy_model_ckpt: ByteLM checkpoint of the frozen entropy model (``frontend="blt"``, entropy patching).
        titans: build the Titans memory component.
        memory_layers: indices of blocks with memory as context; ``None`` for the last block.
        titans_config: memory settings (defaults: persistent 128, memory 2048, surprise threshold 0.5).
        svf: build the SVF component (experts over the block linears matched by ``svf_config.targets``).
        svf_config: the SVF experts, their dispatch and what trains while SVF is active (:class:`SVFConfig`).
        active_components: components active from the start (others wait for ``set_component_active`` /
            the ComponentSchedule callback).
        answer_weight: loss weight of completion bytes (solution + answer) relative to other bytes.
        mvot: build the MVoT visual-token path (:mod:`neat_lightning.components.mvot`): ids 260 / 261 mark the
            begin / end of an image, ids 262.. are the codes of the frozen VQ-VAE, a decision head predicts when to
            start an image, and ``discrepancy_weight * L_D`` (token discrepancy loss) is added on visual positions.
            Switched off (``set_component_active``), L_D and the decision loss are skipped and generation writes
            text only.
        mvot_config: the VQ-VAE checkpoint, visual vocabulary, image size and loss weights (:class:`MVoTConfig`).
        episodic: the buffer of training windows that sleep replays (:class:`EpisodicConfig`; filled only while a
            callback such as SleepWakeConsolidation plans the steps).
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
        frontend: Frontend = "bytes",
        blt_config: BLTConfig = BLTConfig(),
        entropy_model_ckpt: str | None = None,
        titans: bool = True,
        memory_layers: list[int] | None = None,
        titans_config: TitansConfig = TitansConfig(),
        svf: bool = True,
        svf_config: SVFConfig = SVFConfig(),
        active_components: list[str] = ["titans"],
        answer_weight: float = 1.0,
        mvot: bool = False,
        mvot_config: MVoTConfig = MVoTConfig(),
        episodic: EpisodicConfig = EpisodicConfig(),
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
        if answer_weight <= 0:
            raise ValueError(f"answer_weight={answer_weight} must be > 0")
        titans_config = typed(titans_config, TitansConfig, "titans_config")
        blt_config = typed(blt_config, BLTConfig, "blt_config")
        svf_config = typed(svf_config, SVFConfig, "svf_config")
        mvot_config = typed(mvot_config, MVoTConfig, "mvot_config")
        episodic = episodic_config(episodic)
        if episodic.surprise == "titans" and not titans:
            raise ValueError("episodic.surprise='titans' needs the Titans memory (titans=True); use 'loss'")
        if mvot and mvot_config.vqvae_ckpt is None:
            raise ValueError(
                "mvot=True needs mvot_config.vqvae_ckpt: the path of a trained VQVAE checkpoint (modules.VQVAE)"
            )
        built = [n for n, on in (("titans", titans), ("svf", svf), ("mvot", mvot)) if on]
        for name in active_components:
            if name not in built:
                raise ValueError(f"active_components: {name!r} is not a built component; built: {built}")
        check_choice("frontend", frontend, Frontend)
        # mvot with BLT entropy patching: BLTProcessor.patch_lengths hides ids >= 260 from the 260-id entropy ByteLM
        # (PAD in their place) and makes each of them a patch of its own (components/blt.py, tested there)
        groups = {"titans_config": titans_config, "blt_config": blt_config, "svf_config": svf_config,
                  "mvot_config": mvot_config, "episodic": episodic}
        self.save_hyperparameters(ignore=list(groups))
        for name, group in groups.items():  # plain values: checkpoints load with weights_only=True
            self.hparams[name] = asdict(group)
        self.svf_config, self.mvot_config = svf_config, mvot_config
        self.config = TransformerConfig(
            vocab_size=VOCAB_SIZE + 2 + mvot_config.visual_vocab_size if mvot else VOCAB_SIZE,  # BOI, EOI, K codes
            dim=dim, n_layers=n_layers, heads=heads, block_size=block_size, window=window,
            mlp_hidden=mlp_hidden, dropout=dropout, tie_weights=True, rope_base=rope_base,
        )
        layers = list(memory_layers) if memory_layers is not None else [n_layers - 1]
        self.model = NeatBackbone(self.config, titans_config if titans else None, layers)
        self.components: tuple[str, ...] = tuple(built)
        self.svf_tasks = tuple(svf_config.tasks) if svf else ()
        self.svf_names: list[str] = []
        self.dispatcher: TaskDispatcher | None = None
        if svf:
            c = svf_config
            self.svf_names = inject_svf(self.model, c.targets, len(c.tasks), c.rank, c.method)
            if c.dispatch != "oracle":
                self.dispatcher = TaskDispatcher(dim, len(c.tasks), c.dispatch, c.dispatch_prefix)
        # data task index -> expert index (-1: no expert, base model)
        general = self.svf_tasks.index("general") if "general" in self.svf_tasks else -1
        expert = [self.svf_tasks.index(t) if t in self.svf_tasks else general for t in TASK_TYPES]
        self.register_buffer("task_to_expert", torch.tensor(expert, dtype=torch.long), persistent=False)
        self.mvot: MVoTPath | None = None
        if mvot:
            with torch.random.fork_rng(devices=[]):  # building the VQ-VAE must not shift anyone's random stream
                vqvae = load_frozen_vqvae(mvot_config.vqvae_ckpt, mvot_config.visual_vocab_size)
            self.mvot = MVoTPath(vqvae, dim, vqvae.grid_shape(mvot_config.image_size))
        # BLT front end (components/blt.py): bytes -> patches -> this backbone -> bytes; built last, so the byte
        # path (frontend='bytes') draws exactly the random numbers it always did
        self.blt: BLTProcessor | None = None
        if frontend == "blt":
            needs_lm = blt_config.patcher.mode == "entropy"
            entropy_model = load_entropy_model(entropy_model_ckpt) if needs_lm else None
            self.blt = BLTProcessor(blt_config, self.config.vocab_size, dim, dropout, rope_base, entropy_model)
            self.model.embed, self.model.head = None, None  # bytes enter and leave through the BLT local models
        self.active: set[str] = set()
        for name in built:
            self.set_component_active(name, name in active_components)
        self.val_metrics = NeatValidationMetrics(TASK_TYPES)
        self.init_consolidation(episodic)

    @classmethod
    def upgrade_format(cls, checkpoint: dict[str, Any], found: int) -> list[str]:
        """Format 1 -> 2: the flat ``svf_*`` / ``mvot_*`` hyperparameters become ``svf_config`` / ``mvot_config``
        (``mvot_lambda`` is ``mvot_config.discrepancy_weight``) and ``blt_config``'s patching fields
        (``patching``, ``threshold``, ``max_patch_length``, ``patch_size``, ``entropy_batch_windows``) become
        ``blt_config.patcher`` (``mode``, ..., ``batch_windows``). State-dict keys are unchanged."""
        changes = super().upgrade_format(checkpoint, found)
        if found < 2:
            changes += upgrade_hparams_from_format_1(checkpoint.setdefault("hyper_parameters", {}))
        return changes

    def setup(self, stage: str) -> None:
        """With the MVoT path, a DataModule that names its image-token layout (``vocab``, e.g.
        ``MultimodalDataModule``) must write the image ids this model reads (same codebook size and code grid)."""
        data = self.trainer.datamodule if self._trainer is not None else None
        vocab = getattr(data, "vocab", None)
        if self.mvot is not None and isinstance(vocab, VisualVocab):
            check_tokenizer_matches(self.mvot.vocab, vocab)

    # -- components (ComponentSwitchable) --------------------------------------------------------------------------

    def component_names(self) -> tuple[str, ...]:
        """The components this model was built with (``titans``, ``svf``, ``mvot``)."""
        return self.components

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
        lengths: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, BackboneOutput]:
        """ids (B, T) -> logits (B, T, V) and the backbone output.

        Args:
            ids: (B, T) int64 ids.
            states: memory states of a previous segment (one per memory block).
            mix: (B, n_experts) SVF expert weights; ``None`` for the base model.
            record: let the memory blocks store high-surprise items.
            start_pos: RoPE position of ``ids[:, 0]`` (byte front end).
            lengths: (B, P) BLT patch lengths of ``ids`` (BLT front end); ``None`` patches here, without updating
                the adaptive threshold.
        """
        if self.blt is not None:
            return self.run_blt(ids, states, mix, record, lengths)
        with svf_mixture(svf_layers(self.model), mix if self.is_active("svf") else None):
            out = self.model.forward_hidden(self.model.embed(ids), start_pos, states, record)
        return self.model.head(out.hidden), out

    def run_blt(
        self,
        ids: torch.Tensor,
        states: Sequence[MemoryState | None] | None = None,
        mix: torch.Tensor | None = None,
        record: bool = False,
        lengths: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, BackboneOutput]:
        """BLT front end: ids (B, T) (patched as ``lengths`` (B, P), or here when ``None``) -> logits (B, T, V) and
        the backbone output over patches, whose ``hidden`` is brought back to bytes (B, T, C): each byte gets the
        latent output its decoder reads last (its own patch's summary of the patches before it), so byte-level
        heads (SVF dispatcher, MVoT decision) see causal states."""
        outs: list[BackboneOutput] = []

        def latent(x: torch.Tensor) -> torch.Tensor:  # (B, P, C) patch embeddings -> (B, P, C)
            outs.append(self.model.forward_hidden(x, 0, states, record))
            return outs[-1].hidden

        with svf_mixture(svf_layers(self.model), mix if self.is_active("svf") else None):
            res = self.blt(ids, latent, lengths)
        out = outs[0]
        hidden = torch.gather(out.hidden, 1, res.patch_ids[..., None].expand(-1, -1, out.hidden.shape[-1]))
        return res.logits, BackboneOutput(hidden, out.states, out.stats)

    def patch_lengths(self, ids: torch.Tensor, update: bool = False) -> torch.Tensor:
        """BLT patches of ids (B, T) -> (B, P) lengths; ``update`` lets the adaptive threshold observe the batch
        (averaged over DDP ranks, so every rank keeps the same threshold)."""
        if self.blt is None:
            raise ValueError("patch_lengths needs frontend='blt'")
        reduce_mean = None
        if self._trainer is not None and self.trainer.world_size > 1:
            reduce_mean = lambda t: self.trainer.strategy.reduce(t, reduce_op="mean")
        return self.blt.patch_lengths(ids, update=update, reduce_mean=reduce_mean)

    def forward(self, ids: torch.Tensor, mix: torch.Tensor | None = None) -> torch.Tensor:
        """ids: (B, T) int64 -> next-byte logits (B, T, V)."""
        return self.run(ids, mix=mix)[0]

    def expert_mix(self, task: torch.Tensor) -> torch.Tensor:
        """Data task indices (B,) -> one-hot expert weights (B, n_experts) (zeros where no expert applies)."""
        expert = self.task_to_expert[task]  # (B,)
        mix = F.one_hot(expert.clamp_min(0), len(self.svf_tasks)).float()
        return mix * (expert >= 0).unsqueeze(-1).float()

    def dispatch(self, ids: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """The dispatcher's first pass: base model (no experts) hidden states -> expert logits (B, n_experts).
        ``lengths``: the BLT patch lengths of ``ids``, when already computed."""
        with torch.no_grad():
            hidden = self.run(ids, mix=None, lengths=lengths)[1].hidden
        return self.dispatcher(hidden.detach(), ids != PAD_ID)

    def choose_mix(
        self, ids: torch.Tensor, task: torch.Tensor | None, lengths: torch.Tensor | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """SVF expert weights for a batch (``None`` when SVF is off) and the dispatcher logits (or ``None``)."""
        if not self.is_active("svf"):
            return None, None
        if self.dispatcher is None or (self.training and task is not None):
            logits = self.dispatch(ids, lengths) if self.dispatcher is not None else None
            if task is None:
                raise ValueError("svf_config.dispatch='oracle' needs task labels in the batch (a 'task' entry)")
            return self.expert_mix(task), logits
        logits = self.dispatch(ids, lengths)
        return self.dispatcher.mix(logits), logits

    @staticmethod
    def unpack(batch: torch.Tensor | dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        if isinstance(batch, torch.Tensor):
            return batch, None, None
        return batch["ids"], batch.get("answer_ids"), batch.get("task")

    def loss_terms(self, batch, record: bool = False) -> NeatOutput:
        """Forward a batch: weighted next-byte loss, per-byte nats, logits, memory stats and the components' terms.

        With the BLT front end the batch is patched once (a training step lets the adaptive threshold observe it)
        and those lengths serve both the dispatcher's first pass and the forward.
        """
        ids, answer_ids, task = self.unpack(batch)
        x, y = ids[:, :-1], ids[:, 1:]
        lengths = None
        if self.blt is not None:
            lengths = self.patch_lengths(x, update=self.training and torch.is_grad_enabled())
        mix, dispatch_logits = self.choose_mix(x, task, lengths)
        logits, out = self.run(x, mix=mix, record=record, lengths=lengths)
        nats = F.cross_entropy(rearrange(logits, "b t v -> b v t").float(), y, ignore_index=PAD_ID, reduction="none")
        valid = y != PAD_ID
        weight = valid.float()
        seg = answer_ids[:, 1:] if answer_ids is not None else None
        if seg is not None and self.hparams.answer_weight != 1.0:
            weight = torch.where(seg > 0, weight * self.hparams.answer_weight, weight)
        loss = (nats * weight).sum() / weight.sum().clamp_min(1.0)
        mvot_terms = None
        if self.mvot is not None and self.is_active("mvot"):  # L_CE + lambda L_D (+ the decision head's BCE)
            mvot_terms = self.mvot.losses(logits, out.hidden, y)
            c = self.mvot_config
            loss = loss + c.discrepancy_weight * mvot_terms.loss_d + c.decision_weight * mvot_terms.decision_loss
        dispatch_loss = dispatch_acc = None
        if dispatch_logits is not None and task is not None:
            target = self.task_to_expert[task]
            keep = target >= 0
            dispatch_loss = F.cross_entropy(dispatch_logits[keep], target[keep]) if keep.any() else None
            dispatch_acc = (dispatch_logits.argmax(-1) == target)[keep].float()
        return NeatOutput(loss, nats, valid, logits, seg, task, out, lengths, mvot_terms, dispatch_loss, dispatch_acc)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        plan = self.take_plan()  # set by a MemoryConsolidator callback; None: an ordinary step
        if plan is not None and plan.sleep:
            return self.sleep_step(plan)  # the data's batch is not used
        if plan is None:
            out = self.loss_terms(batch, record=self.is_active("titans"))
        else:
            rows, slots = self.wake_rows(batch, plan)
            terms = self.replay_terms(rows, record=self.is_active("titans"))
            self.remember(rows, terms, slots)
            out = terms.output
        loss = out.loss
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/bpb", (out.nats * out.valid).sum() / out.valid.sum().clamp_min(1) / math.log(2))
        if out.dispatch_loss is not None:
            self.log("train/dispatch_loss", out.dispatch_loss)
            loss = loss + out.dispatch_loss
        self.log_memory(out.backbone.stats)
        if out.patch_lengths is not None:
            lengths = out.patch_lengths
            self.log("patch/mean_size", lengths.sum() / (lengths > 0).sum().clamp_min(1))
            self.log("patch/threshold", self.blt.threshold)
        if out.mvot is not None:
            m = out.mvot
            self.log("train/loss_d", m.loss_d)
            self.log("train/decision_loss", m.decision_loss)
            self.log("train/visual_acc", m.visual_correct / m.visual_total.clamp_min(1))
        return loss

    def log_memory(self, stats: list[MemoryStats], prefix: str = "memory") -> None:
        if not stats:
            return
        surprise = torch.stack([s.surprise.detach() for s in stats]).mean()
        util = torch.stack([b.memory.utilization() for b in self.model.memory_blocks()]).mean()
        self.log(f"{prefix}/surprise", surprise)
        self.log(f"{prefix}/utilization", util)

    def on_before_optimizer_step(self, optimizer) -> None:
        c = self.svf_config
        if self.is_active("svf") and c.freeze_base:  # only z (and the dispatcher) train
            trainable = {id(layer.z) for layer in svf_layers(self.model)}
            if self.dispatcher is not None:
                trainable |= {id(p) for p in self.dispatcher.parameters()}
            for p in self.parameters():
                if id(p) not in trainable:
                    p.grad = None
        if self.is_active("svf") and c.train_experts is not None:
            frozen = [i for i, t in enumerate(self.svf_tasks) if t not in c.train_experts]
            for layer in svf_layers(self.model):
                if layer.z.grad is not None:
                    layer.z.grad[frozen] = 0.0

    # -- validation: loss, bpb, exact match per task type (torchmetrics sums over steps and ranks) -----------------

    def on_validation_epoch_start(self) -> None:
        for metric in self.val_metrics.children():
            metric.reset()

    def validation_step(self, batch, batch_idx: int) -> None:
        out = self.loss_terms(batch)
        self.val_metrics.update(out, self.unpack(batch)[0][:, 1:])

    def on_validation_epoch_end(self) -> None:
        for name, value in self.val_metrics.results().items():
            self.log(name, value, prog_bar=name in ("val/loss", "val/bpb"))

    def configure_optimizers(self):
        hp = self.hparams
        config = default_adamw(self, hp.learning_rate, hp.weight_decay, hp.warmup_steps, hp.min_lr_ratio)
        # z vectors are scales around 1: decaying them towards 0 would shrink every expert, trained or not
        z_ids = {id(layer.z) for layer in svf_layers(self.model)}
        decay, no_decay = config["optimizer"].param_groups
        no_decay["params"].extend(p for p in decay["params"] if id(p) in z_ids)
        decay["params"] = [p for p in decay["params"] if id(p) not in z_ids]
        return config

    # -- MemoryConsolidator, MemoryPrunable: replay of stored windows (modules/replay.py) ---------------------------

    def replay_terms(self, rows: dict[str, torch.Tensor], record: bool = False) -> ReplayTerms:
        """Rows (``ids`` (B, T + 1), optionally ``answer_ids``, ``task``) -> the step loss (with the dispatcher's),
        the per-window loss weighted as the loss is (completion bytes ``answer_weight``), the Titans surprise per
        window and the SVF mix the distillation teacher must use."""
        out = self.loss_terms(rows, record=record)
        weight = out.valid.float()
        if out.seg is not None and self.hparams.answer_weight != 1.0:
            weight = torch.where(out.seg > 0, weight * self.hparams.answer_weight, weight)
        row_loss = (out.nats * weight).sum(1) / weight.sum(1).clamp_min(1.0)  # (B,)
        loss = out.loss + out.dispatch_loss if out.dispatch_loss is not None else out.loss
        stats = out.backbone.stats
        surprise = torch.stack([s.token_surprise.mean(1) for s in stats]).mean(0).detach() if stats else None
        task = rows.get("task")
        kwargs = {"mix": self.expert_mix(task)} if self.is_active("svf") and task is not None else {}
        ids = rows["ids"]
        return ReplayTerms(loss, row_loss, out.logits, out.valid, ids[:, :-1], ids[:, 1:], kwargs, surprise, out)

    def sleep_memory_loss(self, plan: ReplayPlan) -> torch.Tensor | None:
        """Titans slow-memory consolidation: the importance-weighted associative loss of each memory block's
        ``plan.memory_items`` most important items under the slow memory weights (None without items)."""
        return self.model.consolidation_loss(plan.memory_items) if self.is_active("titans") else None

    def prune_short_term(self, fraction: float) -> int:
        return self.model.prune_memory(fraction)

    def forget_short_term(self) -> None:
        self.model.reset_short_term()

    # -- the Titans memory's associative items (the backbone's episodic items) -------------------------------------

    def memory_items(self) -> dict[str, torch.Tensor]:
        """High-surprise associative items of every memory block: ``keys`` (M, d), ``values`` (M, d),
        ``importance`` (M,), ``layer`` (M,) int64 (which memory block holds the item)."""
        return self.model.memory_snapshot()

    def consolidation_loss(
        self, max_items: int | None = None, items: dict[str, torch.Tensor] | None = None
    ) -> torch.Tensor | None:
        """Importance-weighted associative loss of the memory items under the slow memory weights, averaged over
        memory blocks (differentiable; ``None`` when nothing is stored). See :meth:`NeatBackbone.consolidation_loss`."""
        return self.model.consolidation_loss(max_items, items)

    def consolidate_memory(
        self, steps: int = 1, lr: float = 1e-2, max_items: int | None = 512,
        items: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, float]:
        """Fit the slow memory weights to the memory items in place: ``steps`` SGD steps of
        :meth:`consolidation_loss` (each block's ``max_items`` most important items, or the replay set ``items`` in
        :meth:`memory_items`' layout). Returns the loss before and after and the item count. A sleep step uses the
        same loss as a term of its optimizer step instead (``ReplayPlan.memory_weight``), which DDP all-reduces."""
        return self.model.consolidate(steps, lr, max_items, items)


def load_entropy_model(path: str | None) -> nn.Module:
    """The frozen entropy model of BLT entropy patching: a ByteLM checkpoint's transformer, in eval mode, no grads."""
    from neat_lightning.modules.byte_lm import ByteLM

    hint = ("train one with `neat fit --config configs/blt_entropy_model.yaml` (or the small "
            "configs/byte_lm_quickstart.yaml) first, or use blt_config.patcher.mode: static / space")
    if path is None:
        raise ValueError(f"frontend='blt' with entropy patching needs entropy_model_ckpt: a ByteLM checkpoint; {hint}")
    return load_frozen(ByteLM, path, "entropy_model_ckpt", hint).model


def load_frozen_vqvae(path: str, visual_vocab_size: int) -> torch.nn.Module:
    """The VQ-VAE of ``mvot_config.vqvae_ckpt``, frozen, on CPU; its codebook must have ``visual_vocab_size`` codes."""
    from neat_lightning.modules.vqvae import VQVAE

    vqvae = load_frozen(VQVAE, path, f"mvot_config.vqvae_ckpt={path!r}")
    codebook = tuple(vqvae.codebook.shape)
    if codebook[0] != visual_vocab_size:
        raise ValueError(
            f"mvot_config.vqvae_ckpt={path!r}: the VQVAE codebook has shape (codebook_size, embed_dim) = {codebook}, "
            f"but this NeatModel is configured for mvot_config.visual_vocab_size={visual_vocab_size}, i.e. a codebook "
            f"of shape ({visual_vocab_size}, {codebook[1]}); set mvot_config.visual_vocab_size={codebook[0]} or use "
            "another VQVAE"
        )
    return vqvae
