"""What one NeatModel forward returns (:class:`NeatOutput`) and the validation metrics accumulated from it.

Validation sums (nats and bytes, exact-match completions per task type, dispatcher hits, MVoT accuracies) are
``torchmetrics`` states: summed over steps, and over ranks when they are computed, then reset every epoch.

Shapes: ``B`` batch, ``T`` positions, ``V`` vocabulary, ``P`` patches, ``K`` task types.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn
from torchmetrics import Metric

from neat_lightning.components.mvot import MVoTLosses
from neat_lightning.components.neat_backbone import BackboneOutput


class NeatOutput(NamedTuple):
    """One batch through :meth:`NeatModel.loss_terms`."""

    loss: torch.Tensor  # () weighted next-byte cross-entropy (+ λ L_D + decision BCE while MVoT is active)
    nats: torch.Tensor  # (B, T) per-target cross-entropy, nats
    valid: torch.Tensor  # (B, T) bool, targets that are not PAD
    logits: torch.Tensor  # (B, T, V)
    seg: torch.Tensor | None  # (B, T) completion index of each target (k >= 1), 0 elsewhere; None without answers
    task: torch.Tensor | None  # (B,) task type of each row, or None
    backbone: BackboneOutput  # hidden (B, T, C) per position, memory states, surprise stats
    patch_lengths: torch.Tensor | None = None  # (B, P) BLT patch lengths, padded with 0 (BLT front end only)
    mvot: MVoTLosses | None = None  # while the MVoT path is active
    dispatch_loss: torch.Tensor | None = None  # () dispatcher cross-entropy (SVF active, labels given)
    dispatch_acc: torch.Tensor | None = None  # (B',) float hits over the rows that have an expert


def exact_match_counts(
    logits: torch.Tensor, targets: torch.Tensor, seg: torch.Tensor, task: torch.Tensor, n_tasks: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy-equivalent exact match of every completion, counted per task type.

    Args:
        logits: (B, T, V) next-byte logits.
        targets: (B, T) target ids.
        seg: (B, T) completion index of each target (``k >= 1``), 0 elsewhere.
        task: (B,) task type of each row.
        n_tasks: number of task types.

    Returns:
        correct (n_tasks,) and total (n_tasks,) completion counts, float64.
    """
    b = seg.shape[0]
    n_seg = int(seg.max()) + 1 if seg.numel() else 1
    ok = (logits.argmax(dim=-1) == targets) | (seg == 0)
    gid = (torch.arange(b, device=seg.device)[:, None] * n_seg + seg).reshape(-1)  # (B·T,) unique per completion
    all_ok = torch.ones(b * n_seg, dtype=torch.long, device=seg.device)
    all_ok = all_ok.scatter_reduce(0, gid, ok.reshape(-1).long(), reduce="amin")
    present = torch.zeros(b * n_seg, dtype=torch.bool, device=seg.device)
    present[gid[seg.reshape(-1) > 0]] = True
    row_task = task.repeat_interleave(n_seg)
    correct = torch.zeros(n_tasks, dtype=torch.float64, device=seg.device)
    total = torch.zeros(n_tasks, dtype=torch.float64, device=seg.device)
    correct.index_add_(0, row_task[present], all_ok[present].double())
    total.index_add_(0, row_task[present], torch.ones_like(all_ok[present], dtype=torch.float64))
    return correct, total


class SumRatio(Metric):
    """A numerator and a denominator of any fixed shape, each summed over steps and ranks (float64).

    ``compute()`` returns both sums; the ratio is the caller's, who also decides what an empty denominator means.
    """

    full_state_update = False

    def __init__(self, shape: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.add_state("num", default=torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("den", default=torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, num: torch.Tensor, den: torch.Tensor) -> None:
        self.num += torch.as_tensor(num, device=self.num.device).double()
        self.den += torch.as_tensor(den, device=self.den.device).double()

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.num, self.den


class NeatValidationMetrics(nn.Module):
    """NeatModel's validation metrics; :meth:`results` names them as logged (``val/loss``, ``val/bpb``, ...).

    Args:
        task_names: the data's task types, in index order (``val/exact_match/<task>``).
    """

    def __init__(self, task_names: tuple[str, ...]) -> None:
        super().__init__()
        self.task_names = tuple(task_names)
        self.nats = SumRatio()  # nats / bytes
        self.exact_match = SumRatio((len(self.task_names),))  # correct / total completions per task type
        self.dispatch = SumRatio()  # dispatcher hits / rows
        self.visual = SumRatio()  # argmax hits / visual targets
        self.loss_d = SumRatio()  # L_D * visual targets / visual targets
        self.decision = SumRatio()  # decision-head hits / decided positions

    def update(self, out: NeatOutput, targets: torch.Tensor) -> None:
        """Add one batch: ``out`` from ``loss_terms`` and its (B, T) target ids.

        Every metric is updated on every batch (with zeros when the batch has nothing for it), so every rank runs
        the same reductions when the epoch's metrics are computed.
        """
        zero = torch.zeros((), dtype=torch.float64)
        self.nats.update((out.nats * out.valid).sum(), out.valid.sum())
        if out.seg is not None and out.task is not None:
            self.exact_match.update(*exact_match_counts(out.logits, targets, out.seg, out.task, len(self.task_names)))
        else:
            self.exact_match.update(zero, zero)
        if out.dispatch_acc is not None:
            self.dispatch.update(out.dispatch_acc.sum(), out.dispatch_acc.numel())
        else:
            self.dispatch.update(zero, zero)
        m = out.mvot
        if m is not None:
            self.visual.update(m.visual_correct, m.visual_total)
            self.loss_d.update(m.loss_d.detach().double() * m.visual_total.double(), m.visual_total)
            self.decision.update(m.decision_correct, m.decision_total)
        else:
            for metric in (self.visual, self.loss_d, self.decision):
                metric.update(zero, zero)

    def results(self) -> dict[str, torch.Tensor]:
        """The epoch's metrics (float32 scalars) by logged name; empty when no byte was seen. Resets the sums."""
        out: dict[str, torch.Tensor] = {}
        nats, n_bytes = self.nats.compute()
        if n_bytes > 0:
            loss = nats / n_bytes
            out["val/loss"] = loss.float()
            out["val/bpb"] = (loss / math.log(2)).float()
            correct, total = self.exact_match.compute()
            if total.sum() > 0:
                out["val/exact_match"] = (correct.sum() / total.sum()).float()
                for i, name in enumerate(self.task_names):
                    if total[i] > 0:
                        out[f"val/exact_match/{name}"] = (correct[i] / total[i]).float()
            for name, metric in (("val/dispatch_acc", self.dispatch), ("val/visual_acc", self.visual),
                                 ("val/loss_d", self.loss_d), ("val/decision_acc", self.decision)):
                num, den = metric.compute()
                if den > 0:
                    out[name] = (num / den).float()
        for metric in self.children():
            metric.reset()
        return out
