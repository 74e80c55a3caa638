"""Dialogue "scenes": the YAML schema, a validator that reports every problem with file and line, a renderer to
training text, and :class:`SceneDataModule` (optionally switching from a pretraining DataModule mid-run).

A scene file (``neat_lightning/data/scenes/*.yaml`` ship with the package)::

    scene_id: night-shift-handover          # unique; letters, digits, '-', '_', '.'
    purpose: Hand over an unstable patient.  # what the scene is for
    roles:                                   # two or more, unique names
      - {name: Nurse, description: ending a twelve-hour night shift}
      - {name: Resident, description: first week on the ward}
    structure:
      tension: ...                           # what is at stake / pulls the roles apart
      vector_guess: ...                      # where the scene seems headed, guessed from its start
      scene_resolve: ...                     # how it actually resolves
    turns:                                   # two or more; each role must be one of `roles`
      - {role: Nurse, text: ...}
      - {role: Resident, text: ...}

Files are parsed with ``yaml.safe_load`` (never ``yaml.load``); line numbers come from ``yaml.compose`` with the
safe loader, which builds nodes only. :func:`render_scene` turns a scene into plain text: a header (id, purpose,
roles, tension, vector guess), the turns as ``Role: text`` lines, and the resolution last.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import yaml
from torch.utils.data import DataLoader

from neat_lightning.data.bytes import (
    Document,
    RandomWindowBatches,
    SequentialWindowBatches,
    resolve_paths,
    split_documents,
    stream_from_documents,
)

log = logging.getLogger(__name__)

BUILTIN_SCENE_DIR = Path(__file__).parent / "scenes"
SCENE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
TOP_FIELDS = ("scene_id", "purpose", "roles", "structure", "turns")
STRUCTURE_FIELDS = ("tension", "vector_guess", "scene_resolve")


# ----------------------------------------------------------------------------------------------------------------------
# the schema


@dataclass(frozen=True)
class Role:
    name: str
    description: str


@dataclass(frozen=True)
class Turn:
    role: str
    text: str


@dataclass(frozen=True)
class SceneStructure:
    tension: str  # what is at stake between the roles
    vector_guess: str  # the direction the scene seems to take, guessed from its opening
    scene_resolve: str  # how it resolves


@dataclass(frozen=True)
class Scene:
    scene_id: str
    purpose: str
    roles: tuple[Role, ...]
    structure: SceneStructure
    turns: tuple[Turn, ...]
    source: str = ""  # file it was read from


@dataclass(frozen=True)
class SceneProblem:
    """One validation problem: ``file:line: field: message`` (line is 1-based)."""

    file: str
    line: int
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.field}: {self.message}"


class SceneError(ValueError):
    """Raised by strict loading; ``problems`` holds every problem found, in file order."""

    def __init__(self, problems: Sequence[SceneProblem]) -> None:
        self.problems = list(problems)
        n_files = len({p.file for p in self.problems})
        super().__init__(
            f"{len(self.problems)} problem(s) in {n_files} scene file(s):\n" + "\n".join(f"  {p}" for p in self.problems)
        )


# ----------------------------------------------------------------------------------------------------------------------
# validation


def _node_lines(node: yaml.Node | None, path: tuple = (), out: dict | None = None) -> dict[tuple, int]:
    """Path (keys / list indices) -> 1-based line of the node there, from a composed (not constructed) YAML tree."""
    out = {} if out is None else out
    if node is None:
        return out
    out[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            k = key.value if isinstance(key, yaml.ScalarNode) else None
            out[path + (k, "__key__")] = key.start_mark.line + 1
            _node_lines(value, path + (k,), out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _node_lines(item, path + (i,), out)
    return out


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


class _Checker:
    """Collects problems for one file; ``line(path)`` falls back to the nearest existing parent."""

    def __init__(self, file: str, lines: dict[tuple, int]) -> None:
        self.file, self.lines, self.problems = file, lines, []

    def line(self, path: tuple) -> int:
        """Line of ``path``; for a missing field, the line of its parent's key (``structure:``) or item."""
        if path in self.lines:
            return self.lines[path]
        while path:
            path = path[:-1]
            for candidate in (path + ("__key__",), path):
                if candidate in self.lines:
                    return self.lines[candidate]
        return 1

    def add(self, path: tuple, message: str) -> None:
        line = self.line(path)
        path = tuple(p for p in path if p != "__key__")
        field = ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in path).replace(".[", "[")
        self.problems.append(SceneProblem(self.file, line, field or "<document>", message))

    def text(self, mapping: dict, key: str, path: tuple) -> str | None:
        """A required non-empty string field."""
        if key not in mapping:
            self.add(path + (key,), "missing required field")
            return None
        value = mapping[key]
        if not isinstance(value, str):
            self.add(path + (key,), f"must be a string, got {_type_name(value)} {value!r}")
            return None
        if not value.strip():
            self.add(path + (key,), "must not be empty")
            return None
        return value.strip()

    def mapping(self, value: Any, path: tuple, known: Sequence[str]) -> dict | None:
        if not isinstance(value, dict):
            self.add(path, f"must be a mapping, got {_type_name(value)}")
            return None
        for key in value:
            if key not in known:
                self.add(path + (key, "__key__"), f"unknown field {key!r}; known fields: {', '.join(known)}")
        return value

    def sequence(self, mapping: dict, key: str, path: tuple, min_len: int) -> list | None:
        if key not in mapping:
            self.add(path + (key,), "missing required field")
            return None
        value = mapping[key]
        if not isinstance(value, list):
            self.add(path + (key,), f"must be a list, got {_type_name(value)}")
            return None
        if len(value) < min_len:
            self.add(path + (key,), f"needs at least {min_len} entries, got {len(value)}")
        return value


def parse_scene(text: str, file: str = "<string>") -> tuple[Scene | None, list[SceneProblem]]:
    """Parse and validate one scene document -> (scene or ``None``, every problem found)."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)  # nodes only: line numbers, no object construction
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        line = mark.line + 1 if mark is not None else 1
        reason = getattr(e, "problem", None) or str(e).splitlines()[0]
        return None, [SceneProblem(file, line, "<yaml>", f"invalid YAML: {reason}")]
    c = _Checker(file, _node_lines(root))
    top = c.mapping(data, (), TOP_FIELDS)
    if top is None:
        return None, c.problems
    scene_id = c.text(top, "scene_id", ())
    if scene_id is not None and not SCENE_ID_RE.fullmatch(scene_id):
        c.add(("scene_id",), f"{scene_id!r} must match {SCENE_ID_RE.pattern}")
    purpose = c.text(top, "purpose", ())

    roles: list[Role] = []
    for i, entry in enumerate(c.sequence(top, "roles", (), 2) or []):
        path = ("roles", i)
        entry = c.mapping(entry, path, ("name", "description"))
        if entry is None:
            continue
        name, description = c.text(entry, "name", path), c.text(entry, "description", path)
        if name is not None and any(r.name == name for r in roles):
            c.add(path + ("name",), f"duplicate role name {name!r}")
        elif name is not None and description is not None:
            roles.append(Role(name, description))
    role_names = {r.name for r in roles}

    structure = None
    if "structure" not in top:
        c.add(("structure",), "missing required field")
    else:
        st = c.mapping(top["structure"], ("structure",), STRUCTURE_FIELDS)
        if st is not None:
            parts = [c.text(st, key, ("structure",)) for key in STRUCTURE_FIELDS]
            if all(p is not None for p in parts):
                structure = SceneStructure(*parts)

    turns: list[Turn] = []
    for i, entry in enumerate(c.sequence(top, "turns", (), 2) or []):
        path = ("turns", i)
        entry = c.mapping(entry, path, ("role", "text"))
        if entry is None:
            continue
        role, said = c.text(entry, "role", path), c.text(entry, "text", path)
        if role is not None and roles and role not in role_names:
            c.add(path + ("role",), f"{role!r} is not one of the scene's roles {sorted(role_names)}")
        elif role is not None and said is not None:
            turns.append(Turn(role, said))

    if c.problems:
        return None, c.problems
    return Scene(scene_id, purpose, tuple(roles), structure, tuple(turns), file), []


def load_scene_file(path: str | Path) -> tuple[Scene | None, list[SceneProblem]]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        return None, [SceneProblem(str(path), 1, "<file>", f"not UTF-8 text: {e.reason} at byte {e.start}")]
    return parse_scene(text, str(path))


def scene_paths(scene_files: str | Sequence[str] | None = None) -> list[Path]:
    """Files and globs -> paths (``None``: the built-in corpus); a directory means its ``*.yaml`` files."""
    if scene_files is None:
        scene_files = [str(BUILTIN_SCENE_DIR / "*.yaml")]
    if isinstance(scene_files, (str, Path)):
        scene_files = [scene_files]
    patterns = [str(Path(p) / "*.yaml") if Path(p).is_dir() else str(p) for p in scene_files]
    return resolve_paths(patterns, "scene_files")


def load_scenes(
    scene_files: str | Sequence[str] | None = None, strict: bool = True
) -> tuple[list[Scene], list[SceneProblem]]:
    """Load and validate scene files (``None``: the built-in corpus).

    Every file is checked and every problem collected (also duplicate ``scene_id`` across files). ``strict=True``
    raises :class:`SceneError` listing them all; ``strict=False`` logs a warning per problem and returns the scenes
    of the files that are valid, with the problems.
    """
    scenes: list[Scene] = []
    problems: list[SceneProblem] = []
    seen: dict[str, str] = {}
    for path in scene_paths(scene_files):
        scene, found = load_scene_file(path)
        if scene is not None and scene.scene_id in seen:
            found = [SceneProblem(str(path), 1, "scene_id", f"duplicate scene_id {scene.scene_id!r} (first in "
                                                              f"{seen[scene.scene_id]})")]
            scene = None
        problems.extend(found)
        if scene is not None:
            seen[scene.scene_id] = str(path)
            scenes.append(scene)
    if problems and strict:
        raise SceneError(problems)
    for p in problems:
        log.warning("skipping scene file: %s", p)
    return scenes, problems


# ----------------------------------------------------------------------------------------------------------------------
# rendering


def render_scene(scene: Scene) -> str:
    """A scene as training text: header, ``Role: text`` turns, resolution."""
    roles = "; ".join(f"{r.name} ({r.description})" for r in scene.roles)
    lines = [
        f"SCENE {scene.scene_id}",
        f"Purpose: {scene.purpose}",
        f"Roles: {roles}",
        f"Tension: {scene.structure.tension}",
        f"Vector guess: {scene.structure.vector_guess}",
        "",
        *(f"{t.role}: {t.text}" for t in scene.turns),
        "",
        f"Resolve: {scene.structure.scene_resolve}",
    ]
    return "\n".join(" ".join(line.split()) if line else line for line in lines) + "\n"


def scene_documents(scenes: Sequence[Scene]) -> list[Document]:
    """Scenes -> byte documents keyed by ``scene_id`` (the key of the train/val split)."""
    return [Document(s.scene_id, render_scene(s).encode("utf-8")) for s in scenes]


# ----------------------------------------------------------------------------------------------------------------------
# the DataModule


class _SwitchLoader:
    """Training batches of one epoch: batch ``k`` comes from the pretraining loader while ``k < switch_batch``, then
    from the scene windows (scene batch ``k`` is a pure function of ``(seed, k, rank)``). It starts at the trainer's
    global step, so a resumed run sees the very batches of the uninterrupted one."""

    def __init__(self, dm: SceneDataModule, scenes: RandomWindowBatches, pretrain: Any) -> None:
        self.dm, self.scenes, self.pretrain = dm, scenes, pretrain

    def __len__(self) -> int:
        return len(self.pretrain) if self.pretrain is not None else len(self.scenes)

    def __iter__(self) -> Iterator[torch.Tensor]:
        self.dm._place(self.scenes)
        start, n = self.scenes.start_batch, len(self)
        end = (start // n + 1) * n
        switch = self.dm.switch_batch(n)
        n_replay = round(self.dm.replay * self.scenes.batch_size) if self.pretrain is not None else 0
        pretrain_batches = None
        for k in range(start, end):
            use_pretrain = self.pretrain is not None and (switch is None or k < switch)
            if use_pretrain or n_replay:
                if pretrain_batches is None:
                    pretrain_batches = iter(self.pretrain)  # it places itself at the same global step
                try:
                    pretrain_batch = next(pretrain_batches)  # batch k of the pretraining loader
                except StopIteration:
                    return
            if use_pretrain:
                yield pretrain_batch
                continue
            batch = self.scenes.batch(k)
            if n_replay:  # rehearsal: the first rows come from the pretraining corpus
                if pretrain_batch.shape[1:] != batch.shape[1:]:
                    raise ValueError(
                        f"replay={self.dm.replay} mixes rows of both corpora, but pretraining windows have shape "
                        f"{tuple(pretrain_batch.shape[1:])} and scene windows {tuple(batch.shape[1:])}: use the same "
                        "block_size"
                    )
                batch = torch.cat([pretrain_batch[:n_replay], batch[n_replay:]])
            yield batch


class SceneDataModule(L.LightningDataModule):
    """Byte windows of rendered dialogue scenes, optionally after a pretraining DataModule.

    Alone, it serves random windows of the training scenes. With ``pretrain``, training batches come from that
    DataModule until the switch that :meth:`schedule_switch` sets (``LoRAFinalStage`` calls it in ``setup`` with its
    start step), then from the scenes; the switch is a function of the batch index, so it holds mid-epoch and on
    ``--ckpt_path`` resume (the pretraining loader must itself start at the trainer's global step, as
    ``ByteTextDataModule`` does). Epochs then have the pretraining loader's length.

    Args:
        scene_files: scene YAML files, globs or directories; ``None`` for the built-in corpus.
        strict: raise on any malformed file (listing all problems); ``False`` skips bad files with a warning.
        val_scenes: scene ids held out for validation; ``None`` splits by ``val_fraction`` (by id, deterministic).
        val_fraction: share of scenes held out when ``val_scenes`` is not given.
        block_size: context length; windows are ``block_size + 1`` ids.
        batch_size: windows per batch (per device).
        batches_per_epoch: training batches per epoch when there is no ``pretrain`` DataModule.
        seed: seed of the training windows.
        split_seed: seed of the train/val scene split.
        pretrain: the DataModule used before the switch (e.g. ``ByteTextDataModule``).
        val_source: validate on the held-out ``scenes`` or on the ``pretrain`` DataModule's validation set.
        replay: after the switch, the share of each batch's rows taken from the ``pretrain`` loader (rehearsal
            against forgetting the pretraining corpus); 0 trains on scenes only.
    """

    def __init__(
        self,
        scene_files: list[str] | None = None,
        strict: bool = True,
        val_scenes: list[str] | None = None,
        val_fraction: float = 0.15,
        block_size: int = 256,
        batch_size: int = 32,
        batches_per_epoch: int = 100,
        seed: int = 4321,
        split_seed: int = 0,
        pretrain: L.LightningDataModule | None = None,
        val_source: Literal["scenes", "pretrain"] = "scenes",
        replay: float = 0.0,
    ) -> None:
        super().__init__()
        for name, value in (("block_size", block_size), ("batch_size", batch_size),
                            ("batches_per_epoch", batches_per_epoch)):
            if value < 1:
                raise ValueError(f"{name}={value} must be >= 1")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction={val_fraction} must be in (0, 1)")
        if val_source not in ("scenes", "pretrain"):
            raise ValueError(f"val_source={val_source!r} must be 'scenes' or 'pretrain'")
        if val_source == "pretrain" and pretrain is None:
            raise ValueError("val_source='pretrain' needs a pretrain DataModule")
        if not 0.0 <= replay < 1.0:
            raise ValueError(f"replay={replay} must be in [0, 1)")
        if replay and pretrain is None:
            raise ValueError(f"replay={replay} needs a pretrain DataModule to replay")
        self.save_hyperparameters(ignore=["pretrain"])
        self.scene_files, self.strict, self.val_scenes = scene_files, strict, val_scenes
        self.val_fraction, self.block_size, self.batch_size = val_fraction, block_size, batch_size
        self.batches_per_epoch, self.seed, self.split_seed = batches_per_epoch, seed, split_seed
        self.pretrain, self.val_source, self.replay = pretrain, val_source, replay
        self.scenes: list[Scene] = []
        self.problems: list[SceneProblem] = []
        self.train_docs: list[Document] = []
        self.val_docs: list[Document] = []
        self._switch: tuple[str, int] | None = None

    # -- the switch ------------------------------------------------------------------------------------------------

    def schedule_switch(self, step: int | None = None, epoch: int | None = None) -> None:
        """Serve scene batches from optimizer step ``step`` (or the first batch of ``epoch``) on."""
        if (step is None) == (epoch is None):
            raise ValueError(f"give exactly one of step={step} and epoch={epoch}")
        value = step if step is not None else epoch
        if value < 0:
            raise ValueError(f"{'step' if step is not None else 'epoch'}={value} must be >= 0")
        self._switch = ("step", step) if step is not None else ("epoch", epoch)

    def switch_batch(self, epoch_length: int) -> int | None:
        """Index of the first scene batch; ``None`` when no switch is scheduled (0 without ``pretrain``)."""
        if self.pretrain is None:
            return 0
        if self._switch is None:
            return None
        unit, value = self._switch
        if unit == "epoch":
            return value * epoch_length
        accumulate = self.trainer.accumulate_grad_batches if self.trainer is not None else 1
        return value * accumulate

    # -- data ------------------------------------------------------------------------------------------------------

    def prepare_data(self) -> None:
        if self.pretrain is not None:
            self.pretrain.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        if self.pretrain is not None:
            self.pretrain.trainer = self.trainer
            self.pretrain.setup(stage)
        if self.train_docs:
            return
        self.scenes, self.problems = load_scenes(self.scene_files, self.strict)
        if len(self.scenes) < 2:
            raise ValueError(f"scene_files={self.scene_files}: {len(self.scenes)} valid scene(s); need at least 2")
        docs = scene_documents(self.scenes)
        if self.val_scenes is not None:
            ids = {d.name for d in docs}
            unknown = sorted(set(self.val_scenes) - ids)
            if unknown:
                raise ValueError(f"val_scenes: unknown scene ids {unknown}")
            self.val_docs = [d for d in docs if d.name in self.val_scenes]
            self.train_docs = [d for d in docs if d.name not in self.val_scenes]
            if not self.train_docs:
                raise ValueError("val_scenes holds out every scene; none is left for training")
        else:
            self.train_docs, self.val_docs = split_documents(docs, self.val_fraction, self.split_seed)
        self.train_stream = stream_from_documents(self.train_docs)
        self.val_stream = stream_from_documents(self.val_docs)
        if len(self.train_stream) < self.block_size + 1:
            raise ValueError(
                f"the training scenes hold {len(self.train_stream)} ids, fewer than one window of "
                f"block_size + 1 = {self.block_size + 1}"
            )
        log.info("scenes: %d train / %d val (%d / %d bytes)", len(self.train_docs), len(self.val_docs),
                 len(self.train_stream), len(self.val_stream))

    def _place(self, ds: Any) -> None:
        trainer = self.trainer
        if trainer is not None:
            ds.rank, ds.world_size = trainer.global_rank, trainer.world_size
            if isinstance(ds, RandomWindowBatches):
                ds.start_batch = trainer.global_step * trainer.accumulate_grad_batches

    def train_dataloader(self) -> _SwitchLoader:
        scenes = RandomWindowBatches(self.train_stream, self.block_size, self.batch_size, self.batches_per_epoch,
                                     self.seed)
        self._place(scenes)
        return _SwitchLoader(self, scenes, self.pretrain.train_dataloader() if self.pretrain is not None else None)

    def scene_val_dataloader(self) -> DataLoader:
        """Held-out scenes, covered once (every id after the first predicted exactly once)."""
        ds = SequentialWindowBatches(self.val_stream, self.block_size, self.batch_size)
        self._place(ds)
        return DataLoader(ds, batch_size=None)

    def val_dataloader(self) -> Any:
        if self.val_source == "pretrain":
            return self.pretrain.val_dataloader()
        return self.scene_val_dataloader()

    def test_dataloader(self) -> Any:
        return self.val_dataloader()

    def state_dict(self) -> dict[str, Any]:
        return {"pretrain": self.pretrain.state_dict()} if self.pretrain is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.pretrain is not None and "pretrain" in state_dict:
            self.pretrain.load_state_dict(state_dict["pretrain"])
