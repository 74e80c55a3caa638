"""LatticeNetwork: question bytes → input face of a 3D cellular lattice → output face → answer bytes.

The lattice (:mod:`neat_lightning.components.lattice`) runs ``steps`` updates of one shared local rule; its plastic
connection weights (D, H, W, 26) live in :class:`~neat_lightning.components.lattice_state.LatticeState` (``cells``)
and change only by the plasticity rules between optimiser steps, under the active profile (the ``Plastic`` protocol,
driven by :class:`~neat_lightning.callbacks.PlasticityStages`). Gradients train the encoder, the rule and the
decoder (:mod:`neat_lightning.components.lattice_faces`) with answer-byte cross-entropy (+ an optional cluster
coordination term).

Configuration comes in typed groups: ``lattice`` (:class:`LatticeConfig`: size, channels, steps, perception),
``text`` (:class:`FaceTextConfig`: encoder and decoder), ``plasticity`` (:class:`PlasticityConfig`), ``clustering``
(:class:`ClusteringConfig`), ``energy_flow`` (:class:`EnergyFlowConfig`, used by ``mode="energy_flow"``) and
``optim`` (:class:`LatticeOptimConfig`). Checkpoints store each group as a dict of plain values.

Structure that survives checkpoints: the lattice size and the current profile / clustering switch are recorded as
the structural entry ``"lattice"`` (see :class:`~neat_lightning.modules.base.ResumableModule`) and replayed by
:meth:`LatticeNetwork.restore_structure` before the weights load — a lattice grown during training is rebuilt at its
grown size; pruning masks, cluster ids, centroids, STDP traces and BCM thresholds are buffers in the state dict.

Logged: ``train/loss``, ``val/loss``, ``val/exact_match``, ``lattice/activity`` (fraction of cells above the
profile's activity threshold), ``lattice/emergence`` (normalised spectral entropy of the activity field),
``lattice/wavelength``, ``lattice/clusters``, ``lattice/sparsity``.

``use_lattice=False`` is the no-lattice baseline: the input face goes through a per-cell MLP with the rule's
parameter count straight to the decoder.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import torch
import torch.nn.functional as F
from einops import rearrange
from torchmetrics import MeanMetric

from neat_lightning.choices import check_choice
from neat_lightning.codec import BOS_ID, EOS_ID, PAD_ID, decode, encode
from neat_lightning.components import memory_budget
from neat_lightning.components.clustering import ClusteringConfig
from neat_lightning.components.energy_flow import EnergyFlow, EnergyFlowConfig
from neat_lightning.components.lattice import LatticeConfig, LatticeRule, run_lattice
from neat_lightning.components.lattice_faces import (
    FaceDecoder,
    FaceEncoder,
    FaceTextConfig,
    PointwiseAdapter,
    resample_face,
)
from neat_lightning.components.lattice_state import LatticeState
from neat_lightning.components.optim import decay_groups
from neat_lightning.components.plasticity import PlasticityConfig
from neat_lightning.components.sampling import eval_mode, sample
from neat_lightning.modules.base import STRUCTURE_KEY, ResumableModule, upgrade_checkpoint
from neat_lightning.modules.optim import default_adamw
from neat_lightning.modules.plastic import PlasticLattice
from neat_lightning.protocols import GrownParameter

log = logging.getLogger(__name__)

STRUCTURE_NAME = "lattice"
LatticeMode = Literal["nca", "energy_flow"]
# hyperparameters a checkpoint must agree on (checked on load; the error names the field), dotted into groups
MODE_FIELDS = ("use_lattice", "mode", "energy_flow.carriers", "energy_flow.carrier_dim", "energy_flow.memory")


@dataclass(frozen=True)
class LatticeOptimConfig:
    """The default optimizer (AdamW, linear warm-up then cosine decay), used when the CLI sets no ``optimizer:``."""

    learning_rate: float = 3e-3  # peak learning rate
    # the lattice rule's learning rate as a fraction of learning_rate: the rule is applied `steps` times in a row,
    # and a small scale keeps a transport-initialised rule close to a copy
    rule_lr_scale: float = 1.0
    weight_decay: float = 0.05  # on matrices
    warmup_steps: int = 50  # linear warm-up, then cosine decay to min_lr_ratio * learning_rate
    min_lr_ratio: float = 0.1  # final learning rate as a fraction of the peak

    def __post_init__(self) -> None:
        if self.rule_lr_scale < 0:
            raise ValueError(f"rule_lr_scale={self.rule_lr_scale} must be >= 0")


# the groups of LatticeNetwork's arguments, and where each flat argument of checkpoint format 1 went
GROUPS: dict[str, type] = {
    "lattice": LatticeConfig, "text": FaceTextConfig, "plasticity": PlasticityConfig,
    "clustering": ClusteringConfig, "energy_flow": EnergyFlowConfig, "optim": LatticeOptimConfig,
}
FLAT_FIELDS: dict[str, tuple[str, str]] = {
    **{f: ("lattice", f) for f in ("depth", "height", "width", "channels", "hidden", "steps", "fire_rate",
                                   "perception", "alive_threshold", "depth_taps", "rule_init", "stencil",
                                   "checkpoint_every")},
    "carriers": ("energy_flow", "carriers"), "carrier_dim": ("energy_flow", "carrier_dim"),
    "carrier_max_step": ("energy_flow", "max_step"), "energy_decay": ("energy_flow", "energy_decay"),
    "carrier_memory": ("energy_flow", "memory"),
    **{f: ("text", f) for f in ("encoder_dim", "decoder_dim", "heads", "decoder_layers", "decoder_cell_rope",
                                "max_question_bytes", "max_answer_bytes")},
    "stdp_a_plus": ("plasticity", "a_plus"), "stdp_a_minus": ("plasticity", "a_minus"),
    "stdp_trace_decay": ("plasticity", "trace_decay"), "bcm_rate": ("plasticity", "bcm_rate"),
    "bcm_tau": ("plasticity", "bcm_tau"), "competitive_rate": ("plasticity", "competitive_rate"),
    "competitive_top_k": ("plasticity", "top_k"), "w_min": ("plasticity", "w_min"), "w_max": ("plasticity", "w_max"),
    "plasticity_enabled": ("plasticity", "enabled"), "profile": ("plasticity", "profile"),
    "n_clusters": ("clustering", "n_clusters"), "cluster_sample": ("clustering", "sample_size"),
    "clustering": ("clustering", "enabled"), "cluster_coordination": ("clustering", "coordination"),
    **{f: ("optim", f) for f in ("learning_rate", "rule_lr_scale", "weight_decay", "warmup_steps", "min_lr_ratio")},
}
# format-1 state-dict keys: the per-cell buffers sat on the module itself; they now live in `cells` (LatticeState)
FLAT_BUFFERS = ("connections", "connection_mask", "cluster_ids", "trace", "theta")

ConfigT = TypeVar("ConfigT")


def is_flat(key: str, value: Any) -> bool:
    """Whether ``key=value`` is a format-1 flat argument (``clustering`` was the on/off switch, now it is a group)."""
    return key in FLAT_FIELDS and not (key == "clustering" and not isinstance(value, bool))


def grouped_hparams(flat: dict[str, Any]) -> dict[str, Any]:
    """Format-1 flat arguments (``depth=…, n_clusters=…``) -> grouped ones (``lattice={"depth": …}, …``); arguments
    that kept their place (``use_lattice``, ``mode``, ``metrics_every``, ``lattice_seed``) pass through."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        if is_flat(key, value):
            group, field = FLAT_FIELDS[key]
            out.setdefault(group, {})[field] = value
        else:
            out[key] = value
    return out


def as_config(cls: type[ConfigT], value: Any, name: str) -> ConfigT:
    """A config group given as its dataclass or as a dict of its fields (how checkpoints store it)."""
    if isinstance(value, dict):
        value = cls(**value)
    if not isinstance(value, cls):
        raise TypeError(f"{name} must be a {cls.__name__}, got {type(value).__name__}")
    return value


class LatticeNetwork(PlasticLattice, ResumableModule):
    """A 3D neural cellular automaton with plastic connections that answers questions byte by byte.

    Batches are dicts from :class:`~neat_lightning.data.QADataModule`: ``question`` (B, Lq) and ``answer``
    (B, La + 2) int64 ids (answers framed by BOS/EOS, PAD-padded).

    Args:
        use_lattice: False gives the no-lattice baseline (encoder -> per-cell MLP of equal size -> decoder).
        mode: ``"nca"`` (the shared cell rule) or ``"energy_flow"`` (carriers moving through the lattice, reading and
            writing cells; :mod:`neat_lightning.components.energy_flow`; the plastic connections are unused).
        lattice: size (D, H, W; input face at depth 0, output face at D - 1), channels, rule width, ``steps``
            (``>= depth - 1`` so the input can reach the output face), firing, perception, stencil, rule init and
            activation checkpointing.
        text: the question encoder and the answer decoder (widths, heads, layers, rotary cross-attention, lengths).
        plasticity: STDP/BCM/competitive rates and weight bounds, whether plasticity runs after each optimiser
            step, and the initial profile (``discovery``, ``learning``, ``consolidation``, ``freeze``).
        clustering: K, cells sampled per k-means update, whether clustering starts on (PlasticityStages turns it on
            from stage 3), and the weight of the cluster coordination loss.
        energy_flow: the carriers of ``mode="energy_flow"`` (count, state, step, energy decay, memory).
        optim: the default AdamW and its warm-up/cosine schedule, with the rule's own learning-rate scale.
        metrics_every: log lattice metrics (activity, emergence, clusters) every this many steps.
        lattice_seed: seed of the stochastic firing and cluster sampling (per step, so resumes are exact).
    """

    def __init__(
        self,
        use_lattice: bool = True,
        mode: LatticeMode = "nca",
        lattice: LatticeConfig = LatticeConfig(),
        text: FaceTextConfig = FaceTextConfig(),
        plasticity: PlasticityConfig = PlasticityConfig(),
        clustering: ClusteringConfig = ClusteringConfig(),
        energy_flow: EnergyFlowConfig = EnergyFlowConfig(),
        optim: LatticeOptimConfig = LatticeOptimConfig(),
        metrics_every: int = 10,
        lattice_seed: int = 0,
    ) -> None:
        super().__init__()
        groups = {name: as_config(cls, value, name) for (name, cls), value in zip(
            GROUPS.items(), (lattice, text, plasticity, clustering, energy_flow, optim))}
        lattice, text, plasticity, clustering, energy_flow, optim = groups.values()
        self.save_hyperparameters(ignore=list(GROUPS))
        for name, cfg in groups.items():  # plain values: checkpoints load with weights_only
            self.hparams[name] = dataclasses.asdict(cfg)
        if use_lattice and lattice.steps < lattice.depth - 1:
            raise ValueError(f"steps={lattice.steps} must be >= depth - 1 = {lattice.depth - 1} for the input to "
                             "reach the output face")
        if metrics_every < 1:
            raise ValueError(f"metrics_every={metrics_every} must be >= 1")
        check_choice("mode", mode, LatticeMode)
        self.config = lattice  # follows the lattice's growth (size and steps)
        self.text_config, self.optim_config = text, optim
        C, H, W = lattice.channels, lattice.height, lattice.width
        self.encoder = FaceEncoder(C, H, W, text.encoder_dim, text.heads, text.max_question_bytes)
        self.decoder = FaceDecoder(
            C, H * W, text.decoder_dim, text.heads, text.decoder_layers, text.max_answer_bytes + 2,
            cell_stride=self.encoder.cells_per_byte if text.decoder_cell_rope else None,
        )
        rule = LatticeRule(dataclasses.replace(lattice, stencil="shift"))  # shift: no stencil buffers to build
        if use_lattice and mode == "energy_flow":
            self.flow = EnergyFlow(energy_flow, lattice)
        elif use_lattice:
            self.rule = LatticeRule(lattice)
        else:
            self.adapter = PointwiseAdapter(C, sum(p.numel() for p in rule.parameters()))
        self.cells = LatticeState(lattice.size, C, plasticity, clustering)
        self.val_exact_match = MeanMetric()  # per question: 1.0 when the whole answer is right
        self._last_activity: torch.Tensor | None = None  # (T, D, H, W) of the last training forward
        self._last_cells: torch.Tensor | None = None  # (D·H·W, C) batch-mean final state
        self._record()

    # -- checkpoints -----------------------------------------------------------------------------------------------

    @classmethod
    def upgrade_format(cls, checkpoint: dict[str, Any], found: int) -> list[str]:
        """Format 1 -> 2: the ~50 flat arguments become the groups of :data:`GROUPS` (:data:`FLAT_FIELDS` says where
        each went), the per-cell buffers and the k-means move under ``cells.``, and the structural record names the
        energy-flow fields by their dotted group names."""
        changes = super().upgrade_format(checkpoint, found)
        if found >= 2:
            return changes
        hp = checkpoint.get("hyper_parameters")
        flat = [k for k, v in (hp or {}).items() if is_flat(k, v)]
        if flat:
            checkpoint["hyper_parameters"] = grouped_hparams(hp)
            for group in GROUPS:  # one line per group: "text: encoder_dim, …", "plasticity: stdp_a_plus -> a_plus, …"
                moved = [k if k == f else f"{k} -> {f}" for k in flat for g, f in [FLAT_FIELDS[k]] if g == group]
                if moved:
                    changes.append(f"LatticeNetwork arguments into the {group} group: {', '.join(moved)}")
        sd = checkpoint.get("state_dict") or {}
        moved = [k for k in list(sd) if k in FLAT_BUFFERS or k.startswith("kmeans.")]
        for key in moved:
            sd[f"cells.{key}"] = sd.pop(key)
        if moved:
            changes.append(f"LatticeNetwork state-dict keys {', '.join(moved)} -> cells.*")
        record = checkpoint.get(STRUCTURE_KEY, {}).get(STRUCTURE_NAME, {})
        fields = record.get("fields", {})
        renamed = {k: f"{FLAT_FIELDS[k][0]}.{FLAT_FIELDS[k][1]}" for k in fields if k in FLAT_FIELDS}
        if renamed:
            record["fields"] = {renamed.get(k, k): v for k, v in fields.items()}
            changes.append(f"lattice structure fields {', '.join(renamed)} -> {', '.join(renamed.values())}")
        return changes

    def hparam(self, field: str) -> Any:
        """A hyperparameter by (dotted) name: ``"mode"``, ``"energy_flow.carriers"``."""
        value: Any = self.hparams
        for part in field.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        return value

    def _record(self) -> None:
        self.record_structure(
            STRUCTURE_NAME,
            {
                "size": list(self.config.size),
                "steps": int(self.config.steps),
                # the mode's fields: load_from_checkpoint(path, **overrides) rewrites the checkpoint's hparams, not
                # this record, so a mismatch can still be named on load
                "fields": {f: self.hparam(f) for f in MODE_FIELDS},
                **self.plastic_structure(),  # profile and clustering switch
            },
        )

    def restore_structure(self, name: str, state: Any) -> None:
        """Rebuild the ``"lattice"`` entry: resize to the recorded size (and lattice steps), set profile and
        clustering; other names go to the base class."""
        if name != STRUCTURE_NAME:
            return super().restore_structure(name, state)
        size = tuple(int(s) for s in state["size"])
        steps = int(state.get("steps", self.config.steps))
        if size != self.config.size or steps != self.config.steps:
            log.info("checkpoint lattice size %s differs from the configured %s; rebuilding", size, self.config.size)
            self.resize_lattice(size, steps)
        self.restore_plastic(state)
        self._record()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        upgrade_checkpoint(checkpoint, type(self))  # a --ckpt_path resume of a format-1 file: names first
        saved = checkpoint.get(STRUCTURE_KEY, {}).get(STRUCTURE_NAME, {}).get("fields", {})
        for field in MODE_FIELDS:
            if field in saved and saved[field] != self.hparam(field):
                raise ValueError(
                    f"the checkpoint was written with {field}={saved[field]!r} but this LatticeNetwork has "
                    f"{field}={self.hparam(field)!r}; build the module with the checkpoint's {field}"
                )
        super().on_load_checkpoint(checkpoint)

    # -- size (the Growable protocol) ------------------------------------------------------------------------------

    def current_size(self) -> tuple[int, int, int]:
        return self.config.size

    def estimate_memory(self, size: tuple[int, int, int], batch: int = 1, precision: str = "32-true") -> int:
        """Estimated peak bytes of one training step grown to ``size``
        (:func:`~neat_lightning.components.memory_budget.estimate_memory`)."""
        cfg, text = self.config, self.text_config
        return memory_budget.estimate_memory(memory_budget.MemoryConfig(
            size=tuple(int(s) for s in size), channels=cfg.channels, hidden=cfg.hidden,
            steps=cfg.steps + max(0, int(size[0]) - cfg.depth), batch=batch, precision=precision,
            checkpoint_every=cfg.checkpoint_every, stencil=cfg.stencil, encoder_dim=text.encoder_dim,
            decoder_dim=text.decoder_dim, decoder_layers=text.decoder_layers,
        ))

    def resize_lattice(self, size: tuple[int, int, int], steps: int | None = None) -> None:
        """Rebuild the module for a lattice of ``size`` (D, H, W) (and ``steps`` lattice steps, default unchanged):
        buffers and face-sized parameters get new shapes (zeroed; a checkpoint's weights fill them). Used when a
        checkpoint records a grown lattice; :meth:`grow` resizes and carries the learnt values over."""
        self._resize(size, steps, resample=False)

    @torch.no_grad()
    def grow(self, size: tuple[int, int, int], steps: int | None = None) -> dict[str, GrownParameter]:
        """Grow (or shrink) the lattice to ``size`` (D, H, W), carrying over what was learnt: the shared rule and the
        encoder/decoder weights are unchanged; per-cell buffers are resampled (:meth:`LatticeState.resize`) and the
        face-sized parameters (``encoder.cell_bias``, ``decoder.cell_pos``) bilinearly **in place** (same
        ``Parameter`` objects, so an optimizer keeps tracking them). ``steps`` defaults to the current steps plus
        the depth added.

        Returns:
            the resized parameters by name, each with its old shape and the resampling that carried it over.
        """
        size = tuple(int(s) for s in size)
        steps = self.config.steps + max(0, size[0] - self.config.depth) if steps is None else int(steps)
        old_hw = self.config.size[1:]
        faces = {"encoder.cell_bias": self.encoder.cell_bias, "decoder.cell_pos": self.decoder.cell_pos}
        old_shapes = {name: tuple(p.shape) for name, p in faces.items()}
        self._resize(size, steps, resample=True)
        resample = functools.partial(resample_face, old_hw=old_hw, new_hw=size[1:])
        return {name: GrownParameter(p, old_shapes[name], resample) for name, p in faces.items()}

    def _resize(self, size: tuple[int, int, int], steps: int | None, resample: bool) -> None:
        D, H, W = (int(s) for s in size)
        steps = self.config.steps if steps is None else int(steps)
        if min(D, H, W) < 1:
            raise ValueError(f"lattice size={tuple(size)} must be positive")
        if self.hparams.use_lattice and steps < D - 1:
            raise ValueError(f"lattice size depth={D} needs steps >= {D - 1}, the module has steps={steps}")
        old_hw = self.config.size[1:]
        try:  # checked before anything changes
            self.encoder.resize(H, W, resample)
        except ValueError as err:
            raise ValueError(f"lattice size {(D, H, W)}: {err}") from None
        self.decoder.resize(old_hw, (H, W), resample)
        self.config = dataclasses.replace(self.config, depth=D, height=H, width=W, steps=steps)
        if self.hparams.use_lattice and self.hparams.mode == "energy_flow":
            self.flow.lattice = self.config
        elif self.hparams.use_lattice:
            self.rule.build_stencils((D, H, W))
        self.cells.resize((D, H, W), resample)
        self._last_activity = self._last_cells = None
        self._record()

    # -- model -----------------------------------------------------------------------------------------------------

    def _generator(self) -> torch.Generator:
        g = torch.Generator(device=self.device)
        return g.manual_seed(int(self.hparams.lattice_seed) * 1_000_003 + int(self.global_step if self._trainer else 0))

    def _cpu_generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(int(self.hparams.lattice_seed) * 7_919 + int(self.global_step))

    def encode_questions(self, questions: torch.Tensor, stochastic: bool = False):
        """questions (B, Lq) -> ``(memory (B, H·W, E), state (N, B, C) or None, activity (T, D, H, W) or None)``."""
        face = self.encoder(questions, PAD_ID)  # (B, H·W, C)
        if not self.hparams.use_lattice:
            return self.decoder.memory(self.adapter(face)), None, None
        gen = self._generator() if stochastic else None
        if self.hparams.mode == "energy_flow":
            if gen is None:  # evaluation: carriers start at the same positions every time
                gen = torch.Generator(device=self.device).manual_seed(int(self.hparams.lattice_seed))
            cells, _ = self.flow(face, generator=gen)  # (B, N, C)
            out_face = cells[:, -face.shape[1] :]  # the last H·W cells: depth D - 1
            return self.decoder.memory(out_face), None, None
        state, activity = run_lattice(
            self.rule, rearrange(face, "b n c -> n b c"), self.cells.effective_connections(), self.config.steps,
            stochastic, generator=gen,
        )  # (N, B, C), (T, D, H, W)
        out_face = rearrange(state[-face.shape[1] :], "n b c -> b n c")  # the last H·W cells: depth D - 1
        return self.decoder.memory(out_face), state, activity

    def forward(self, questions: torch.Tensor, answers_in: torch.Tensor) -> torch.Tensor:
        """questions (B, Lq), answers_in (B, La) (BOS + answer) -> next-byte logits (B, La, 260)."""
        memory, _, _ = self.encode_questions(questions)
        return self.decoder(answers_in, memory)

    def loss(self, batch: dict[str, torch.Tensor], stochastic: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        answers = batch["answer"]
        memory, state, activity = self.encode_questions(batch["question"], stochastic)
        logits = self.decoder(answers[:, :-1], memory)
        loss = F.cross_entropy(
            rearrange(logits, "b t v -> (b t) v").float(), answers[:, 1:].reshape(-1), ignore_index=PAD_ID
        )
        if stochastic:
            self._last_activity = activity
            self._last_cells = state.detach().mean(1) if state is not None else None  # (N, C)
        return loss, state

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, state = self.loss(batch, stochastic=True)
        total = loss
        weight = self.cells.clustering.coordination
        if weight > 0 and self.cells.clustering_enabled and state is not None:
            coord = self.cells.coordination_loss(state)
            self.log("train/coordination", coord)
            total = loss + weight * coord
        self.log("train/loss", loss, prog_bar=True)
        return total

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """The optimiser step, then plasticity and clustering on the activity of the step's forward.

        Done here rather than in ``on_train_batch_end`` because callbacks' ``on_train_batch_end`` (ModelCheckpoint's
        among them) run before the module's: a checkpoint written at step k must already hold step k's plasticity,
        or a resume from it would differ from the uninterrupted run."""
        super().optimizer_step(*args, **kwargs)
        self.plasticity_step()

    @torch.no_grad()
    def plasticity_step(self) -> None:
        """Apply the combined plasticity rule to the connections and update the clusters (no gradient)."""
        if not self.hparams.use_lattice or self._last_activity is None:
            return
        self.cells.plasticity_step(self._last_activity, self._last_cells, generator=self._cpu_generator())

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._last_activity is not None and self.global_step % self.hparams.metrics_every == 0:
            self.log_dict(self.lattice_metrics(self._last_activity[-1]))

    def lattice_metrics(self, activity: torch.Tensor) -> dict[str, float]:
        """Metrics of a (D, H, W) activity field under the current profile and structure, by logged name."""
        return {f"lattice/{name}": value for name, value in self.cells.metrics(activity).items()}

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, _ = self.loss(batch, stochastic=False)
        self.log("val/loss", loss, prog_bar=True, batch_size=len(batch["answer"]))
        pred = self.generate_ids(batch["question"], batch["answer"].shape[1] - 1)
        target = batch["answer"][:, 1:]
        n = target.shape[1]
        pred = F.pad(pred, (0, max(0, n - pred.shape[1])), value=PAD_ID)[:, :n]
        # exact match: identical bytes up to and including EOS (PAD after EOS is ignored)
        upto = torch.cumsum((target == EOS_ID).long(), 1) - (target == EOS_ID).long() == 0
        same = ((pred == target) | ~upto).all(1).float()
        self.val_exact_match.update(same)  # the mean over every question of the epoch, on every rank
        self.log("val/exact_match", self.val_exact_match, prog_bar=True, batch_size=len(same))

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def configure_optimizers(self):
        o = self.optim_config
        out = default_adamw(self, o.learning_rate, o.weight_decay, o.warmup_steps, o.min_lr_ratio)
        if not (self.hparams.use_lattice and self.hparams.mode == "nca") or o.rule_lr_scale == 1.0:
            return out  # no rule (baseline, energy flow) or no separate rate
        # the rule is applied T times in a row: its own (smaller) learning rate keeps a transport init near a copy
        rule = {id(p) for p in self.rule.parameters()}
        groups = [
            {**g, "params": [p for p in g["params"] if (id(p) in rule) == is_rule],
             "lr": o.learning_rate * (o.rule_lr_scale if is_rule else 1.0)}
            for g in decay_groups(self, o.weight_decay) for is_rule in (False, True)
        ]
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=o.learning_rate, betas=(0.9, 0.95))
        scheduler = out["lr_scheduler"]["scheduler"]  # same warm-up/cosine multiplier, now on the split groups
        out["optimizer"] = optimizer
        out["lr_scheduler"]["scheduler"] = torch.optim.lr_scheduler.LambdaLR(optimizer, scheduler.lr_lambdas[0])
        return out

    # -- generation (TextGenerator protocol) -----------------------------------------------------------------------

    @torch.no_grad()
    def generate_ids(self, questions: torch.Tensor, max_new_bytes: int) -> torch.Tensor:
        """Greedy answers for a batch of questions (B, Lq) -> (B, N <= max_new_bytes) ids, PAD after EOS.

        The lattice runs once (expected updates, no sampling); the decoder then extends a KV cache one byte at a
        time, with the cross-attention keys/values of the output face computed once."""
        with eval_mode(self):
            memory, _, _ = self.encode_questions(questions.to(self.device))
            B = questions.shape[0]
            caches = self.decoder.make_caches(B, max_new_bytes + 1)
            kvs = self.decoder.cross_keys_values(memory)
            nxt = torch.full((B,), BOS_ID, dtype=torch.long, device=self.device)
            done = torch.zeros(B, dtype=torch.bool, device=self.device)
            out = []
            for pos in range(max_new_bytes):  # over generated bytes
                logits = self.decoder(nxt[:, None], None, pos, caches, kvs)[:, -1]
                nxt = torch.where(done, torch.full_like(nxt, PAD_ID), sample(logits))
                out.append(nxt)
                done |= nxt == EOS_ID
                if bool(done.all()):
                    break
        return torch.stack(out, 1) if out else torch.empty(B, 0, dtype=torch.long, device=self.device)

    def generate_text(self, prompts: list[str], max_new_bytes: int, batch_size: int = 64) -> list[str]:
        """Answer each prompt (greedy); returns only the answers."""
        Lq = self.text_config.max_question_bytes
        out: list[str] = []
        for start in range(0, len(prompts), batch_size):  # over prompt batches
            chunk = prompts[start : start + batch_size]
            q = torch.full((len(chunk), Lq), PAD_ID, dtype=torch.long)
            for i, p in enumerate(chunk):
                ids = encode(p)[-Lq:]
                q[i, : len(ids)] = ids
            out += [decode(row.cpu()) for row in self.generate_ids(q, max_new_bytes)]
        return out
