"""The base class of every neat_lightning LightningModule: structural state that survives checkpoints.

Some changes happen to a module *during* training — LoRA adapters injected by a callback, a lattice grown to a new
size, components switched on. A checkpoint must rebuild them with ``Module.load_from_checkpoint(path)`` alone, so
each change is recorded in ``module.structure`` (plain, picklable values), written to the checkpoint under
``"neat_structure"`` and replayed by :meth:`ResumableModule.restore_structure` before the weights are loaded (Lightning calls
``on_load_checkpoint`` before ``load_state_dict``, both in ``load_from_checkpoint`` and on ``--ckpt_path`` resume).
"""

from __future__ import annotations

import io
import logging
import math
import random
import zipfile
from pathlib import Path
from typing import Any, TypeVar

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn

from neat_lightning.components.lora import restore_lora

log = logging.getLogger(__name__)

STRUCTURE_KEY = "neat_structure"
RNG_KEY = "neat_rng_states"
FORMAT_KEY = "neat_format"
# Checkpoint format. 1: flat NeatModel svf_*/mvot_* arguments, flat LatticeNetwork arguments, BLTConfig with copied
# patcher fields. 2: typed config groups (SVFConfig, MVoTConfig, LatticeNetwork's groups, BLTConfig.patcher).
FORMAT = 2

T = TypeVar("T", bound="ResumableModule")

def rng_states() -> dict[str, Any]:
    """The process's random states (torch CPU/CUDA, Python): what dropout and sampling consume."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
    }


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if states.get("cuda") and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])
    random.setstate(states["python"])


def check_checkpoint_file(path: str | Path, what: str = "checkpoint") -> None:
    """Raise a clear error unless ``path`` is a complete torch checkpoint (a zip archive with its central
    directory: a truncated or half-copied file fails here instead of deep inside ``torch.load``)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{what}: no such file: {str(path)!r}")
    if p.is_dir():
        raise IsADirectoryError(f"{what}: {str(path)!r} is a directory, not a checkpoint file")
    if not zipfile.is_zipfile(p):
        raise ValueError(
            f"{what}: {str(path)!r} is not a complete checkpoint ({p.stat().st_size} bytes; truncated, corrupt, "
            "or not written by torch.save)"
        )


def mismatched_hparams(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``field: checkpoint=X, config=Y`` for every hyperparameter whose value differs."""
    return [
        f"{k}: checkpoint={saved[k]!r}, config={current[k]!r}"
        for k in sorted(set(saved) & set(current))
        if saved[k] != current[k]
    ]


def upgrade_checkpoint(checkpoint: dict[str, Any], cls: type[ResumableModule], source: str = "checkpoint") -> list[str]:
    """Bring ``checkpoint`` (a loaded dict) to :data:`FORMAT` in place with ``cls.upgrade_format``.

    Returns one line per change made (empty when it already was current). A checkpoint written by a newer version
    is refused, naming ``source`` and both format numbers.
    """
    found = int(checkpoint.get(FORMAT_KEY, 1))
    if found > FORMAT:
        raise ValueError(
            f"{source}: checkpoint format {found} was written by a newer neat_lightning; this version reads formats "
            f"up to {FORMAT}. Upgrade neat_lightning to load it."
        )
    changes = cls.upgrade_format(checkpoint, found) if found < FORMAT else []
    checkpoint[FORMAT_KEY] = FORMAT
    return changes


def load_frozen(cls: type[T], path: Any, field: str, hint: str = "") -> T:
    """A ``cls`` checkpoint at ``path`` in eval mode with no gradients, on the CPU: the one loader of every frozen
    part (BLT's entropy model, MVoT's VQ-VAE, the command-line tools' models).

    Args:
        cls: the LightningModule class the checkpoint must hold.
        path: the checkpoint file.
        field: the config field or option that named ``path``; every error message starts with it.
        hint: appended to every error (how to get a suitable checkpoint).

    Raises:
        ValueError / FileNotFoundError / IsADirectoryError: ``path`` is empty, missing, a folder, truncated, or holds
        another module class or an incompatible configuration.
    """
    tail = f"; {hint}" if hint else ""
    if not isinstance(path, (str, Path)) or not str(path):
        raise ValueError(f"{field}={path!r} must be the path of a {cls.__name__} checkpoint{tail}")
    try:
        check_checkpoint_file(path, field)
    except (FileNotFoundError, IsADirectoryError, ValueError) as err:
        raise type(err)(f"{err}{tail}") from None
    with torch.random.fork_rng(devices=[]):  # loading must not shift the random stream of the model being built
        try:
            module = cls.load_from_checkpoint(path, map_location="cpu")
        except (TypeError, KeyError, RuntimeError, ValueError) as err:
            first = (str(err).strip().splitlines() or [""])[0]
            raise ValueError(
                f"{field}={str(path)!r} does not hold a loadable {cls.__name__} checkpoint "
                f"({type(err).__name__}: {first}){tail}"
            ) from err
    return module.eval().requires_grad_(False)


class ResumableModule(L.LightningModule):
    """LightningModule whose structural changes are saved with and replayed from checkpoints.

    Subclasses that override ``on_save_checkpoint`` / ``on_load_checkpoint`` call ``super()``. Their own
    structural state (e.g. a grown lattice) is an entry in ``self.structure`` that their ``restore_structure``
    rebuilds, or simply lives in ``hparams`` when it is known at construction.
    """

    def __init__(self) -> None:
        super().__init__()
        self.structure: dict[str, Any] = {}

    def record_structure(self, name: str, state: Any) -> None:
        """Record (or with ``state=None`` forget) a structural change so checkpoints carry it."""
        if state is None:
            self.structure.pop(name, None)
        else:
            self.structure[name] = state

    @classmethod
    def upgrade_format(cls, checkpoint: dict[str, Any], found: int) -> list[str]:
        """Rewrite a checkpoint of format ``found`` (< :data:`FORMAT`) in place: hyperparameter names and
        state-dict keys. Returns what changed, one line each. Subclasses whose arguments changed extend this."""
        return []

    def restore_structure(self, name: str, state: Any) -> None:
        """Rebuild the structural change ``name`` recorded with ``state`` before the weights load.

        The base class rebuilds LoRA adapters (recorded by ``LoRAFinalStage`` under ``"lora"``) for every module.
        A subclass that records its own changes overrides this, handles its names and passes the rest to ``super()``.
        """
        if name == "lora":
            restore_lora(self, state)
            return
        raise ValueError(f"the checkpoint records structural change {name!r} that {type(self).__name__} cannot rebuild")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[FORMAT_KEY] = FORMAT
        hparams = checkpoint.get(self.CHECKPOINT_HYPER_PARAMS_KEY)
        if hparams is not None and "_class_path" not in hparams:
            # LightningCLI records the class of the modules it builds; a checkpoint written by a plain Trainer (the
            # benchmarks) records it here, so `neat test --ckpt_path` reads its hyperparameters as this class's.
            # A new dict: Lightning may have put the module's own hparams object here.
            path = f"{type(self).__module__}.{type(self).__qualname__}"
            checkpoint[self.CHECKPOINT_HYPER_PARAMS_KEY] = {**hparams, "_class_path": path}
        if self.structure:
            checkpoint[STRUCTURE_KEY] = dict(self.structure)
        # Lightning does not checkpoint random states; without them a resumed run draws other dropout masks.
        # Ranks seed identically and consume identically, so rank 0's states serve every rank.
        checkpoint[RNG_KEY] = rng_states()

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, *args: Any, **kwargs: Any):  # type: ignore[override]
        """Lightning's ``load_from_checkpoint`` with a clear error for a missing, truncated or corrupt file."""
        if isinstance(checkpoint_path, (str, Path)) and "://" not in str(checkpoint_path):
            check_checkpoint_file(checkpoint_path)
            # mmap: reading the format number does not load the tensors
            checkpoint = torch.load(checkpoint_path, map_location="cpu", mmap=True, weights_only=False)
            changes = upgrade_checkpoint(checkpoint, cls, str(checkpoint_path))
            if changes:
                log.warning(
                    "%s is an older checkpoint format, upgraded in memory (%s). Write the upgraded file once with "
                    "`neat convert-ckpt %s OUT.ckpt --model %s`.",
                    checkpoint_path, "; ".join(changes), checkpoint_path, cls.__name__,
                )
                buffer = io.BytesIO()
                torch.save(checkpoint, buffer)
                buffer.seek(0)
                checkpoint_path = buffer
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    def on_before_backward(self, loss) -> None:
        value = float(loss.detach())
        if not math.isfinite(value):
            step = self.trainer.global_step if self._trainer is not None else "?"
            raise FloatingPointError(
                f"{type(self).__name__}: the training loss is {value} at global step {step}. Training stops before "
                "the non-finite value reaches the weights; the last checkpoint is intact. Lower the learning rate, "
                "clip gradients (--trainer.gradient_clip_val) or check the data."
            )

    def _check_shapes(self, checkpoint: dict[str, Any]) -> None:
        """A checkpoint whose tensors do not fit this module fails with the config fields that differ."""
        own = self.state_dict()
        bad = [
            f"{k} {tuple(v.shape)} in checkpoint vs {tuple(own[k].shape)} here"
            for k, v in checkpoint.get("state_dict", {}).items()
            if k in own and hasattr(v, "shape") and tuple(v.shape) != tuple(own[k].shape)
        ]
        if bad:
            fields = mismatched_hparams(checkpoint.get("hyper_parameters", {}), dict(self.hparams))
            raise ValueError(
                f"the checkpoint does not match this {type(self).__name__}'s configuration. Differing fields: "
                f"{'; '.join(fields) or 'none recorded'}. First mismatched tensor: {bad[0]}"
                + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "")
            )

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        upgrade_checkpoint(checkpoint, type(self))  # a --ckpt_path resume of an older file: state-dict keys
        if RNG_KEY in checkpoint and self._trainer is not None and self.trainer.state.fn == TrainerFn.FITTING:
            set_rng_states(checkpoint[RNG_KEY])  # resuming a fit; plain load_from_checkpoint leaves RNGs alone
        for name, state in checkpoint.get(STRUCTURE_KEY, {}).items():
            if name in self.structure and self.structure[name] == state:
                continue  # already in this shape (e.g. resuming in the same process)
            self.restore_structure(name, state)
            self.record_structure(name, state)
        self._check_shapes(checkpoint)
