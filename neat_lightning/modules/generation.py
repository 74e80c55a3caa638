"""``generate_text`` (the ``TextGenerator`` protocol) shared by the byte-level modules."""

from __future__ import annotations

import torch

from neat_lightning.codec import decode, encode


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
