"""DecoderBLEUMonitor: corpus BLEU of generated answers on fixed validation prompts, every N training steps.

Works with any LightningModule implementing the ``TextGenerator`` protocol (``generate_text(prompts,
max_new_bytes)``): the lattice, ByteLM, NeatModel. Prompts and references come from the callback's arguments or,
when those are not given, from the datamodule's ``validation_pairs(n)`` (as :class:`~neat_lightning.data.QADataModule`
provides).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn

from neat_lightning.protocols import PromptSource, TextGenerator, missing_methods, require

log = logging.getLogger(__name__)


def corpus_bleu(hypotheses: list[str], references: list[str]) -> float:
    """sacrebleu corpus BLEU (0–100, 13a tokenisation, exponential smoothing), one reference per hypothesis."""
    import sacrebleu

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    return float(sacrebleu.corpus_bleu(hypotheses, [references]).score)


def exact_match(hypotheses: list[str], references: list[str]) -> float:
    """Fraction of hypotheses equal to their reference after stripping surrounding whitespace."""
    if not references:
        return 0.0
    return sum(h.strip() == r.strip() for h, r in zip(hypotheses, references)) / len(references)


class DecoderBLEUMonitor(Callback):
    """Every ``every_n_steps`` optimiser steps, generate answers for fixed prompts and log their corpus BLEU.

    Logged: ``val/bleu`` (sacrebleu, 0–100), ``val/exact_match``, and ``bleu/overhead``: the monitor's own wall time
    as a fraction of the training time so far (from the start of fit).

    Args:
        every_n_steps: run after every this many optimiser steps (and never at step 0).
        prompts: fixed prompts; None takes them from ``trainer.datamodule.validation_pairs(n_prompts)``.
        references: one reference per prompt (required with ``prompts``).
        n_prompts: how many datamodule pairs to use when ``prompts`` is None.
        max_new_bytes: generation length per prompt.
        stop_above: stop training once BLEU reaches this value (None: never).
        alert_below: warn (and log ``bleu/alert`` = 1) when BLEU falls below this value after having been above it.
        on_end: also score once when training ends.

    Attributes:
        history: list of ``(global_step, bleu)`` pairs, saved in checkpoints.

    Raises:
        TypeError: in ``setup`` if the module does not implement ``TextGenerator``.
        ValueError: for bad arguments, or in ``setup`` when no prompts can be found.

    Example::

        trainer = L.Trainer(callbacks=[DecoderBLEUMonitor(every_n_steps=50, stop_above=60.0)])
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        prompts: list[str] | None = None,
        references: list[str] | None = None,
        n_prompts: int = 32,
        max_new_bytes: int = 48,
        stop_above: float | None = None,
        alert_below: float | None = None,
        on_end: bool = True,
    ) -> None:
        super().__init__()
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps={every_n_steps} must be >= 1")
        if n_prompts < 1:
            raise ValueError(f"n_prompts={n_prompts} must be >= 1")
        if max_new_bytes < 1:
            raise ValueError(f"max_new_bytes={max_new_bytes} must be >= 1")
        if (prompts is None) != (references is None):
            raise ValueError("give both prompts and references, or neither (then the datamodule provides them)")
        if prompts is not None and len(prompts) != len(references):
            raise ValueError(f"prompts has {len(prompts)} entries but references has {len(references)}")
        if prompts is not None and not prompts:
            raise ValueError("prompts=[]: need at least one prompt")
        self.every_n_steps, self.n_prompts, self.max_new_bytes = every_n_steps, n_prompts, max_new_bytes
        self.prompts, self.references = prompts, references
        self.stop_above, self.alert_below, self.on_end = stop_above, alert_below, on_end
        self.history: list[tuple[int, float]] = []
        self.monitor_seconds = 0.0
        self._fit_start: float | None = None
        self._train_seconds_before = 0.0  # training time of earlier (resumed-from) runs
        self._alerted = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(every_n_steps=self.every_n_steps)

    # -- hooks -----------------------------------------------------------------------------------------------------

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        require(pl_module, TextGenerator, self)
        if self.prompts is None:
            source = trainer.datamodule
            if source is None or missing_methods(source, PromptSource):
                raise ValueError(
                    f"{type(self).__name__} got no prompts and the datamodule "
                    f"{type(source).__name__ if source is not None else None} has no `validation_pairs(n)`; "
                    "pass prompts= and references="
                )
            pairs = source.validation_pairs(self.n_prompts)
            if not pairs:
                raise ValueError(f"{type(source).__name__}.validation_pairs({self.n_prompts}) returned no pairs")
            self.prompts = [q for q, _ in pairs]
            self.references = [a for _, a in pairs]

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fit_start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step == 0 or step % self.every_n_steps or (self.history and self.history[-1][0] == step):
            return
        self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.on_end and (not self.history or self.history[-1][0] != trainer.global_step):
            self.evaluate(trainer, pl_module, log_metrics=False)

    # -- scoring ---------------------------------------------------------------------------------------------------

    def score(self, pl_module: L.LightningModule) -> tuple[float, float, list[str]]:
        """Generate for the fixed prompts -> ``(bleu, exact_match, hypotheses)``."""
        hyps = pl_module.generate_text(list(self.prompts), self.max_new_bytes)
        return corpus_bleu(hyps, list(self.references)), exact_match(hyps, list(self.references)), hyps

    def training_seconds(self) -> float:
        now = time.perf_counter()
        return self._train_seconds_before + (now - self._fit_start if self._fit_start is not None else 0.0)

    def overhead(self) -> float:
        """Monitor time / training time so far (0 before training starts)."""
        total = self.training_seconds()
        return self.monitor_seconds / total if total > 0 else 0.0

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, log_metrics: bool = True) -> float:
        start = time.perf_counter()
        bleu, em, _ = self.score(pl_module)
        self.monitor_seconds += time.perf_counter() - start
        step = trainer.global_step
        self.history.append((step, bleu))
        if log_metrics:
            pl_module.log("val/bleu", bleu, on_step=True, on_epoch=False)
            pl_module.log("val/exact_match_gen", em, on_step=True, on_epoch=False)
            pl_module.log("bleu/overhead", self.overhead(), on_step=True, on_epoch=False)
        log.info("step %d: BLEU %.2f, exact match %.3f, monitor overhead %.2f%%", step, bleu, em, 100 * self.overhead())
        if self.stop_above is not None:
            # like EarlyStopping: every rank takes the same decision (any rank reaching the target stops them all)
            stop = trainer.strategy.reduce_boolean_decision(bleu >= self.stop_above, all=False)
            if stop:
                log.info("BLEU %.2f >= stop_above=%.2f: stopping", bleu, self.stop_above)
            trainer.should_stop = trainer.should_stop or stop
        if self.alert_below is not None:
            above_before = any(b >= self.alert_below for _, b in self.history[:-1])
            alert = bleu < self.alert_below and above_before
            if alert and not self._alerted:
                rank_zero_warn(f"{type(self).__name__}: BLEU fell to {bleu:.2f}, under alert_below={self.alert_below}"
                               f" (step {step})")
            self._alerted = alert
            if log_metrics:
                pl_module.log("bleu/alert", float(alert), on_step=True, on_epoch=False)
        return bleu

    # -- state -----------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "history": [list(h) for h in self.history],
            "monitor_seconds": self.monitor_seconds,
            "train_seconds": self.training_seconds(),
            "alerted": self._alerted,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [(int(s), float(b)) for s, b in state_dict.get("history", [])]
        self.monitor_seconds = float(state_dict.get("monitor_seconds", 0.0))
        self._train_seconds_before = float(state_dict.get("train_seconds", 0.0))
        self._alerted = bool(state_dict.get("alerted", False))
