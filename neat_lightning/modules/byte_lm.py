"""ByteLM: the small byte-level language model of the Byte Latent Transformer (BLT).

It predicts the next byte, reports bits per byte, generates text with a KV cache (the ``TextGenerator`` protocol),
and its next-byte entropies drive entropy patching (:mod:`neat_lightning.components.patching`). It keeps an episodic
buffer of training windows that sleep replays (``MemoryConsolidator`` / ``MemoryPrunable``,
:mod:`neat_lightning.modules.replay`) while a callback such as SleepWakeConsolidation plans its steps.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torchmetrics import Metric

from neat_lightning.components.episodic_buffer import EpisodicConfig
from neat_lightning.components.transformer import ByteTransformer, TransformerConfig
from neat_lightning.components.sampling import eval_mode, sample
from neat_lightning.codec import EOS_ID, PAD_ID, VOCAB_SIZE
from neat_lightning.modules.base import ResumableModule
from neat_lightning.modules.generation import TextGenerationMixin
from neat_lightning.modules.optim import default_adamw
from neat_lightning.modules.replay import ConsolidationMixin, ReplayTerms, episodic_config, store_config


class NatsPerByte(Metric):
    """Mean next-byte loss (nats) over every predicted byte of an epoch: sums of nats and byte counts, in float64,
    summed over batches and ranks before dividing (a mean of per-batch means would weight short batches up).

    ``compute()`` -> ``(nats per byte, byte count)``; the mean is NaN when no byte was predicted.
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("nats", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, mean_nats: torch.Tensor, count: int) -> None:
        """mean_nats: () mean loss of a batch over its ``count`` predicted bytes."""
        self.nats += mean_nats.to(self.nats) * count
        self.count += count

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.nats / self.count, self.count


class ByteLM(TextGenerationMixin, ConsolidationMixin, ResumableModule):
    """Next-byte language model over BLT's 260-id byte vocabulary.

    Batches are ``(B, T + 1)`` int64 id windows (inputs ``[:, :-1]``, targets ``[:, 1:]``); PAD targets are ignored.

    Args:
        dim: model width.
        n_layers: transformer blocks.
        heads: attention heads (``dim`` must divide evenly).
        block_size: training context length in bytes.
        window: sliding-window attention span (bytes); ``None`` for full causal attention.
        mlp_hidden: SwiGLU hidden width; ``None`` for 8/3 * dim rounded up to a multiple of 32.
        dropout: dropout on attention and residual branches.
        tie_weights: share the byte embedding with the output head.
        rope_base: RoPE base frequency.
        learning_rate: peak AdamW learning rate of the default optimizer (unused when the CLI sets ``optimizer:``).
        weight_decay: AdamW weight decay on matrices (norm gains and biases are not decayed).
        warmup_steps: linear warm-up steps of the default schedule, then cosine decay to
            ``min_lr_ratio * learning_rate`` at the trainer's last step.
        min_lr_ratio: final learning rate as a fraction of the peak.
        episodic: the buffer of training windows that sleep replays (``surprise`` must be ``"loss"``).
    """

    def __init__(
        self,
        dim: int = 128,
        n_layers: int = 2,
        heads: int = 4,
        block_size: int = 256,
        window: int | None = None,
        mlp_hidden: int | None = None,
        dropout: float = 0.0,
        tie_weights: bool = True,
        rope_base: float = 10_000.0,
        learning_rate: float = 3e-3,
        weight_decay: float = 0.1,
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.1,
        episodic: EpisodicConfig = EpisodicConfig(),
    ) -> None:
        super().__init__()
        episodic = episodic_config(episodic)
        if episodic.surprise != "loss":
            raise ValueError(f"episodic.surprise={episodic.surprise!r}: ByteLM has no Titans memory; use 'loss'")
        self.save_hyperparameters(ignore=["episodic"])
        store_config(self, episodic)
        self.config = TransformerConfig(
            vocab_size=VOCAB_SIZE, dim=dim, n_layers=n_layers, heads=heads, block_size=block_size, window=window,
            mlp_hidden=mlp_hidden, dropout=dropout, tie_weights=tie_weights, rope_base=rope_base,
        )
        self.model = ByteTransformer(self.config)
        self.eval_nats = NatsPerByte()  # the running validation/test epoch
        self.init_consolidation(episodic)

    # -- model -----------------------------------------------------------------------------------------------------

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids: (B, T) int64 -> next-byte logits (B, T, 260)."""
        return self.model(ids)

    def loss(self, batch: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Mean next-byte cross-entropy (nats) over non-PAD targets of a (B, T + 1) batch, and their count."""
        x, y = batch[:, :-1], batch[:, 1:]
        logits = self(x)
        loss = F.cross_entropy(rearrange(logits, "b t v -> (b t) v").float(), y.reshape(-1), ignore_index=PAD_ID)
        return loss, int((y != PAD_ID).sum())

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        plan = self.take_plan()  # set by a MemoryConsolidator callback; None: an ordinary step
        if plan is not None and plan.sleep:
            return self.sleep_step(plan)  # the data's batch is not used
        if plan is None:
            loss, _ = self.loss(batch)
        else:
            rows, slots = self.wake_rows(batch, plan)
            terms = self.replay_terms(rows)
            self.remember(rows, terms, slots)
            loss = terms.loss
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/bpb", loss / math.log(2))
        return loss

    def replay_terms(self, rows: dict[str, torch.Tensor]) -> ReplayTerms:
        """``rows["ids"]`` (B, T + 1) -> mean next-byte loss over non-PAD targets, per-window loss (B,), logits."""
        ids = rows["ids"]
        x, y = ids[:, :-1], ids[:, 1:]
        logits = self(x)
        nats = F.cross_entropy(rearrange(logits, "b t v -> b v t").float(), y, ignore_index=PAD_ID, reduction="none")
        mask = y != PAD_ID
        m = mask.float()
        loss = (nats * m).sum() / m.sum().clamp_min(1.0)
        return ReplayTerms(loss, (nats * m).sum(1) / m.sum(1).clamp_min(1.0), logits, mask, x, y, {})

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        loss, n = self.loss(batch)
        self.eval_nats.update(loss.detach(), n)

    def test_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_validation_epoch_start(self) -> None:
        self.eval_nats.reset()

    on_test_epoch_start = on_validation_epoch_start

    def _log_eval(self, split: str) -> None:
        """Per-byte mean over the whole epoch and all ranks (exact: sums are reduced, not means)."""
        nats, count = self.eval_nats.compute()  # synchronised across ranks
        self.eval_nats.reset()
        if float(count) == 0:
            return
        nats = nats.float()
        self.log(f"{split}/loss", nats, prog_bar=True, rank_zero_only=True)
        self.log(f"{split}/bpb", nats / math.log(2), prog_bar=True, rank_zero_only=True)

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    def configure_optimizers(self):
        hp = self.hparams
        return default_adamw(self, hp.learning_rate, hp.weight_decay, hp.warmup_steps, hp.min_lr_ratio)

    # -- generation (TextGenerator protocol) -----------------------------------------------------------------------

    @torch.inference_mode()
    def generate(
        self,
        ids: torch.Tensor,
        max_new_bytes: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        stop_at_eos: bool = True,
    ) -> torch.Tensor:
        """Continue one prompt ``ids`` (T0,) by up to ``max_new_bytes`` ids -> the new ids (N,).

        Uses a KV cache of ``block_size`` positions; when it fills up, the cache is rebuilt from the last
        ``block_size // 2`` ids (RoPE is relative, so positions restart without harm). ``temperature=0`` is greedy.
        """
        with eval_mode(self):
            cfg, device = self.config, self.device
            ids = ids.to(device).reshape(-1)
            if len(ids) == 0:
                ids = torch.tensor([EOS_ID], device=device)  # an empty prompt starts like a new document
            context = ids[-cfg.block_size :]
            out: list[torch.Tensor] = []
            caches = self.model.make_caches(1, cfg.block_size, device=device, dtype=self.model.embed.weight.dtype)
            logits = self.model(context[None], 0, caches)[0, -1]
            pos = len(context)
            for _ in range(max_new_bytes):
                nxt = sample(logits, temperature, top_k, generator)
                out.append(nxt)
                if stop_at_eos and int(nxt) == EOS_ID:
                    break
                if pos == cfg.block_size:  # cache full: rebuild from the recent half
                    context = torch.cat([ids, torch.stack(out)])[-(cfg.block_size // 2) :]
                    caches = self.model.make_caches(1, cfg.block_size, device=device, dtype=self.model.embed.weight.dtype)
                    logits = self.model(context[None], 0, caches)[0, -1]
                    pos = len(context)
                else:
                    logits = self.model(nxt.view(1, 1), pos, caches)[0, -1]
                    pos += 1
        return torch.stack(out) if out else torch.empty(0, dtype=torch.long, device=device)
