"""The package's layers import downward only, and the bottom three never import Lightning.

Layers, bottom to top: ``codec`` + ``protocols`` + ``choices`` (0) <- ``components`` (1) <- ``data`` (2) <- ``modules`` (3)
<- ``callbacks`` (4) <- ``eval`` / ``commands`` / ``cli`` (5). Callbacks skip ``modules`` entirely. Every import in every file counts, including the
ones inside functions: a lazy import that goes up a layer is still a dependency that goes up.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "neat_lightning"

LAYERS = {
    "codec": 0,
    "protocols": 0,
    "choices": 0,
    "_lazy": 0,
    "components": 1,
    "data": 2,
    "modules": 3,
    "callbacks": 4,
    "eval": 5,
    "commands": 5,
    "cli": 5,
}
LIGHTNING_FREE = {"codec", "protocols", "choices", "components"}
# Callbacks reach modules through protocols only, so they may not import modules/ even though it is lower.
FORBIDDEN = {("callbacks", "modules")}
LIGHTNING = ("lightning", "pytorch_lightning", "lightning_fabric", "torchmetrics")


def unit_of(module: str) -> str | None:
    """``neat_lightning.data.bytes`` -> ``data``; the package root and foreign modules -> None."""
    parts = module.split(".")
    if parts[0] != "neat_lightning" or len(parts) < 2:
        return None
    return parts[1]


def imports_of(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path`` (a file under the package folder ``root``)."""
    rel = path.relative_to(root.parent).with_suffix("")
    package = list(rel.parts[:-1])  # the package a relative import starts from (also right for __init__.py)
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.append((node.lineno, name))
            # `from neat_lightning import modules` imports the submodule `modules`
            if name == "neat_lightning":
                out += [(node.lineno, f"neat_lightning.{a.name}") for a in node.names]
    return out


def violations(path: Path, root: Path = PACKAGE) -> list[str]:
    own = path.relative_to(root).parts[0].removesuffix(".py")
    if own not in LAYERS:
        return [f"{path.relative_to(root.parent)}: not assigned to a layer (add it to LAYERS)"]
    bad = []
    for line, name in imports_of(path, root):
        where = f"{path.relative_to(root.parent)}:{line}"
        if own in LIGHTNING_FREE and name.split(".")[0] in LIGHTNING:
            bad.append(f"{where}: imports {name} in the Lightning-free layer {own!r}")
        target = unit_of(name)
        if target is None:
            continue
        if target not in LAYERS:
            bad.append(f"{where}: imports {name}, which is not assigned to a layer")
        elif LAYERS[target] > LAYERS[own]:
            bad.append(f"{where}: {own!r} (layer {LAYERS[own]}) imports {name} (layer {LAYERS[target]})")
        elif (own, target) in FORBIDDEN:
            bad.append(f"{where}: {own!r} imports {name}; it must use a protocol from neat_lightning.protocols")
    return bad


def package_files() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p.parent != PACKAGE or p.name != "__init__.py")


def test_every_import_goes_down_a_layer():
    bad = [v for path in package_files() for v in violations(path)]
    assert not bad, "imports that go up a layer:\n" + "\n".join(bad)


def test_an_upward_import_is_caught(tmp_path):
    """The checker itself can fail: a component importing a module (relatively, too), or Lightning, is reported."""
    root = tmp_path / "neat_lightning"
    (root / "components").mkdir(parents=True)
    bad = root / "components" / "bad.py"
    bad.write_text(
        "import torch\nfrom neat_lightning.modules.byte_lm import ByteLM\n\ndef f():\n    import lightning\n"
        "    from ..callbacks import sleep_wake\n"
    )
    found = violations(bad, root)
    assert len(found) == 3, found
    assert "'components' (layer 1) imports neat_lightning.modules.byte_lm (layer 3)" in found[0]
    assert "imports lightning in the Lightning-free layer 'components'" in found[1]
    assert "imports neat_lightning.callbacks (layer 4)" in found[2]


@pytest.mark.slow  # a fresh interpreter per module (~3.5 s each on 2 cores); the import test above is static
@pytest.mark.parametrize("name", ["codec", "protocols", "components.lattice", "components.blt"])
def test_lower_layers_load_without_lightning(name):
    """Importing the Lightning-free layers in a fresh interpreter does not pull Lightning in."""
    import subprocess
    import sys

    code = f"import sys, neat_lightning.{name}; print(any(m.split('.')[0] in {LIGHTNING!r} for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"
