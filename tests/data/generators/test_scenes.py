"""Scene corpus: the shipped scenes validate, malformed files name file/line/field, rendering."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import yaml

from neat_lightning.data.generators.scenes import (
    BUILTIN_SCENE_DIR,
    SceneError,
    load_scenes,
    parse_scene,
    render_scene,
)

GOOD = """\
scene_id: {scene_id}
purpose: Practise a short exchange.
roles:
  - name: Ann
    description: asks
  - name: Bo
    description: answers
structure:
  tension: Ann needs an answer.
  vector_guess: Bo will refuse.
  scene_resolve: Bo answers.
turns:
  - role: Ann
    text: "Will you help?"
  - role: Bo
    text: "Yes, after lunch."
"""


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text)
    return path


def test_builtin_corpus_has_30_valid_varied_scenes():
    scenes, problems = load_scenes()
    assert problems == []
    assert len(scenes) >= 30
    assert len({s.scene_id for s in scenes}) == len(scenes)
    assert len({s.purpose for s in scenes}) == len(scenes)
    role_names = {r.name for s in scenes for r in s.roles}
    assert len(role_names) >= 40  # varied roles, not the same two speakers everywhere
    for s in scenes:
        assert s.scene_id == Path(s.source).stem  # one scene per file, named after it
        assert {t.role for t in s.turns} <= {r.name for r in s.roles}
        assert len(s.turns) >= 8
        text = render_scene(s)
        assert text.encode("utf-8").decode("ascii", errors="strict")  # plain English text


def test_shipped_files_are_plain_safe_yaml():
    for path in sorted(BUILTIN_SCENE_DIR.glob("*.yaml")):
        assert "!!" not in path.read_text(), path  # no tags: safe_load builds only plain values
        assert isinstance(yaml.safe_load(path.read_text()), dict)


def test_render_puts_header_turns_and_resolution_in_order():
    scene, problems = parse_scene(GOOD.format(scene_id="ask-help"), "x.yaml")
    assert problems == []
    text = render_scene(scene)
    assert text.splitlines()[0] == "SCENE ask-help"
    order = [text.index(s) for s in ("Purpose:", "Roles: Ann (asks); Bo (answers)", "Tension:", "Vector guess:",
                                     "Ann: Will you help?", "Bo: Yes, after lunch.", "Resolve: Bo answers.")]
    assert order == sorted(order)


@pytest.mark.parametrize(
    "edit, line, field, message",
    [
        (lambda t: t.replace("purpose: Practise a short exchange.\n", ""), 1, "purpose", "missing required field"),
        (lambda t: t.replace("purpose: Practise a short exchange.", "purpose: 42"), 2, "purpose",
         "must be a string, got int 42"),
        (lambda t: t.replace("  vector_guess: Bo will refuse.\n", ""), 8, "structure.vector_guess",
         "missing required field"),
        (lambda t: t.replace("  - role: Bo\n", "  - role: Cy\n"), 15, r"turns\[1\]\.role",
         r"'Cy' is not one of the scene's roles \['Ann', 'Bo'\]"),
        (lambda t: t.replace("    description: answers", "    descripton: answers"), 7, r"roles\[1\]\.descripton",
         "unknown field 'descripton'"),
        (lambda t: t.replace("tension: Ann needs an answer.", "tension: Ann needs: an answer."), 9, "<yaml>",
         "invalid YAML: mapping values are not allowed here"),
        (lambda t: t.replace("  - role: Ann\n    text: \"Will you help?\"\n", ""), 13, "turns",
         "needs at least 2 entries, got 1"),
    ],
    ids=["missing-field", "wrong-type", "missing-nested", "unknown-role", "typo-key", "bad-yaml", "too-few-turns"],
)
def test_malformed_file_names_file_line_and_field(tmp_path: Path, edit, line: int, field: str, message: str):
    write(tmp_path, "a-good.yaml", GOOD.format(scene_id="a-good"))
    bad = write(tmp_path, "b-bad.yaml", edit(GOOD.format(scene_id="b-bad")))
    write(tmp_path, "c-good.yaml", GOOD.format(scene_id="c-good"))
    with pytest.raises(SceneError, match=rf"{re.escape(str(bad))}:{line}: {field}: .*{message}"):
        load_scenes([str(tmp_path)], strict=True)
    scenes, problems = load_scenes([str(tmp_path)], strict=False)
    assert [s.scene_id for s in scenes] == ["a-good", "c-good"]  # the other files still load
    assert problems and all(p.file == str(bad) for p in problems)


def test_every_problem_is_reported_not_only_the_first(tmp_path: Path):
    text = GOOD.format(scene_id="two bad").replace("purpose: Practise a short exchange.", "purpose: [1]")
    write(tmp_path, "x.yaml", text)
    with pytest.raises(SceneError) as info:
        load_scenes([str(tmp_path / "x.yaml")])
    fields = [p.field for p in info.value.problems]
    assert fields == ["scene_id", "purpose"]
    assert "2 problem(s) in 1 scene file(s)" in str(info.value)


def test_duplicate_scene_ids_across_files(tmp_path: Path, caplog):
    write(tmp_path, "a.yaml", GOOD.format(scene_id="same"))
    write(tmp_path, "b.yaml", GOOD.format(scene_id="same"))
    with pytest.raises(SceneError, match=r"b\.yaml:1: scene_id: duplicate scene_id 'same' \(first in .*a\.yaml\)"):
        load_scenes([str(tmp_path)])
    with caplog.at_level(logging.WARNING):
        scenes, _ = load_scenes([str(tmp_path)], strict=False)
    assert len(scenes) == 1 and "duplicate scene_id" in caplog.text


def test_yaml_tags_are_never_constructed(tmp_path: Path):
    text = GOOD.format(scene_id="tagged").replace("purpose: Practise a short exchange.",
                                                  "purpose: !!python/object/apply:os.system ['echo hi']")
    scene, problems = parse_scene(text, "t.yaml")
    assert scene is None and problems[0].field == "<yaml>"


def test_package_data_ships_the_scene_library_and_only_existing_files():
    """pyproject's package data names the built-in corpus, and every entry matches at least one file."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    root = Path(__file__).resolve().parents[3]
    entries = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    package = root / "neat_lightning"
    assert BUILTIN_SCENE_DIR.relative_to(package).as_posix() + "/*.yaml" in entries["neat_lightning"]
    for pattern in entries["neat_lightning"]:
        assert sorted(package.glob(pattern)), f"package data {pattern!r} matches no file under {package}"
