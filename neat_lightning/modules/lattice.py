"""LatticeNetwork: question bytes → input face of a 3D cellular lattice → output face → answer bytes.

The lattice (:mod:`neat_lightning.components.lattice`) runs ``steps`` updates of one shared local rule; its plastic
connection weights (D, H, W, 26) are a buffer changed only by the plasticity rules
(:mod:`neat_lightning.components.plasticity`) between optimiser steps, under the active profile (the ``Plastic``
protocol, driven by :class:`~neat_lightning.callbacks.PlasticityStages`). Gradients train the encoder, the rule and the
decoder with answer-byte cross-entropy (+ an optional cluster coordination term).

Structure that survives checkpoints: the lattice size and the current profile / clustering switch are recorded as
the structural entry ``"lattice"`` (see :class:`~neat_lightning.modules.base.ResumableModule`) and replayed by
:meth:`LatticeNetwork.restore_structure` before the weights load — a lattice grown during training is rebuilt at its grown size;
pruning masks, cluster ids, centroids, STDP traces and BCM thresholds are buffers in the state dict.

Logged: ``train/loss``, ``val/loss``, ``val/exact_match``, ``lattice/activity`` (fraction of cells above the
profile's activity threshold), ``lattice/emergence`` (normalised spectral entropy of the activity field),
``lattice/wavelength``, ``lattice/clusters``, ``lattice/sparsity``.

``use_lattice=False`` is the no-lattice baseline: the input face goes through a per-cell MLP with the rule's
parameter count straight to the decoder.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Literal

import torch
import torch.nn.functional as F
from einops import rearrange

from neat_lightning.components.energy_flow import EnergyFlow, EnergyFlowConfig
from neat_lightning.components.sampling import eval_mode, sample
from neat_lightning.components.clustering import CosineKMeans, cluster_count, coordination_loss
from neat_lightning.components.lattice import (
    FaceDecoder,
    FaceEncoder,
    LatticeConfig,
    LatticeRule,
    Perception,
    PointwiseAdapter,
    RuleInit,
    Stencil,
    run_lattice,
    spectral_emergence,
)
from neat_lightning.components.plasticity import (
    N_NEIGHBOURS,
    PlasticityConfig,
    PlasticityProfile,
    PlasticityState,
    magnitude_prune_mask,
    plasticity_update,
    profile_by_name,
)
from neat_lightning.codec import BOS_ID, EOS_ID, PAD_ID, decode, encode
from neat_lightning.modules.base import STRUCTURE_KEY, ResumableModule
from neat_lightning.components.optim import decay_groups
from neat_lightning.modules.optim import default_adamw

log = logging.getLogger(__name__)

STRUCTURE_NAME = "lattice"
# hyperparameters a checkpoint must agree on (checked on load; the error names the field)
MODE_FIELDS = ("use_lattice", "mode", "carriers", "carrier_dim", "carrier_memory")


class LatticeNetwork(ResumableModule):
    """A 3D neural cellular automaton with plastic connections that answers questions byte by byte.

    Batches are dicts from :class:`~neat_lightning.data.QADataModule`: ``question`` (B, Lq) and ``answer``
    (B, La + 2) int64 ids (answers framed by BOS/EOS, PAD-padded).

    Args:
        depth: lattice depth D (input face at 0, output face at D - 1).
        height: lattice height H (face rows).
        width: lattice width W (face columns).
        channels: state channels C per cell.
        hidden: width of the rule's update MLP.
        steps: lattice steps per forward; ``>= depth - 1`` so the input can reach the output face.
        fire_rate: probability a cell updates in a training step.
        perception: ``"sobel"`` (fixed Sobel + Laplacian kernels) or ``"depthwise"`` (learned depthwise conv).
        alive_threshold: NCA alive-mask threshold on channel 0, None to keep every cell alive.
        depth_taps: also perceive each cell's two depth neighbours (d - 1, d + 1) unblurred.
        rule_init: ``"default"`` or ``"transport"`` (the rule starts as the exact copy ``Δs = s[d - 1] - s``, so
            the question reaches the output face at initialisation; needs ``depth_taps`` and
            ``hidden >= 2 * channels``).
        use_lattice: False gives the no-lattice baseline (encoder -> per-cell MLP of equal size -> decoder).
        mode: ``"nca"`` (the shared cell rule) or ``"energy_flow"`` (carriers moving through the lattice, reading and
            writing cells; :mod:`neat_lightning.components.energy_flow`; the plastic connections are unused).
        stencil: ``"sparse"`` (CSR products) or ``"shift"`` (shifted dense views, no index buffers: for big lattices).
        checkpoint_every: activation checkpointing across lattice steps: keep the state every this many steps and
            recompute the rest in the backward (0 = off).
        carriers: energy-flow carriers per sample.
        carrier_dim: recurrent state per carrier.
        carrier_max_step: largest learned carrier displacement per axis and step (normalised units).
        energy_decay: carrier energy multiplier per step.
        carrier_memory: past positions each carrier remembers.
        encoder_dim: width of the byte encoder.
        decoder_dim: width of the byte decoder.
        heads: attention heads of encoder and decoder.
        decoder_layers: decoder layers (self-attention + cross-attention to the output face).
        decoder_cell_rope: rotary cross-attention: output-face cells at their reading position (cell index // the
            encoder's cells per byte), so the decoder can learn "copy from k bytes ahead" once for all positions.
        max_question_bytes: question length Lq the encoder is built for (longer prompts keep their end).
        max_answer_bytes: answer length the decoder is trained on.
        stdp_a_plus: STDP potentiation amplitude A₊ (before the profile's multiplier).
        stdp_a_minus: STDP depression amplitude A₋.
        stdp_trace_decay: STDP trace decay per lattice step.
        bcm_rate: BCM learning rate η.
        bcm_tau: BCM sliding-threshold time constant τ_θ, in plasticity updates.
        competitive_rate: competitive boost/inhibition factor.
        competitive_top_k: competitive winners per cell (of 26).
        w_min: lower clamp of the connection weights.
        w_max: upper clamp of the connection weights.
        plasticity_enabled: apply plasticity after each optimiser step.
        profile: initial plasticity profile (``discovery``, ``learning``, ``consolidation``, ``freeze``).
        n_clusters: K of the functional clustering.
        cluster_sample: cells sampled per k-means update.
        clustering: start with clustering on (PlasticityStages turns it on from stage 3).
        cluster_coordination: weight of the cluster coordination loss (0 = off).
        metrics_every: log lattice metrics (activity, emergence, clusters) every this many steps.
        lattice_seed: seed of the stochastic firing and cluster sampling (per step, so resumes are exact).
        learning_rate: peak AdamW learning rate of the default optimizer.
        rule_lr_scale: the lattice rule's learning rate as a fraction of ``learning_rate`` (the rule is applied
            ``steps`` times in a row; a small scale keeps a transport-initialised rule close to a copy).
        weight_decay: AdamW weight decay on matrices.
        warmup_steps: linear warm-up steps, then cosine decay to ``min_lr_ratio * learning_rate``.
        min_lr_ratio: final learning rate as a fraction of the peak.
    """

    def __init__(
        self,
        depth: int = 16,
        height: int = 16,
        width: int = 16,
        channels: int = 16,
        hidden: int = 64,
        steps: int = 20,
        fire_rate: float = 0.5,
        perception: Perception = "sobel",
        alive_threshold: float | None = None,
        depth_taps: bool = False,
        rule_init: RuleInit = "default",
        use_lattice: bool = True,
        mode: Literal["nca", "energy_flow"] = "nca",
        stencil: Stencil = "sparse",
        checkpoint_every: int = 0,
        carriers: int = 1024,
        carrier_dim: int = 8,
        carrier_max_step: float = 0.1,
        energy_decay: float = 0.98,
        carrier_memory: int = 5,
        encoder_dim: int = 64,
        decoder_dim: int = 128,
        heads: int = 4,
        decoder_layers: int = 2,
        decoder_cell_rope: bool = False,
        max_question_bytes: int = 48,
        max_answer_bytes: int = 40,
        stdp_a_plus: float = 0.01,
        stdp_a_minus: float = 0.012,
        stdp_trace_decay: float = 0.8,
        bcm_rate: float = 0.01,
        bcm_tau: float = 10.0,
        competitive_rate: float = 0.02,
        competitive_top_k: int = 6,
        w_min: float = 0.0,
        w_max: float = 2.0,
        plasticity_enabled: bool = True,
        profile: str = "discovery",
        n_clusters: int = 8,
        cluster_sample: int = 4096,
        clustering: bool = False,
        cluster_coordination: float = 0.0,
        metrics_every: int = 10,
        lattice_seed: int = 0,
        learning_rate: float = 3e-3,
        rule_lr_scale: float = 1.0,
        weight_decay: float = 0.05,
        warmup_steps: int = 50,
        min_lr_ratio: float = 0.1,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if use_lattice and steps < depth - 1:
            raise ValueError(f"steps={steps} must be >= depth - 1 = {depth - 1} for the input to reach the output face")
        if metrics_every < 1:
            raise ValueError(f"metrics_every={metrics_every} must be >= 1")
        if rule_lr_scale < 0:
            raise ValueError(f"rule_lr_scale={rule_lr_scale} must be >= 0")
        if cluster_coordination < 0:
            raise ValueError(f"cluster_coordination={cluster_coordination} must be >= 0")
        if mode not in ("nca", "energy_flow"):
            raise ValueError(f"mode={mode!r} must be 'nca' or 'energy_flow'")
        if checkpoint_every < 0:
            raise ValueError(f"checkpoint_every={checkpoint_every} must be >= 0 (0 = no activation checkpointing)")
        self.config = LatticeConfig(
            depth, height, width, channels, hidden, steps, fire_rate, perception, alive_threshold,
            depth_taps=depth_taps, rule_init=rule_init, stencil=stencil,
        )
        # flat arguments rather than a dataclass: hparams stay plain values, so checkpoints load with weights_only
        self.plasticity_config = PlasticityConfig(
            stdp_a_plus, stdp_a_minus, stdp_trace_decay, bcm_rate, bcm_tau, competitive_rate, competitive_top_k,
            w_min, w_max,
        )
        self.profile = profile_by_name(profile)
        self.clustering_enabled = clustering
        self.encoder = FaceEncoder(channels, height, width, encoder_dim, heads, max_question_bytes)
        self.decoder = FaceDecoder(
            channels, height * width, decoder_dim, heads, decoder_layers, max_answer_bytes + 2,
            cell_stride=self.encoder.cells_per_byte if decoder_cell_rope else None,
        )
        rule = LatticeRule(dataclasses.replace(self.config, stencil="shift"))  # shift: no stencil buffers to build
        if use_lattice and mode == "energy_flow":
            self.flow = EnergyFlow(self.flow_config())
        elif use_lattice:
            self.rule = LatticeRule(self.config)
        else:
            self.adapter = PointwiseAdapter(channels, sum(p.numel() for p in rule.parameters()))
        self.kmeans = CosineKMeans(n_clusters, channels, cluster_sample)
        self._allocate(self.config.size)
        with torch.no_grad():
            self.connections.uniform_(0.5, 1.5)
        self._last_activity: torch.Tensor | None = None  # (T, D, H, W) of the last training forward
        self._last_cells: torch.Tensor | None = None  # (D·H·W, C) batch-mean final state
        self._record()

    # -- structure -------------------------------------------------------------------------------------------------

    def _allocate(self, size: tuple[int, int, int]) -> None:
        """(Re)create every buffer whose shape is the lattice size; values are reset (weights load afterwards)."""
        D, H, W = size
        device = self.encoder.cell_bias.device
        self.register_buffer("connections", torch.zeros(D, H, W, N_NEIGHBOURS, device=device))
        self.register_buffer("connection_mask", torch.ones(D, H, W, N_NEIGHBOURS, dtype=torch.bool, device=device))
        self.register_buffer("cluster_ids", torch.zeros(D, H, W, dtype=torch.long, device=device))
        self.register_buffer("trace", torch.zeros(D, H, W, device=device))
        self.register_buffer("theta", torch.zeros(D, H, W, device=device))

    def flow_config(self) -> EnergyFlowConfig:
        hp, cfg = self.hparams, self.config
        return EnergyFlowConfig(
            *cfg.size, cfg.channels, hp.carriers, hp.carrier_dim, cfg.steps, hp.carrier_max_step, hp.energy_decay,
            memory=hp.carrier_memory,
        )

    def _record(self) -> None:
        self.record_structure(
            STRUCTURE_NAME,
            {
                "size": list(self.config.size),
                "steps": int(self.config.steps),
                # the mode's fields: load_from_checkpoint(path, **overrides) rewrites the checkpoint's hparams, not
                # this record, so a mismatch can still be named on load
                "fields": {f: self.hparams[f] for f in MODE_FIELDS},
                "profile": dataclasses.asdict(self.profile),
                "clustering": bool(self.clustering_enabled),
            },
        )

    def resize_lattice(self, size: tuple[int, int, int], steps: int | None = None) -> None:
        """Rebuild the module for a lattice of ``size`` (D, H, W) (and ``steps`` lattice steps, default unchanged):
        buffers and face-sized parameters get new shapes (zeroed; a checkpoint's weights fill them). Used when a
        checkpoint records a grown lattice; :meth:`grow` resizes and carries the learnt values over."""
        D, H, W = (int(s) for s in size)
        steps = self.config.steps if steps is None else int(steps)
        if min(D, H, W) < 1:
            raise ValueError(f"lattice size={tuple(size)} must be positive")
        if self.hparams.use_lattice and steps < D - 1:
            raise ValueError(f"lattice size depth={D} needs steps >= {D - 1}, the module has steps={steps}")
        self.config = dataclasses.replace(self.config, depth=D, height=H, width=W, steps=steps)
        if self.hparams.use_lattice and self.hparams.mode == "energy_flow":
            self.flow.config = self.flow_config()
        elif self.hparams.use_lattice:
            self.rule.build_stencils((D, H, W))
        if H * W < self.encoder.max_len * self.encoder.cells_per_byte:
            raise ValueError(f"lattice size {(D, H, W)}: a {H}x{W} face cannot hold the encoder's "
                             f"{self.encoder.max_len} bytes x {self.encoder.cells_per_byte} cells")
        self.encoder.height, self.encoder.width = H, W
        dev = self.encoder.cell_bias.device
        self.encoder.cell_bias = torch.nn.Parameter(torch.zeros(H * W, self.config.channels, device=dev))
        self.decoder.cell_pos = torch.nn.Parameter(torch.zeros(H * W, self.decoder.cell_pos.shape[1], device=dev))
        self._allocate((D, H, W))
        self._record()

    @torch.no_grad()
    def grow(self, size: tuple[int, int, int], steps: int | None = None) -> dict[str, torch.nn.Parameter]:
        """Grow (or shrink) the lattice to ``size`` (D, H, W), carrying over what was learnt: the shared rule and the
        encoder/decoder weights are unchanged; per-cell buffers (connections, traces, BCM thresholds) are resampled
        trilinearly, the pruning mask and cluster ids by nearest neighbour, and the face-sized parameters
        (``encoder.cell_bias``, ``decoder.cell_pos``) bilinearly **in place** (same ``Parameter`` objects, so an
        optimizer keeps tracking them; :func:`neat_lightning.callbacks.progressive_scaling.resample_optimizer_state`
        resamples their moments). ``steps`` defaults to the current steps plus the depth added.

        Returns:
            the resized parameters by name.
        """
        old_size = self.config.size
        size = tuple(int(s) for s in size)
        steps = self.config.steps + max(0, size[0] - old_size[0]) if steps is None else int(steps)
        old = {name: getattr(self, name).clone() for name in ("connections", "connection_mask", "cluster_ids",
                                                               "trace", "theta")}
        faces = {"encoder.cell_bias": self.encoder.cell_bias, "decoder.cell_pos": self.decoder.cell_pos}
        face_values = {name: p.detach().clone() for name, p in faces.items()}
        # resize_lattice replaces the face parameters; keep the old objects and give them their new values below
        self.resize_lattice(size, steps)
        self.encoder.cell_bias, self.decoder.cell_pos = faces["encoder.cell_bias"], faces["decoder.cell_pos"]
        for name, p in faces.items():
            p.data = resample_face(face_values[name], old_size[1:], size[1:])
            p.grad = None
        self.connections.copy_(resample_cells(old["connections"], size, "trilinear"))
        self.connection_mask.copy_(resample_cells(old["connection_mask"].float(), size, "nearest") > 0.5)
        self.connections.mul_(self.connection_mask)
        self.cluster_ids.copy_(resample_cells(old["cluster_ids"][..., None].float(), size, "nearest")[..., 0].long())
        self.trace.copy_(resample_cells(old["trace"][..., None], size, "trilinear")[..., 0])
        self.theta.copy_(resample_cells(old["theta"][..., None], size, "trilinear")[..., 0])
        self._last_activity = self._last_cells = None
        return faces

    def release_memory(self) -> int:
        """Drop the cached activity and cells of the last forward (the ``Releasable`` protocol). Returns bytes freed."""
        freed = sum(t.numel() * t.element_size() for t in (self._last_activity, self._last_cells) if t is not None)
        self._last_activity = self._last_cells = None
        return freed

    def restore_structure(self, name: str, state: Any) -> None:
        """Rebuild the ``"lattice"`` entry: resize to the recorded size (and lattice steps), set profile and
        clustering; other names go to the base class."""
        if name != "lattice":
            return super().restore_structure(name, state)
        size = tuple(int(s) for s in state["size"])
        steps = int(state.get("steps", self.config.steps))
        if size != self.config.size or steps != self.config.steps:
            log.info("checkpoint lattice size %s differs from the configured %s; rebuilding", size, self.config.size)
            self.resize_lattice(size, steps)
        profile = state.get("profile")
        if profile is not None:
            self.profile = PlasticityProfile(**profile) if isinstance(profile, dict) else profile_by_name(profile)
        self.clustering_enabled = bool(state.get("clustering", False))
        self._record()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get(STRUCTURE_KEY, {}).get(STRUCTURE_NAME, {}).get("fields", {})
        for field in MODE_FIELDS:
            if field in saved and saved[field] != self.hparams.get(field):
                raise ValueError(
                    f"the checkpoint was written with {field}={saved[field]!r} but this LatticeNetwork has "
                    f"{field}={self.hparams.get(field)!r}; build the module with the checkpoint's {field}"
                )
        super().on_load_checkpoint(checkpoint)

    # -- Plastic protocol and stage hooks --------------------------------------------------------------------------

    def set_plasticity_profile(self, profile: PlasticityProfile) -> None:
        """Switch the rules' learning-rate multipliers and activity threshold (the ``Plastic`` protocol)."""
        if not isinstance(profile, PlasticityProfile):
            raise TypeError(f"profile must be a PlasticityProfile, got {type(profile).__name__}")
        self.profile = profile
        self._record()

    def set_clustering_enabled(self, enabled: bool) -> None:
        self.clustering_enabled = bool(enabled)
        self._record()

    @torch.no_grad()
    def prune_connections(self, sparsity: float) -> float:
        """Global magnitude pruning of the connections to ``sparsity``; returns the sparsity reached."""
        self.connection_mask.copy_(magnitude_prune_mask(self.connections, self.connection_mask, sparsity))
        self.connections.mul_(self.connection_mask)
        return self.sparsity

    @property
    def sparsity(self) -> float:
        return float((~self.connection_mask).float().mean())

    # -- model -----------------------------------------------------------------------------------------------------

    def effective_connections(self) -> torch.Tensor:
        return self.connections * self.connection_mask

    def _generator(self) -> torch.Generator:
        g = torch.Generator(device=self.device)
        return g.manual_seed(int(self.hparams.lattice_seed) * 1_000_003 + int(self.global_step if self._trainer else 0))

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
            self.rule, rearrange(face, "b n c -> n b c"), self.effective_connections(), self.config.steps,
            stochastic, generator=gen, checkpoint_every=self.hparams.checkpoint_every,
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
        if self.hparams.cluster_coordination > 0 and self.clustering_enabled and state is not None:
            ids = self.cluster_ids.reshape(-1).repeat_interleave(state.shape[1])  # (N·B,) matching (n b) rows
            coord = coordination_loss(rearrange(state, "n b c -> (n b) c"), ids, self.kmeans.centroids)
            self.log("train/coordination", coord)
            total = loss + self.hparams.cluster_coordination * coord
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
        p = self.profile
        if self.hparams.plasticity_enabled and (p.stdp or p.bcm or p.competitive):
            weights, state = plasticity_update(
                self.connections, self._last_activity, PlasticityState(self.trace, self.theta), p,
                self.plasticity_config, self.connection_mask,
            )
            self.connections.copy_(weights)
            self.trace.copy_(state.trace)
            self.theta.copy_(state.theta)
        if self.clustering_enabled and self._last_cells is not None:
            ids = self.kmeans.update(self._last_cells, generator=self._cpu_generator())
            self.cluster_ids.copy_(ids.reshape(self.cluster_ids.shape))

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._last_activity is not None and self.global_step % self.hparams.metrics_every == 0:
            self.log_dict(self.lattice_metrics(self._last_activity[-1]))

    def _cpu_generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(int(self.hparams.lattice_seed) * 7_919 + int(self.global_step))

    def lattice_metrics(self, activity: torch.Tensor) -> dict[str, float]:
        """Metrics of a (D, H, W) activity field under the current profile and structure."""
        entropy, wavelength = spectral_emergence(activity)
        return {
            "lattice/activity": float((activity > self.profile.activity_threshold).float().mean()),
            "lattice/emergence": entropy,
            "lattice/wavelength": wavelength,
            "lattice/clusters": float(cluster_count(self.cluster_ids, self.hparams.n_clusters))
            if self.clustering_enabled else 0.0,
            "lattice/sparsity": self.sparsity,
        }

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
        self.log("val/exact_match", same.mean(), prog_bar=True, batch_size=len(same))

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def configure_optimizers(self):
        hp = self.hparams
        out = default_adamw(self, hp.learning_rate, hp.weight_decay, hp.warmup_steps, hp.min_lr_ratio)
        if not hp.use_lattice or hp.rule_lr_scale == 1.0:
            return out
        # the rule is applied T times in a row: its own (smaller) learning rate keeps a transport init near a copy
        rule = {id(p) for p in self.rule.parameters()}
        groups = [
            {**g, "params": [p for p in g["params"] if (id(p) in rule) == is_rule],
             "lr": hp.learning_rate * (hp.rule_lr_scale if is_rule else 1.0)}
            for g in decay_groups(self, hp.weight_decay) for is_rule in (False, True)
        ]
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=hp.learning_rate, betas=(0.9, 0.95))
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
        Lq = self.hparams.max_question_bytes
        out: list[str] = []
        for start in range(0, len(prompts), batch_size):  # over prompt batches
            chunk = prompts[start : start + batch_size]
            q = torch.full((len(chunk), Lq), PAD_ID, dtype=torch.long)
            for i, p in enumerate(chunk):
                ids = encode(p)[-Lq:]
                q[i, : len(ids)] = ids
            out += [decode(row.cpu()) for row in self.generate_ids(q, max_new_bytes)]
        return out


def resample_cells(field: torch.Tensor, size: tuple[int, int, int], mode: str) -> torch.Tensor:
    """A per-cell field (D, H, W, K) resampled to ``size`` -> (D', H', W', K) (``"trilinear"``, corners aligned,
    or ``"nearest"``)."""
    x = rearrange(field.float(), "d h w k -> 1 k d h w")
    kw = {"align_corners": True} if mode == "trilinear" else {}
    out = F.interpolate(x, size=tuple(size), mode=mode, **kw)
    return rearrange(out, "1 k d h w -> d h w k").to(field.dtype)


def resample_face(values: torch.Tensor, old_hw: tuple[int, int], new_hw: tuple[int, int]) -> torch.Tensor:
    """Face-sized values (H·W, E) resampled bilinearly (corners aligned) to (H'·W', E)."""
    x = rearrange(values, "(h w) e -> 1 e h w", h=old_hw[0], w=old_hw[1])
    out = F.interpolate(x, size=tuple(new_hw), mode="bilinear", align_corners=True)
    return rearrange(out, "1 e h w -> (h w) e").contiguous()
