"""The ``neat`` command: LightningCLI for fit/validate/test/predict, plus extra subcommands.

    neat fit --config configs/byte_lm.yaml
    neat validate --config configs/byte_lm_quickstart.yaml --ckpt_path runs/quickstart/checkpoints/last.ckpt
    neat fit --config configs/byte_lm.yaml --ckpt_path last          # resume runs/<run_name>/checkpoints/last.ckpt
    neat patch --ckpt runs/quickstart/checkpoints/last.ckpt --input some.txt

Every run writes under ``<runs_dir>/<run_name>/``: ``checkpoints/`` (``last.ckpt`` plus the best/latest), and one
``version_N/`` per invocation holding TensorBoard events, ``metrics.csv`` and the resolved ``config.yaml``.
``run_name`` defaults to the stem of the first ``--config`` file. Process-wide settings live here, not in modules.
"""

from __future__ import annotations

import importlib
import importlib.util
import os

# LightningCLI 2.6 still calls jsonargparse APIs deprecated in 4.49; the warning is not actionable for users
os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")
import re
import sys
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

COMMANDS_PACKAGE = "neat_lightning.commands"
LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")


def configure_process() -> None:
    """Process-wide settings (never set inside modules)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # nothing is downloaded at run time
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_float32_matmul_precision("high")  # TF32 matmuls on Ampere+; no effect on CPU
    # sampled windows make an epoch a convention; these hints do not apply to our iterable loaders
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*Checkpoint directory .* exists and is not empty.*")
    warnings.filterwarnings("ignore", message=r".*could not determine the length.*")
    warnings.filterwarnings("ignore", message=r".*`IterableDataset` has `__len__` defined.*")  # we shard per worker
    warnings.filterwarnings("ignore", message=r".*Experiment logs directory .* exists and is not empty.*")
    warnings.filterwarnings("ignore", message=r".*`isinstance\(treespec, LeafSpec\)` is deprecated.*")


def import_all_callbacks() -> None:
    """Import every shipped callback so ``--trainer.callbacks+=ShortName`` resolves (jsonargparse looks among
    imported subclasses)."""
    from neat_lightning import callbacks

    for name in callbacks.__all__:
        try:
            getattr(callbacks, name)
        except ImportError:  # a callback whose module has not landed yet
            pass


def next_version(root: Path) -> int:
    versions = [int(m.group(1)) for p in root.glob("version_*") if (m := re.fullmatch(r"version_(\d+)", p.name))]
    return max(versions, default=-1) + 1


class NeatCLI(LightningCLI):
    """LightningCLI with subclass modes for models and data, a ``run_name``-scoped output directory, a
    ``last.ckpt``-saving ModelCheckpoint and TensorBoard + CSV loggers by default."""

    def __init__(self, args=None, run: bool = True, **kwargs) -> None:
        kwargs.setdefault("seed_everything_default", 1337)
        # each invocation logs into a fresh version_N, so overwriting can only hit a config we write ourselves
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(
            L.LightningModule,
            L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=args,
            run=run,
            **kwargs,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--run_name", type=str | None, default=None,
                            help="Outputs go to <runs_dir>/<run_name>/; default: the first --config file's stem.")
        parser.add_argument("--runs_dir", type=str, default="runs", help="Parent directory of all runs.")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.dirpath": None})

    # -- run directory ---------------------------------------------------------------------------------------------

    def _cfg(self):
        return self.config[self.subcommand] if self.subcommand else self.config

    def run_root(self) -> tuple[Path, str]:
        cfg = self._cfg()
        name = cfg.get("run_name")
        if not name:
            configs = cfg.get("config") or []
            name = Path(str(configs[0])).stem if configs else "default"
        return Path(cfg.get("runs_dir") or "runs"), name

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        super().parse_arguments(parser, args)
        # LightningCLI reads --ckpt_path's hyperparameters right after parsing, with a bare torch.load: check the
        # file first so a truncated or missing checkpoint is named before anything else happens
        sub = self.config.get("subcommand")
        ckpt = self.config[sub].get("ckpt_path") if sub else None
        if ckpt is not None and str(ckpt) not in ("last", "best", "hpc", "registry"):
            from neat_lightning.modules.base import check_checkpoint_file

            check_checkpoint_file(ckpt, "--ckpt_path")

    def before_instantiate_classes(self) -> None:
        cfg = self._cfg()
        runs_dir, name = self.run_root()
        if cfg.trainer.get("default_root_dir") is None:
            cfg.trainer.default_root_dir = str(runs_dir / name)
        if cfg.checkpoint.get("dirpath") is None:
            cfg.checkpoint.dirpath = str(runs_dir / name / "checkpoints")

    def instantiate_trainer(self, **kwargs):
        trainer_cfg = self._get(self.config_init, "trainer", default={})
        callbacks = trainer_cfg.get("callbacks") or []
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        wants_bar = trainer_cfg.get("enable_progress_bar") is not False
        if wants_bar and not any(isinstance(c, ProgressBar) for c in callbacks):
            # appended by LightningCLI after the configured callbacks; a configured progress bar wins
            self.trainer_defaults["callbacks"] = [RichProgressBar(leave=True)]
        if trainer_cfg.get("logger") in (None, True) and "logger" not in kwargs:
            runs_dir, name = self.run_root()
            version = next_version(runs_dir / name)
            kwargs["logger"] = [
                TensorBoardLogger(save_dir=runs_dir, name=name, version=version, default_hp_metric=False),
                CSVLogger(save_dir=runs_dir, name=name, version=version),
            ]
        return super().instantiate_trainer(**kwargs)


def run_command(name: str, argv: list[str]) -> int:
    module_name = f"{COMMANDS_PACKAGE}.{name.replace('-', '_')}"
    if importlib.util.find_spec(module_name) is None:
        known = ", ".join(LIGHTNING_SUBCOMMANDS + tuple(available_commands()))
        print(f"neat: unknown command {name!r}; commands: {known}", file=sys.stderr)
        return 2
    return int(importlib.import_module(module_name).main(argv) or 0)


def available_commands() -> list[str]:
    folder = Path(__file__).parent / "commands"
    return sorted(p.stem.replace("_", "-") for p in folder.glob("*.py") if not p.stem.startswith("_"))


def config_files(args: list[str]) -> list[str]:
    """The values of every ``--config`` / ``-c`` option in ``args``."""
    files = []
    for i, a in enumerate(args):
        if a in ("--config", "-c") and i + 1 < len(args):
            files.append(args[i + 1])
        elif a.startswith("--config="):
            files.append(a.split("=", 1)[1])
    return files


def check_config_files(args: list[str]) -> str | None:
    """An error message for the first missing or syntactically broken ``--config`` file, naming file and line."""
    import yaml

    for name in config_files(args):
        path = Path(name)
        if not path.is_file():
            return f"--config: no such file: {name!r}"
        try:
            yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            return f"--config {name}: invalid YAML{where}: {getattr(e, 'problem', None) or e}"
    return None


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    configure_process()
    if problem := check_config_files(args):
        print(f"neat: {problem}", file=sys.stderr)
        return 2
    if args and not args[0].startswith("-") and args[0] not in LIGHTNING_SUBCOMMANDS:
        return run_command(args[0], args[1:])
    import_all_callbacks()
    NeatCLI(args=argv)  # None: LightningCLI reads sys.argv itself
    return 0


if __name__ == "__main__":
    sys.exit(main())
