"""Text generation shared by the byte-level modules: next-id sampling and the ``TextGenerator`` protocol method."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from neat_lightning.data.codec import decode, encode


def sample_next(
    logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None
) -> torch.Tensor:
    """logits: (V,) -> a sampled id, () int64. ``temperature <= 0`` picks the argmax."""
    if temperature <= 0:
        return logits.argmax()
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)[0]


class TextGenerationMixin:
    """``generate_text`` (the ``TextGenerator`` protocol) for a module with
    ``generate(ids (T0,), max_new_bytes, temperature, top_k, generator) -> (N,) new ids``."""

    def generate_text(
        self,
        prompts: list[str],
        max_new_bytes: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        seed: int | None = None,
    ) -> list[str]:
        """Continue each prompt; returns only the continuations. Greedy (deterministic) by default."""
        generator = torch.Generator(device=self.device).manual_seed(seed) if seed is not None else None
        return [decode(self.generate(encode(p), max_new_bytes, temperature, top_k, generator).cpu()) for p in prompts]
