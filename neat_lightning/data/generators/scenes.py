"""Dialogue "scenes": the YAML schema, a validator that reports every problem with file and line, and a renderer to
training text. Plain Python: :class:`neat_lightning.data.scenes.SceneDataModule` serves the rendered scenes to a
Trainer.

A scene file (the built-in corpus, ``neat_lightning/data/scene_library/*.yaml``, ships with the package)::

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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from neat_lightning.data.loading import resolve_paths

log = logging.getLogger(__name__)

BUILTIN_SCENE_DIR = Path(__file__).resolve().parents[1] / "scene_library"
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
