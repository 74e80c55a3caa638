"""The built-in corpora (`data/generators/corpus.py`): what they read, what they hold, and that they are stable."""

import subprocess
import sys

import pytest

from neat_lightning.data.generators import corpus
from neat_lightning.data.generators.corpus import (
    SKIPPED_DIRS,
    builtin_documents,
    corpus_sha256,
    module_docstrings,
    stdlib_modules,
    stdlib_root,
)

SOURCE = b'''"""Module summary."""

class Shape:
    """A shape."""

    def area(self, scale: float = 1.0) -> float:
        """Area in square units."""

        def helper():
            """Nested helper."""

    def undocumented(self):
        pass


async def fetch(url, *, timeout=3):
    """Fetch a URL."""
'''


def test_docstrings_in_source_order_under_headings():
    text = module_docstrings("pkg.shapes", SOURCE)
    assert text == (
        "Module pkg.shapes\n\nModule summary.\n\nclass Shape\n\nA shape.\n\n"
        "def Shape.area(self, scale: float=1.0)\n\nArea in square units.\n\n"
        "def Shape.area.helper()\n\nNested helper.\n\ndef fetch(url, *, timeout=3)\n\nFetch a URL.\n"
    )
    assert module_docstrings("empty", b"x = 1\n") is None
    assert module_docstrings("broken", b"def (:\n") is None


def test_the_module_rule_skips_tests_third_party_and_applications():
    modules = stdlib_modules()
    names = [m for m, _ in modules]
    assert len(names) == len(set(names)) > 500
    assert {"json", "json.decoder", "collections", "email.mime.text", "asyncio.tasks"} <= set(names)
    root = stdlib_root()
    for _, path in modules:
        parts = path.relative_to(root).parts
        assert not set(parts[:-1]) & SKIPPED_DIRS and not parts[-1].startswith("test_")
    assert not any(m.startswith(("test.", "idlelib", "turtledemo")) or m == "test" for m in names)
    assert modules == sorted(modules, key=lambda item: item[1].relative_to(root).parts)  # deterministic order


def test_pydoc_topics_and_stdlib_code_are_documents_of_their_sources():
    topics = builtin_documents("pydoc_topics")
    assert topics is builtin_documents("pydoc_topics")  # built once per process
    assert len(topics) > 50 and 400_000 < sum(len(d.data) for d in topics) < 2_000_000
    assert all(d.name.startswith("pydoc:") for d in topics)
    code = builtin_documents("stdlib_code")
    assert [d.name for d in code] == [f"stdlib:{m}" for m, _ in stdlib_modules()]
    assert 5_000_000 < sum(len(d.data) for d in code) < 40_000_000
    decoder = next(d for d in code if d.name == "stdlib:json.decoder")
    assert b"class JSONDecoder" in decoder.data


def test_corpus_hash_covers_names_bytes_and_order():
    docs = [("a", b"xy"), ("b", b"z")]
    h = corpus_sha256(docs)
    assert h == corpus_sha256(list(docs)) and len(h) == 64
    assert len({h, corpus_sha256([("a", b"x"), ("b", b"yz")]), corpus_sha256([("c", b"xy"), ("b", b"z")]),
                corpus_sha256(docs[::-1])}) == 4


def test_unknown_corpus_is_named():
    with pytest.raises(ValueError, match=r"builtin='wiki' is not a built-in corpus; choose one of \['pydoc_topics'"):
        builtin_documents("wiki")


@pytest.mark.slow
def test_stdlib_docs_is_topics_plus_module_docstrings():
    """~5 s: parses every standard-library module once."""
    docs = builtin_documents("stdlib_docs")
    assert docs[: len(corpus.pydoc_topics())] == corpus.pydoc_topics()
    modules = [d for d in docs if d.name.startswith("stdlib:")]
    assert len(modules) > 400 and len({d.name for d in docs}) == len(docs)
    assert 1_800_000 < sum(len(d.data) for d in docs) < 4_000_000  # 2.42 MB on Python 3.11.7
    decoder = next(d for d in modules if d.name == "stdlib:json.decoder").data.decode()
    assert decoder.startswith("Module json.decoder\n\nImplementation of JSONDecoder")
    assert "def JSONDecoder.decode(self, s, _w=WHITESPACE.match)" in decoder
    assert "def test_" not in "".join(d.data.decode() for d in modules[:50])


@pytest.mark.slow  # a fresh interpreter per module (up to ~6 s when it imports torch on 2 busy cores)
@pytest.mark.parametrize("name", ["corpus", "byte_store", "id_streams"])
def test_imports_without_lightning(name):
    module = f"neat_lightning.data.generators.{name}" if name == "corpus" else f"neat_lightning.data.{name}"
    code = f"import sys, {module}\nprint(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', " \
           "'pytorch_lightning', 'lightning_fabric', 'torchmetrics')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", f"{module} loaded {out}"
