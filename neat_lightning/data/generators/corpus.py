"""The built-in byte corpora: text that ships with every Python, so nothing is ever downloaded.

Corpora (:data:`BUILTIN_CORPORA`), each a tuple of :class:`Document` in a fixed order:

* ``pydoc_topics`` -- the documentation topics of ``pydoc_data.topics`` (the reference sections ``help()`` shows),
  one document per topic, named ``pydoc:<topic>``. About 0.47 MB on Python 3.11.
* ``stdlib_docs`` -- the topics above plus, per standard-library module, its docstrings: the module's, then each
  class's and function's (methods and nested functions included) in source order, each under a heading line
  ``class Name`` or ``def Class.method(args)``. One document per module, named ``stdlib:<dotted.module>``. Extracted
  with :mod:`ast` from the source files; nothing is imported or executed. About 2.2 MB on Python 3.11.
* ``stdlib_code`` -- the source files of the same modules, one document per module, also named
  ``stdlib:<dotted.module>`` (so a module held out of one corpus is held out of the other for the same split seed).
  About 11 MB on Python 3.11.

Which files: every ``*.py`` under ``sysconfig.get_paths()["stdlib"]`` in sorted path order, except the directories
:data:`SKIPPED_DIRS` (third-party installs, test suites, the IDLE application, demos, caches) and files named
``test_*.py``. A file that does not parse is skipped. Nothing else on the machine is read, so a corpus is the same for
a given Python build; :func:`corpus_sha256` fingerprints it (logged with every run that uses it).

Corpora are built on first use and cached for the process (``stdlib_docs`` takes a few seconds: it parses ~11 MB of
source). Plain Python: importing this file loads neither torch nor Lightning.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import os
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

BUILTIN_CORPORA = ("pydoc_topics", "stdlib_docs", "stdlib_code")
SKIPPED_DIRS = frozenset({
    "site-packages", "dist-packages", "__pycache__",  # third-party installs and bytecode
    "test", "tests", "idle_test", "__phello__",  # test suites and test fixtures
    "idlelib", "turtledemo",  # an application and a demo, not library modules
})


@dataclass(frozen=True)
class Document:
    name: str  # stable key used by the train/val split (topic name, module name, file path, row index)
    data: bytes


def corpus_sha256(documents: Iterable[tuple[str, bytes]]) -> str:
    """Content hash of a corpus (hex): SHA-256 over, per document in order, ``u64 len(name) | name (UTF-8) |
    u64 len(data) | sha256(data)`` (little-endian lengths). Names count: they decide the train/val split.
    A byte store written by ``neat prepare`` records the same hash of the same documents (``content_sha256``)."""
    digest = hashlib.sha256()
    for name, data in documents:
        digest.update(document_record(name, len(data), hashlib.sha256(data).digest()))
    return digest.hexdigest()


def document_record(name: str, n_bytes: int, data_sha256: bytes) -> bytes:
    """One document's contribution to :func:`corpus_sha256` (also used by the store writer, which streams data)."""
    encoded = name.encode("utf-8", errors="surrogatepass")
    return len(encoded).to_bytes(8, "little") + encoded + n_bytes.to_bytes(8, "little") + data_sha256


# ----------------------------------------------------------------------------------------------------------------------
# sources


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_modules(root: Path | None = None) -> list[tuple[str, Path]]:
    """(dotted module name, path) of every standard-library source file the corpora use, sorted by path."""
    root = stdlib_root() if root is None else root
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIPPED_DIRS)
        rel = Path(dirpath).relative_to(root)
        for filename in sorted(filenames):
            if not filename.endswith(".py") or filename.startswith("test_"):
                continue
            parts = [*rel.parts, filename.removesuffix(".py")]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            if parts and all(p.isidentifier() for p in parts):
                found.append((".".join(parts), Path(dirpath) / filename))
    return sorted(found, key=lambda item: item[1].relative_to(root).parts)


def _docstrings(body: list[ast.stmt], prefix: str) -> Iterator[tuple[str, str]]:
    """(heading, docstring) of every class and function in ``body``, depth first in source order."""
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            qualname = f"{prefix}{node.name}"
            if isinstance(node, ast.ClassDef):
                heading = f"class {qualname}"
            else:
                heading = f"def {qualname}({ast.unparse(node.args)})"
            doc = ast.get_docstring(node, clean=True)
            if doc:
                yield heading, doc
            yield from _docstrings(node.body, f"{qualname}.")


def module_docstrings(module: str, source: bytes) -> str | None:
    """The docstring document of one module (``None`` when it has no docstring or does not parse)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return None
    sections = []
    doc = ast.get_docstring(tree, clean=True)
    if doc:
        sections.append(doc)
    sections += [f"{heading}\n\n{doc}" for heading, doc in _docstrings(tree.body, "")]
    if not sections:
        return None
    return f"Module {module}\n\n" + "\n\n".join(sections) + "\n"


# ----------------------------------------------------------------------------------------------------------------------
# the corpora (cached per process; nothing is built at import time)


@functools.cache
def pydoc_topics() -> tuple[Document, ...]:
    from pydoc_data.topics import topics

    return tuple(Document(f"pydoc:{name}", text.encode("utf-8")) for name, text in sorted(topics.items()))


@functools.cache
def stdlib_docs() -> tuple[Document, ...]:
    modules = []
    for module, path in stdlib_modules():
        text = module_docstrings(module, path.read_bytes())
        if text is not None:
            modules.append(Document(f"stdlib:{module}", text.encode("utf-8", errors="surrogatepass")))
    return pydoc_topics() + tuple(modules)


@functools.cache
def stdlib_code() -> tuple[Document, ...]:
    return tuple(Document(f"stdlib:{module}", path.read_bytes()) for module, path in stdlib_modules())


def builtin_documents(name: str = "pydoc_topics") -> tuple[Document, ...]:
    """The built-in corpus ``name`` (one of :data:`BUILTIN_CORPORA`), built once per process."""
    builders = {"pydoc_topics": pydoc_topics, "stdlib_docs": stdlib_docs, "stdlib_code": stdlib_code}
    if name not in builders:
        raise ValueError(f"builtin={name!r} is not a built-in corpus; choose one of {list(BUILTIN_CORPORA)}")
    return builders[name]()


@functools.cache
def builtin_sha256(name: str) -> str:
    return corpus_sha256((d.name, d.data) for d in builtin_documents(name))
