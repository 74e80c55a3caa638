"""The ``neat`` command: LightningCLI for fit/validate/test/predict, plus extra subcommands.

    neat fit --config configs/byte_lm.yaml
    neat validate --config configs/byte_lm_quickstart.yaml --ckpt_path runs/quickstart/checkpoints/last.ckpt
    neat fit --config configs/byte_lm.yaml --ckpt_path last          # resume runs/<run_name>/checkpoints/last.ckpt
    neat patch --ckpt runs/quickstart/checkpoints/last.ckpt --input some.txt
    neat convert-ckpt old.ckpt new.ckpt --model NeatModel            # rewrite an older checkpoint format

Every run writes under ``<runs_dir>/<run_name>/``: ``checkpoints/`` (``last.ckpt`` plus the best/latest), and one
``version_N/`` per invocation holding TensorBoard events, ``metrics.csv`` and the resolved ``config.yaml``.
``run_name`` defaults to the stem of the first ``--config`` file. ``last.ckpt`` always holds the newest run's latest
step: a new fit into the same run directory replaces it (Lightning would write ``last-v1.ckpt`` beside it, leaving
the documented path on the older run), and ``--trainer.fast_dev_run`` writes no checkpoint. ``validate``, ``test``
and a resumed ``fit`` name the checkpoint they load (path, global step, when written). Process-wide settings live
here, not in modules.

A configuration or input error (a bad value, a missing or empty file, a checkpoint of another model) raised while
the command parses, builds or sets up its run is printed as one line naming the field, the value and the rule, with
exit code 2. ``--debug`` (anywhere on the command line) or ``NEAT_DEBUG=1`` shows the full traceback instead.
Errors raised once the training or evaluation loop has started keep their traceback.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import inspect
import os

# LightningCLI 2.6 still calls jsonargparse APIs deprecated in 4.49; the warning is not actionable for users
os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")
import re
import sys
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from jsonargparse import ArgumentError
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

COMMANDS_PACKAGE = "neat_lightning.commands"
LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")
CKPT_PATH_KEYWORDS = ("last", "best", "hpc", "registry")
DEBUG_FLAG, DEBUG_ENV = "--debug", "NEAT_DEBUG"
# what a user's configuration or input raises; reported in one line while the run is being set up
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, IsADirectoryError, NotADirectoryError, ArgumentError,
               MisconfigurationException)


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
        except ImportError:  # a callback whose optional dependency is not installed
            pass


def next_version(root: Path) -> int:
    versions = [int(m.group(1)) for p in root.glob("version_*") if (m := re.fullmatch(r"version_(\d+)", p.name))]
    return max(versions, default=-1) + 1


# -- how far a run got ---------------------------------------------------------------------------------------------


@dataclass
class Progress:
    """How far one ``NeatCLI`` invocation got: ``parse`` -> ``instantiate`` -> ``setup`` -> ``run``.

    An error raised before ``run`` comes from the configuration or the input files; ``main`` reports it in one line.
    ``run`` begins when a training, validation, test or predict loop starts (after the DataModule's ``setup``,
    the callbacks' ``setup`` and the checkpoint restore).
    """

    stage: Literal["parse", "instantiate", "setup", "run"] = "parse"


class _LoopStarted(Callback):
    """Marks ``progress.stage = "run"`` when a loop starts. Stateless: it adds nothing to checkpoints."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress

    def _started(self, *_: Any) -> None:
        self.progress.stage = "run"

    on_train_start = on_validation_start = on_test_start = on_predict_start = _started


class _NameCheckpoint(Callback):
    """Logs which checkpoint a ``validate`` / ``test`` / ``predict`` evaluates, or a ``fit`` resumes from: path,
    global step and when it was written. Stateless."""

    def _name(self, trainer: L.Trainer, verb: str) -> None:
        path = trainer.ckpt_path
        if path and Path(path).is_file():
            from neat_lightning.commands.score import describe_checkpoint

            rank_zero_info(f"{verb} checkpoint {describe_checkpoint(path)}")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._name(trainer, "resumed from")

    def _evaluating(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn != TrainerFn.FITTING:
            self._name(trainer, "evaluating")

    on_validation_start = on_test_start = on_predict_start = _evaluating


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, saving nothing under ``fast_dev_run`` (Lightning's ``on_train_end`` writes
    ``last.ckpt`` even then), always leaving the final step in ``last.ckpt`` and logging when a new fit is about to replace an earlier run's ``last.ckpt``. The CLI
    turns the version counter off (``enable_version_counter: false``), so ``last.ckpt`` is overwritten instead of
    a ``last-v1.ckpt`` being written beside it."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        last = Path(self.dirpath or "") / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"
        if self.save_last and not trainer.fast_dev_run and not trainer.ckpt_path and last.is_file():
            from neat_lightning.commands.score import describe_checkpoint

            rank_zero_info(f"this run replaces {describe_checkpoint(last)} at its first save")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.fast_dev_run:
            return
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            # Lightning writes last.ckpt at train end only if no periodic save wrote it before: a run stopped
            # between saves (max_time, max_steps off the period, early stopping) would keep an older step there
            self._last_checkpoint_saved = False
        super().on_train_end(trainer, pl_module)


class StepProgressBar(RichProgressBar):
    """Lightning's rich progress bar, counting optimizer steps when a run is bounded by ``max_steps`` alone.

    Training windows are sampled, so an epoch is a convention (``batches_per_epoch``) and a step-bounded run has no
    epoch count (Lightning's bar read "Epoch 0/-2"): one bar runs from the start step to ``max_steps``.
    """

    def _by_steps(self) -> bool:
        return self.trainer.max_steps > 0 and self.trainer.max_epochs in (None, -1)

    @property
    def total_train_batches(self) -> int | float:
        return self.trainer.max_steps if self._by_steps() else super().total_train_batches

    def _get_train_description(self, current_epoch: int) -> str:
        if not self._by_steps():
            return super()._get_train_description(current_epoch)
        return f"{'Step':{len(self.validation_description)}}"

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._by_steps() and self.train_progress_bar_id is not None:
            return  # one bar for the whole run
        super().on_train_epoch_start(trainer, pl_module)
        if self._by_steps():
            self._update(self.train_progress_bar_id, trainer.global_step)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self._by_steps():
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if not self.is_disabled and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._update_metrics(trainer, pl_module)


# -- checkpoint vs configuration -------------------------------------------------------------------------------------


def resolve_class(class_path: str | None) -> type | None:
    """The class a dotted ``class_path`` names; ``None`` when it is empty or does not import."""
    if not class_path:
        return None
    module_name, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError):
        return None


def _short(class_path: str) -> str:
    return class_path.rsplit(".", 1)[-1]


def _model_option(cls: type) -> str:
    """How ``neat convert-ckpt --model`` names ``cls``: shipped modules by name, others by class path."""
    from neat_lightning import modules

    return cls.__name__ if getattr(modules, cls.__name__, None) is cls else f"{cls.__module__}.{cls.__qualname__}"


def _same_class(a: str, b: str) -> bool:
    ca, cb = resolve_class(a), resolve_class(b)
    return ca is cb if ca is not None and cb is not None else _short(a) == _short(b)


def _accepts(cls: type, names: set[str]) -> bool:
    params = inspect.signature(cls.__init__).parameters
    return any(p.kind is p.VAR_KEYWORD for p in params.values()) or names <= set(params)


def guess_module_class(hparams: dict[str, Any]) -> str | None:
    """The class path of the shipped module whose ``__init__`` takes every one of ``hparams``' names, if one does."""
    from neat_lightning import modules

    names = {k for k in hparams if not k.startswith("_")}
    for name in modules.__all__:
        cls = getattr(modules, name)
        if names and _accepts(cls, names):
            return f"{modules.__name__}.{name}"
    return None


def checkpoint_class_mismatch(checkpoint: dict[str, Any], model_path: str, data_path: str | None,
                              source: str) -> str | None:
    """An error message when ``checkpoint`` holds another LightningModule class than the config's ``model_path``.

    The class comes from ``hyper_parameters["_class_path"]`` (LightningCLI records it for every module it builds);
    for a checkpoint written outside the CLI, from its hyperparameter names (a current-format checkpoint whose names
    the configured class does not take holds another class).
    """
    from neat_lightning.modules.base import FORMAT, FORMAT_KEY

    saved = checkpoint.get("hyper_parameters") or {}
    held = saved.get("_class_path")
    if held is None:
        configured = resolve_class(model_path)
        names = {k for k in saved if not k.startswith("_")}
        if configured is None or not names or checkpoint.get(FORMAT_KEY, 1) != FORMAT or _accepts(configured, names):
            return None  # nothing to compare (older formats rename arguments: the upgrade on load checks them)
        held = guess_module_class(saved)
        if held is None:
            unknown = sorted(names - set(inspect.signature(configured.__init__).parameters))
            return (f"{source} holds a module with hyperparameters {', '.join(unknown)} that the config's model "
                    f"{_short(model_path)} ({model_path}) does not take. Use the config the checkpoint was trained "
                    "with")
    if _same_class(held, model_path):
        return None
    trained_data = (checkpoint.get("datamodule_hyper_parameters") or {}).get("_class_path")
    data = ""
    if trained_data and data_path and not _same_class(trained_data, data_path):
        data = f"; it was trained on {_short(trained_data)}, the config's data is {_short(data_path)}"
    return (f"{source} holds a {_short(held)}, the config's model is {_short(model_path)} ({model_path}){data}. "
            "Use the config the checkpoint was trained with")


def check_ckpt_path(path: str, cfg: Any) -> None:
    """Check ``--ckpt_path`` against the configuration before LightningCLI merges its hyperparameters.

    Raises ``ValueError`` when the checkpoint holds another module class than ``cfg.model``, was written by a newer
    version, or is an older format whose hyperparameters were renamed (LightningCLI would read the old names into
    the config; ``neat convert-ckpt`` rewrites the file once). Warns when only the DataModule class differs:
    evaluating a model on other data is legitimate.
    """
    from neat_lightning.modules.base import FORMAT, FORMAT_KEY, ResumableModule, upgrade_checkpoint

    model_path = (cfg.get("model") or {}).get("class_path")
    data_path = (cfg.get("data") or {}).get("class_path")
    # mmap: the tensors stay on disk; only the metadata is read
    checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    source = f"--ckpt_path: checkpoint {str(path)!r}"
    if model_path and (problem := checkpoint_class_mismatch(checkpoint, model_path, data_path, source)):
        raise ValueError(problem)
    trained_data = (checkpoint.get("datamodule_hyper_parameters") or {}).get("_class_path")
    if trained_data and data_path and not _same_class(trained_data, data_path):
        rank_zero_warn(f"{source} was trained on {trained_data}; the config's data is {data_path}")
    found = int(checkpoint.get(FORMAT_KEY, 1))
    cls = resolve_class((checkpoint.get("hyper_parameters") or {}).get("_class_path") or model_path)
    if found == FORMAT or not (isinstance(cls, type) and issubclass(cls, ResumableModule)):
        return
    before = copy.deepcopy(checkpoint.get("hyper_parameters"))
    changes = upgrade_checkpoint(checkpoint, cls, source)  # a newer format raises here, naming both numbers
    if checkpoint.get("hyper_parameters") != before:
        raise ValueError(
            f"{source} is format {found}; {cls.__name__}'s arguments changed since ({'; '.join(changes)}). "
            f"Convert it once: neat convert-ckpt {path} NEW.ckpt --model {_model_option(cls)}, then pass "
            "--ckpt_path NEW.ckpt"
        )


class NeatCLI(LightningCLI):
    """LightningCLI with subclass modes for models and data, a ``run_name``-scoped output directory, a
    :class:`RunCheckpoint` whose ``last.ckpt`` is the newest run's, a step-counting progress bar and TensorBoard + CSV
    loggers by default.

    Args:
        args: the command line (``None``: ``sys.argv``); see LightningCLI.
        run: run the subcommand; see LightningCLI.
        progress: updated as the invocation proceeds (see :class:`Progress`); ``main`` uses it to tell a
            configuration error from a failure of the run itself.
    """

    def __init__(self, args=None, run: bool = True, progress: Progress | None = None, **kwargs) -> None:
        self.progress = progress if progress is not None else Progress()
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
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        # a new fit into a run directory replaces last.ckpt instead of writing last-v1.ckpt beside it
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.dirpath": None,
                             "checkpoint.enable_version_counter": False})

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
        self.progress.stage = "parse"
        super().parse_arguments(parser, args)
        # LightningCLI reads --ckpt_path's hyperparameters right after parsing, with a bare torch.load, and replaces
        # the configured model class by the checkpoint's: check the file and its class first, so a truncated file or a
        # checkpoint of another model is named before anything else happens
        sub = self.config.get("subcommand")
        ckpt = self.config[sub].get("ckpt_path") if sub else None
        if ckpt is not None and str(ckpt) not in CKPT_PATH_KEYWORDS:
            from neat_lightning.modules.base import check_checkpoint_file

            check_checkpoint_file(ckpt, "--ckpt_path")
            check_ckpt_path(str(ckpt), self.config[sub])

    def before_instantiate_classes(self) -> None:
        self.progress.stage = "instantiate"
        cfg = self._cfg()
        runs_dir, name = self.run_root()
        if cfg.trainer.get("default_root_dir") is None:
            cfg.trainer.default_root_dir = str(runs_dir / name)
        if cfg.checkpoint.get("dirpath") is None:
            cfg.checkpoint.dirpath = str(runs_dir / name / "checkpoints")

    def after_instantiate_classes(self) -> None:
        self.progress.stage = "setup"
        self.trainer.callbacks[:0] = [_LoopStarted(self.progress), _NameCheckpoint()]

    def instantiate_trainer(self, **kwargs):
        trainer_cfg = self._get(self.config_init, "trainer", default={})
        callbacks = trainer_cfg.get("callbacks") or []
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        wants_bar = trainer_cfg.get("enable_progress_bar") is not False
        if wants_bar and not any(isinstance(c, ProgressBar) for c in callbacks):
            # appended by LightningCLI after the configured callbacks; a configured progress bar wins
            self.trainer_defaults["callbacks"] = [StepProgressBar(leave=True)]
        if trainer_cfg.get("logger") in (None, True) and "logger" not in kwargs:
            runs_dir, name = self.run_root()
            version = next_version(runs_dir / name)
            kwargs["logger"] = [
                TensorBoardLogger(save_dir=runs_dir, name=name, version=version, default_hp_metric=False),
                CSVLogger(save_dir=runs_dir, name=name, version=version),
            ]
        return super().instantiate_trainer(**kwargs)


# -- one-line error reports ----------------------------------------------------------------------------------------

_PARSER_NOISE = ("Does not validate against any of the Union subtypes", "Subtypes:", "Errors:", "Given value type:",
                 "Expected a <class 'NoneType'>")


def condense_parser_message(message: str) -> str:
    """jsonargparse's nested error text -> ``--model.init_args.dim=x (ByteLM): Expected int. Got value: x``.

    The nesting (``Parser key "model":`` / ``Problem with given class_path 'X':`` / ``Parser key "dim":``) becomes
    the option's dotted name, followed by the value given when the message does not already show it; the
    alternatives of optional types (``Expected a <class 'NoneType'>``) are dropped.
    """
    path: list[str] = []
    details: list[str] = []
    class_path, pending_class, given = None, False, None
    for raw in message.splitlines():
        line = raw.strip().removeprefix("- ").strip()
        if not line or line.startswith(_PARSER_NOISE):
            continue
        if m := re.fullmatch(r'Parser key "(.+?)":\s*(.*)', line):
            path += (["init_args"] if pending_class else []) + [m[1]]
            pending_class = False
            if m[2]:
                details.append(m[2])
        elif m := re.fullmatch(r"Problem with given class_path '(.+)':", line):
            class_path, pending_class = m[1], True
        elif m := re.fullmatch(r"Given value: NestedArg\(key='(.+?)', val='(.*)'\)", line):
            if not path or path[-1] != m[1]:  # an option of a class: --model.init_args.KEY
                path += (["init_args"] if pending_class else []) + [m[1]]
            given = m[2]
        elif m := re.fullmatch(r"Given value: (.*)", line):
            given = None if m[1].startswith(("Namespace(", "{", "[")) else m[1]
        else:
            details.append(line)
    if len(details) > 1:  # "--model accepts a config file path" is an alternative the user did not mean
        details = [d for d in details if not d.startswith("Expected a path but")] or details
    text = "; ".join(dict.fromkeys(details)) or "invalid value"
    text = re.sub(r"Expected a <class '([\w.]+)'>", r"Expected \1", text)
    field = f"--{'.'.join(path)}" if path else ""
    if field and given is not None and given != class_path and f"value: {given}" not in text:
        field += f"={given}"
    if field and class_path:
        field += f" ({class_path})"
    return f"{field}: {text}" if field else text


def _innermost(err: BaseException) -> BaseException:
    """Unwrap the errors jsonargparse raises about another error (``Does not validate ...`` caused by
    ``dim=-3 must be divisible by heads=4``) to the error the user's class raised."""
    while (
        isinstance(err.__cause__, USER_ERRORS)
        and err.__traceback__ is not None
        and "jsonargparse" in Path(traceback.extract_tb(err.__traceback__)[-1].filename).parts
    ):
        err = err.__cause__
    return err


def _raised_by(err: BaseException) -> str:
    """``model ByteLM`` / ``data ByteTextDataModule`` / ``callback X`` / ``trainer Trainer``: the innermost model,
    DataModule, callback or Trainer whose method the error came through (empty when none did)."""
    for frame, _ in reversed(list(traceback.walk_tb(err.__traceback__))):
        owner = frame.f_locals.get("self")
        for kind, cls in (("model", L.LightningModule), ("data", L.LightningDataModule), ("callback", Callback),
                          ("trainer", L.Trainer)):
            if isinstance(owner, cls):
                return f"{kind} {type(owner).__name__}"
    return ""


def describe_error(err: BaseException) -> str:
    """One line naming the option or section, the value and the rule."""
    if isinstance(err, ArgumentError):
        return condense_parser_message(str(err))
    inner = _innermost(err)
    text = str(inner)
    if "Does not validate against any of the Union subtypes" in text or "Parser key" in text:
        text = condense_parser_message(text)
    text = " ".join(text.split()) or type(inner).__name__
    where = _raised_by(inner)
    return f"{where}: {text}" if where and not text.startswith("--") else text


# -- entry point ---------------------------------------------------------------------------------------------------


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


def debug_requested(args: list[str]) -> bool:
    return DEBUG_FLAG in args or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(args)
    if DEBUG_FLAG in args:
        args = [a for a in args if a != DEBUG_FLAG]
        os.environ[DEBUG_ENV] = "1"  # DDP starts its other ranks from sys.argv: they read the variable instead
        if argv is None:
            sys.argv[1:] = args
    configure_process()
    if problem := check_config_files(args):
        print(f"neat: {problem}", file=sys.stderr)
        return 2
    command = args[0] if args and not args[0].startswith("-") else None
    progress = Progress()
    try:
        if command is not None and command not in LIGHTNING_SUBCOMMANDS:
            return run_command(command, args[1:])
        import_all_callbacks()
        # None: LightningCLI reads sys.argv itself. exit_on_error=False: parser errors raise, and are reported below
        NeatCLI(args=None if argv is None else args, progress=progress, parser_kwargs={"exit_on_error": False})
    except USER_ERRORS as err:
        if debug or progress.stage == "run":
            raise
        name = f"neat {command}" if command else "neat"
        hint = f"{name} --help lists the options" if isinstance(err, ArgumentError) else "--debug shows the traceback"
        print(f"{name}: {describe_error(err)} ({hint})", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
