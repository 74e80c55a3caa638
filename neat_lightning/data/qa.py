"""Question → answer pairs for the lattice: generated arithmetic and fact recall, plus local TSV files.

Generators are plain Python (no Lightning); :class:`QADataModule` wraps them.

- **arithmetic**: ``"What is 12 plus 7?" → "12 plus 7 is 19."`` with ``plus``, ``minus`` (never negative) and
  ``times``. Problems are split into train / held-out by a hash of the problem, so validation asks sums the model
  never saw.
- **facts**: a built-in table of capitals, chemical symbols and opposites,
  ``"What is the capital of France?" → "The capital of France is Paris."``. Recall is memorisation by nature, so every
  fact is in training and validation asks the same facts (it measures recall, not generalisation).
- **tsv_files**: local files of ``question<TAB>answer`` lines (``#`` comments and blank lines skipped), split by a
  hash of the question.

Batches are dicts ``{"question": (B, Lq) int64, "answer": (B, La + 2) int64}``: question bytes PAD-padded, answers as
``BOS + bytes + EOS`` PAD-padded (ids from :mod:`neat_lightning.codec`). Training batch ``k`` depends only on
``(seed, k, rank)`` and each epoch's iterator starts at the trainer's global step (as in
:mod:`neat_lightning.data.bytes`), so a run resumed mid-epoch sees exactly the batches of the uninterrupted run.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from neat_lightning.data.loading import (
    PlacedLoader,
    StepAlignedBatches,
    batch_generator,
    check_positive,
    resolve_paths,
)
from neat_lightning.codec import BOS_ID, EOS_ID, PAD_ID, encode

log = logging.getLogger(__name__)

Kind = Literal["arithmetic", "facts"]


@dataclass(frozen=True)
class QAPair:
    question: str
    answer: str
    kind: str  # "arithmetic", "facts" or "tsv"


# ----------------------------------------------------------------------------------------------------------------------
# generators

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi", "Russia": "Moscow", "Egypt": "Cairo",
    "Kenya": "Nairobi", "Canada": "Ottawa", "Mexico": "Mexico City", "Brazil": "Brasilia", "Peru": "Lima",
    "Chile": "Santiago", "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki", "Poland": "Warsaw",
    "Greece": "Athens", "Turkey": "Ankara", "Austria": "Vienna", "Ireland": "Dublin", "Cuba": "Havana",
    "Iran": "Tehran", "Iraq": "Baghdad", "Ghana": "Accra", "Nepal": "Kathmandu", "Vietnam": "Hanoi",
}
SYMBOLS = {
    "hydrogen": "H", "helium": "He", "carbon": "C", "nitrogen": "N", "oxygen": "O", "sodium": "Na",
    "iron": "Fe", "copper": "Cu", "silver": "Ag", "gold": "Au", "lead": "Pb", "tin": "Sn", "zinc": "Zn",
    "neon": "Ne", "calcium": "Ca", "potassium": "K", "mercury": "Hg", "sulfur": "S", "uranium": "U",
    "chlorine": "Cl",
}
OPPOSITES = {
    "hot": "cold", "big": "small", "up": "down", "fast": "slow", "light": "dark", "open": "closed",
    "early": "late", "full": "empty", "hard": "soft", "rich": "poor", "young": "old", "wet": "dry",
    "high": "low", "loud": "quiet", "strong": "weak", "long": "short", "left": "right", "true": "false",
    "near": "far", "thick": "thin",
}


def arithmetic_pairs(max_operand: int = 20, max_factor: int = 10) -> list[QAPair]:
    """All ``a plus b``, ``a minus b`` (a >= b) with operands in ``[0, max_operand)`` and ``a times b`` with factors
    in ``[0, max_factor)``."""
    pairs = []
    for a in range(max_operand):
        for b in range(max_operand):
            pairs.append(QAPair(f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.", "arithmetic"))
            if a >= b:
                pairs.append(QAPair(f"What is {a} minus {b}?", f"{a} minus {b} is {a - b}.", "arithmetic"))
    for a in range(max_factor):
        for b in range(max_factor):
            pairs.append(QAPair(f"What is {a} times {b}?", f"{a} times {b} is {a * b}.", "arithmetic"))
    return pairs


def fact_pairs() -> list[QAPair]:
    """The built-in fact table as question/answer pairs (80 facts)."""
    pairs = [QAPair(f"What is the capital of {c}?", f"The capital of {c} is {v}.", "facts") for c, v in CAPITALS.items()]
    pairs += [QAPair(f"What is the symbol for {e}?", f"The symbol for {e} is {s}.", "facts") for e, s in SYMBOLS.items()]
    pairs += [QAPair(f"What is the opposite of {w}?", f"The opposite of {w} is {o}.", "facts") for w, o in OPPOSITES.items()]
    return pairs


def tsv_pairs(patterns: Sequence[str], field: str = "tsv_files") -> list[QAPair]:
    """``question<TAB>answer`` lines of local files; a line without a tab raises naming the file and line."""
    pairs = []
    for path in resolve_paths(patterns, field):
        for i, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            if "\t" not in line:
                raise ValueError(f"{field}: {path}:{i} has no tab; expected 'question<TAB>answer'")
            question, answer = line.split("\t", 1)
            pairs.append(QAPair(question.strip(), answer.strip(), "tsv"))
    return pairs


def _unit(key: str, seed: int) -> float:
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def split_pairs(pairs: Sequence[QAPair], val_fraction: float, seed: int) -> tuple[list[QAPair], list[QAPair]]:
    """Deterministic split by a hash of the question: arithmetic and TSV pairs go to exactly one side; facts go to
    both (recall is tested on facts that were taught)."""
    train, val = [], []
    for p in pairs:
        if p.kind == "facts":
            train.append(p)
            val.append(p)
        elif _unit(p.question, seed) < val_fraction:
            val.append(p)
        else:
            train.append(p)
    return train, val


def encode_pairs(
    pairs: Sequence[QAPair], max_question_bytes: int, max_answer_bytes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs -> ``(questions (N, Lq), answers (N, La + 2))`` int64, PAD-padded; answers framed by BOS/EOS.

    Longer questions keep their *last* ``max_question_bytes`` bytes (the question mark end matters most); longer
    answers are cut (their EOS is kept).
    """
    q = torch.full((len(pairs), max_question_bytes), PAD_ID, dtype=torch.long)
    a = torch.full((len(pairs), max_answer_bytes + 2), PAD_ID, dtype=torch.long)
    for i, p in enumerate(pairs):  # once per pair at setup, not per step
        qi = encode(p.question)[-max_question_bytes:]
        q[i, : len(qi)] = qi
        ai = torch.cat([torch.tensor([BOS_ID]), encode(p.answer)[:max_answer_bytes], torch.tensor([EOS_ID])])
        a[i, : len(ai)] = ai
    return q, a


# ----------------------------------------------------------------------------------------------------------------------
# datasets


class RandomPairBatches(StepAlignedBatches):
    """``batch_size`` random pairs per batch; batch ``k`` on ``rank`` is a pure function of ``(seed, k, rank)``."""

    def __init__(self, questions: torch.Tensor, answers: torch.Tensor, batch_size: int, batches_per_epoch: int, seed: int):
        super().__init__(batches_per_epoch)
        self.questions, self.answers = questions, answers
        self.batch_size, self.seed = batch_size, seed

    def batch(self, k: int) -> dict[str, torch.Tensor]:
        idx = torch.randint(len(self.questions), (self.batch_size,), generator=batch_generator(self.seed, k, self.rank))
        return {"question": self.questions[idx], "answer": self.answers[idx]}



class SequentialPairBatches(IterableDataset):
    """Every pair once, in order, dealt to ranks round-robin."""

    def __init__(self, questions: torch.Tensor, answers: torch.Tensor, batch_size: int):
        super().__init__()
        self.questions, self.answers, self.batch_size = questions, answers, batch_size
        self.rank, self.world_size = 0, 1

    def __len__(self) -> int:
        n = len(self.questions[self.rank :: self.world_size])
        return (n + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        q, a = self.questions[self.rank :: self.world_size], self.answers[self.rank :: self.world_size]
        for b in range(worker, len(self), n_workers):
            sl = slice(b * self.batch_size, (b + 1) * self.batch_size)
            yield {"question": q[sl], "answer": a[sl]}


# ----------------------------------------------------------------------------------------------------------------------
# the DataModule


class QADataModule(L.LightningDataModule):
    """Question/answer batches from generated arithmetic, a built-in fact table and local TSV files.

    Args:
        kinds: generated kinds to include: ``"arithmetic"`` and/or ``"facts"``.
        tsv_files: local ``question<TAB>answer`` files or globs to add.
        max_operand: arithmetic operands of ``plus``/``minus`` are in ``[0, max_operand)``.
        max_factor: factors of ``times`` are in ``[0, max_factor)``.
        max_question_bytes: question width Lq (longer questions keep their end).
        max_answer_bytes: answer width La (longer answers are cut).
        batch_size: pairs per training batch.
        batches_per_epoch: training batches per epoch and rank.
        val_fraction: share of arithmetic/TSV problems held out for validation.
        val_batch_size: pairs per validation batch.
        max_val_pairs: cap on validation pairs (a deterministic shuffle keeps both kinds), None for all.
        seed: seed of the training batches.
        split_seed: seed of the train/val split.
    """

    def __init__(
        self,
        kinds: list[Kind] | None = None,
        tsv_files: list[str] | None = None,
        max_operand: int = 20,
        max_factor: int = 10,
        max_question_bytes: int = 48,
        max_answer_bytes: int = 40,
        batch_size: int = 32,
        batches_per_epoch: int = 1000,
        val_fraction: float = 0.1,
        val_batch_size: int = 64,
        max_val_pairs: int | None = 256,
        seed: int = 1234,
        split_seed: int = 0,
    ) -> None:
        super().__init__()
        kinds = ["arithmetic", "facts"] if kinds is None else list(kinds)
        for kind in kinds:
            if kind not in ("arithmetic", "facts"):
                raise ValueError(f"kinds contains {kind!r}; allowed: 'arithmetic', 'facts'")
        if not kinds and not tsv_files:
            raise ValueError("kinds=[] and no tsv_files: there would be no question/answer pairs")
        check_positive(max_operand=max_operand, max_factor=max_factor, max_question_bytes=max_question_bytes,
                       max_answer_bytes=max_answer_bytes, batch_size=batch_size, batches_per_epoch=batches_per_epoch,
                       val_batch_size=val_batch_size)
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction={val_fraction} must be in (0, 1)")
        if max_val_pairs is not None and max_val_pairs < 1:
            raise ValueError(f"max_val_pairs={max_val_pairs} must be >= 1 or None")
        self.save_hyperparameters()
        self.kinds, self.tsv_files = kinds, tsv_files
        self.max_operand, self.max_factor = max_operand, max_factor
        self.max_question_bytes, self.max_answer_bytes = max_question_bytes, max_answer_bytes
        self.batch_size, self.batches_per_epoch = batch_size, batches_per_epoch
        self.val_fraction, self.val_batch_size, self.max_val_pairs = val_fraction, val_batch_size, max_val_pairs
        self.seed, self.split_seed = seed, split_seed
        self.train_pairs: list[QAPair] = []
        self.val_pairs: list[QAPair] = []

    def all_pairs(self) -> list[QAPair]:
        pairs: list[QAPair] = []
        if "arithmetic" in self.kinds:
            pairs += arithmetic_pairs(self.max_operand, self.max_factor)
        if "facts" in self.kinds:
            pairs += fact_pairs()
        if self.tsv_files:
            pairs += tsv_pairs(self.tsv_files)
        return pairs

    def setup(self, stage: str | None = None) -> None:
        if self.train_pairs:
            return
        train, val = split_pairs(self.all_pairs(), self.val_fraction, self.split_seed)
        if not train or not val:
            raise ValueError(f"the split left {len(train)} train and {len(val)} val pairs; add data or change "
                             f"val_fraction={self.val_fraction}")
        order = torch.randperm(len(val), generator=torch.Generator().manual_seed(self.split_seed)).tolist()
        val = [val[i] for i in order][: self.max_val_pairs]
        self.train_pairs, self.val_pairs = train, val
        self.train_q, self.train_a = encode_pairs(train, self.max_question_bytes, self.max_answer_bytes)
        self.val_q, self.val_a = encode_pairs(val, self.max_question_bytes, self.max_answer_bytes)
        log.info("QA data: %d train pairs, %d val pairs", len(train), len(val))

    def validation_pairs(self, n: int | None = None) -> list[tuple[str, str]]:
        """The first ``n`` validation (question, answer) pairs — fixed prompts for the BLEU monitor."""
        self.setup()
        return [(p.question, p.answer) for p in self.val_pairs[:n]]

    # -- loaders ---------------------------------------------------------------------------------------------------

    def _place(self, ds: IterableDataset) -> None:
        trainer = self.trainer
        if trainer is not None:
            ds.rank, ds.world_size = trainer.global_rank, trainer.world_size
            if isinstance(ds, RandomPairBatches):
                ds.start_batch = trainer.global_step * trainer.accumulate_grad_batches

    def _loader(self, ds: IterableDataset) -> DataLoader:
        self._place(ds)
        return PlacedLoader(ds, self._place, num_workers=0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(
            RandomPairBatches(self.train_q, self.train_a, self.batch_size, self.batches_per_epoch, self.seed)
        )

    def val_dataloader(self) -> DataLoader:
        return self._loader(SequentialPairBatches(self.val_q, self.val_a, self.val_batch_size))

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
