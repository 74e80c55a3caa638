"""NeatModel's generation loops: text (``generate``, behind ``generate_text``) and interleaved text + images.

Both read the live tail of the context at every step (no KV cache: memory-as-context attention needs the memory
readouts) and fold the context beyond ``block_size`` into the Titans long-term memory in segments of
``block_size // 2``, carrying the memory state forward.

Shapes: ``B`` batch, ``T0`` prompt length, ``N`` new ids, ``V`` vocabulary.
"""

from __future__ import annotations

import torch

from neat_lightning.codec import EOS_ID, PAD_ID, VOCAB_SIZE
from neat_lightning.components.mvot import NO_IMAGE, advance, constrain_logits, image_counts
from neat_lightning.components.sampling import eval_mode, sample
from neat_lightning.components.titans import MemoryState, detach_state
from neat_lightning.modules.generation import TextGenerationMixin


class NeatGenerationMixin(TextGenerationMixin):
    """``generate`` / ``generate_interleaved`` for :class:`~neat_lightning.modules.neat.NeatModel` (which provides
    ``run``, ``choose_mix``, ``is_active``, ``config`` and ``mvot``)."""

    def _fold(
        self, seq: torch.Tensor, start: int, states: list[MemoryState | None] | None, mix: torch.Tensor | None = None
    ) -> tuple[int, list[MemoryState | None] | None]:
        """Fold the oldest half-blocks of ``seq`` (B, T) beyond ``block_size`` into the memory -> (start, states)."""
        fold = max(1, self.config.block_size // 2)
        while seq.shape[1] - start > self.config.block_size:
            states = [detach_state(s) for s in self.run(seq[:, start : start + fold], states, mix=mix)[1].states]
            start += fold
        return start, states

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

        The context beyond ``block_size`` is folded into the long-term memory (with Titans active; otherwise it is
        dropped). SVF experts come from the dispatcher, or ``task``.
        """
        with eval_mode(self):
            device = self.device
            seq = ids.to(device).reshape(1, -1)
            if seq.shape[1] == 0:
                seq = torch.tensor([[EOS_ID]], device=device)
            mix = None
            if self.is_active("svf"):
                head = seq[:, -self.config.block_size :]
                mix = self.choose_mix(head, torch.tensor([task], device=device) if task is not None else None)[0]
            states, start = None, 0
            out: list[torch.Tensor] = []
            for _ in range(max_new_bytes):
                start, states = self._fold(seq, start, states, mix)
                logits = self.run(seq[:, start:], states, mix=mix)[0][0, -1, :VOCAB_SIZE]  # text only
                nxt = sample(logits, temperature, top_k, generator)
                out.append(nxt)
                seq = torch.cat([seq, nxt.view(1, 1)], dim=1)
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
            raise ValueError("generate_interleaved needs the MVoT path (mvot=True, mvot_config.vqvae_ckpt=...)")
        with eval_mode(self):
            vocab = self.mvot.vocab
            seq = ids.to(self.device).long()
            seq = seq[None] if seq.ndim == 1 else seq
            if seq.shape[1] == 0:
                seq = torch.full((seq.shape[0], 1), EOS_ID, dtype=torch.long, device=self.device)
            count = image_counts(seq, vocab)  # (B,) codes written in the open image, or NO_IMAGE
            done = torch.zeros(seq.shape[0], dtype=torch.bool, device=self.device)
            states, start, out = None, 0, []
            for _ in range(max_new_tokens):
                start, states = self._fold(seq, start, states)
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
