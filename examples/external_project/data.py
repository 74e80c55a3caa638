"""The external project's own data: lines like ``copy: apple -> apple`` as (B, T + 1) byte windows."""

from __future__ import annotations

import random

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from neat_lightning.codec import PAD_ID, encode

WORDS = ["apple", "river", "stone", "cloud", "maple", "tiger", "ocean", "piano", "lemon", "robot", "candle", "forest"]


def line(word: str) -> str:
    return f"copy: {word} -> {word}\n"


class CopyLines(Dataset):
    def __init__(self, n: int, block_size: int, seed: int) -> None:
        rng = random.Random(seed)
        self.rows = []
        for _ in range(n):
            text = "".join(line(rng.choice(WORDS)) for _ in range(6))
            ids = encode(text)[: block_size + 1]
            row = torch.full((block_size + 1,), PAD_ID, dtype=torch.long)
            row[: len(ids)] = ids
            self.rows.append(row)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.rows[i]


class CopyDataModule(L.LightningDataModule):
    def __init__(self, block_size: int = 64, batch_size: int = 16) -> None:
        super().__init__()
        self.block_size, self.batch_size = block_size, batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(CopyLines(512, self.block_size, seed=0), batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(CopyLines(32, self.block_size, seed=1), batch_size=self.batch_size)

    @staticmethod
    def prompts_and_references() -> tuple[list[str], list[str]]:
        return [f"copy: {w} -> " for w in WORDS], WORDS
