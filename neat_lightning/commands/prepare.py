"""``neat prepare``: turn text files or a Hugging Face dataset into an on-disk byte store; check one.

    neat prepare --input 'corpus/**/*.txt' --out data/corpus
    neat prepare --hf-path saved_dataset/ --text-column text --out data/web
    neat prepare --hf-data-files 'dump/*.txt' --out data/dump
    neat prepare --verify data/web

Each input file is one document (read in chunks: a file larger than RAM is fine; any bytes, any encoding), named
by its path as given or as the glob expands it, in that order; each row of a dataset is one document named
``ORIGIN[i]``. These are the names ``ByteTextDataModule`` gives the same sources in memory, so a store and the files
it came from split into the same train and validation documents and give the same windows for the same seed.
Train with ``ByteTextDataModule(data_dir=OUT)`` (``--data.data_dir OUT``). The store is written to a temporary
directory beside OUT and renamed when complete. ``--verify`` recomputes every file's sha256 against the manifest.
Hugging Face sources are read offline (a ``save_to_disk`` directory, or text files through ``load_dataset``).
The store format is described in :mod:`neat_lightning.data.byte_store`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from neat_lightning.commands import doc_summary

PROG = "neat prepare"
READ_CHUNK = 16 * 2**20


def file_chunks(path: Path) -> Iterator[bytes]:
    """The file's bytes, ``READ_CHUNK`` at a time."""
    with open(path, "rb") as f:
        while block := f.read(READ_CHUNK):
            yield block


def source_rows(input: Sequence[str] | None = None, hf_path: str | None = None,
                hf_data_files: Sequence[str] | None = None, text_column: str = "text",
                ) -> tuple[Iterator[tuple[str, Any]], str, list[str]]:
    """(name, chunks) per document, the option that names the input, and a description for the manifest."""
    from neat_lightning.data.loading import resolve_paths

    if sum(x is not None for x in (input, hf_path, hf_data_files)) != 1:
        raise ValueError("give exactly one source: --input, --hf-path or --hf-data-files")
    if input is not None:
        paths = resolve_paths(list(input), "--input")
        return ((str(p), file_chunks(p)) for p in paths), "--input", [f"files: {p}" for p in input]

    import datasets

    from neat_lightning.data.bytes import hf_rows

    if hf_path is not None:
        if not Path(hf_path).exists():
            raise FileNotFoundError(f"--hf-path: no such dataset directory: {hf_path!r}")
        rows = hf_rows(datasets.load_from_disk(hf_path), text_column, hf_path)
        field, source = "--hf-path", [f"save_to_disk: {hf_path}"]
    else:
        spec = hf_data_files[0] if len(hf_data_files) == 1 else list(hf_data_files)
        for pattern in hf_data_files:
            resolve_paths([pattern], "--hf-data-files")  # a clear error before datasets' own
        ds = datasets.load_dataset("text", data_files=spec, sample_by="document", split="train")
        rows = hf_rows(ds, "text", f"hf_data_files={spec}")
        field, source = "--hf-data-files", [f"load_dataset text: {spec}"]
    return ((name, [data]) for name, data in rows), field, source


def prepare_store(out: str | Path, input: Sequence[str] | None = None, hf_path: str | None = None,
                  hf_data_files: Sequence[str] | None = None, text_column: str = "text",
                  shard_bytes: int = 256 * 2**20, overwrite: bool = False) -> dict[str, Any]:
    """Write the store ``out`` from one source; returns the manifest plus ``seconds`` and ``mb_s`` (input MB per
    second, reading and writing included).

    Raises:
        FileNotFoundError: a missing input file, a glob that matches nothing, a missing dataset directory.
        FileExistsError: ``out`` exists and ``overwrite`` is false.
        ValueError: the input holds no bytes; a dataset without ``text_column``.
    """
    from neat_lightning.data.byte_store import StoreWriter

    start = time.perf_counter()
    rows, field, source = source_rows(input, hf_path, hf_data_files, text_column)
    with StoreWriter(out, shard_bytes, overwrite, source) as writer:
        for name, chunks in rows:
            writer.add(name, chunks)
        if writer.n_bytes == 0:
            raise ValueError(f"{field}: the input is empty (0 bytes in {writer.n_documents} documents)")
        manifest = writer.finish()
    seconds = time.perf_counter() - start
    return {**manifest, "seconds": seconds, "mb_s": manifest["bytes"] / 1e6 / max(seconds, 1e-9)}


def verify(path: str) -> dict[str, Any]:
    from neat_lightning.data.byte_store import ByteStore

    start = time.perf_counter()
    store = ByteStore(path, "--verify")
    store.verify()
    return {**store.manifest, "seconds": time.perf_counter() - start}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=doc_summary(__doc__),
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", metavar="GLOB", help="text files or globs; each file is a document")
    source.add_argument("--hf-path", help="a directory written by datasets' save_to_disk")
    source.add_argument("--hf-data-files", nargs="+", metavar="GLOB",
                        help="text files read by load_dataset('text', sample_by='document')")
    source.add_argument("--verify", metavar="DIR", help="recompute every sha256 of the store DIR")
    parser.add_argument("--out", help="the store directory to write")
    parser.add_argument("--text-column", default="text", help="the text column of --hf-path (default: text)")
    parser.add_argument("--shard-mb", type=float, default=256.0, help="MiB per shard (default: 256)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object on stdout")
    args = parser.parse_args(argv)
    if args.verify is None and not args.out:
        parser.error("--out is required to write a store")
    if args.shard_mb <= 0:
        parser.error(f"--shard-mb={args.shard_mb} must be > 0")

    try:
        if args.verify:
            result = verify(args.verify)
        else:
            result = prepare_store(args.out, args.input, args.hf_path, args.hf_data_files, args.text_column,
                                   int(args.shard_mb * 2**20), args.overwrite)
    except (FileNotFoundError, IsADirectoryError, FileExistsError, ValueError, TypeError) as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({k: result[k] for k in ("documents", "bytes", "content_sha256", "seconds")}
                         | {"shards": len(result["shards"]), **({"mb_s": result["mb_s"]} if "mb_s" in result else {})}))
    elif args.verify:
        print(f"{args.verify}: {result['documents']:,} documents, {result['bytes']:,} bytes; all "
              f"{len(result['shards']) + 3} files match their sha256 ({result['seconds']:.1f} s)")
    else:
        print(f"{args.out}: {result['documents']:,} documents, {result['bytes']:,} bytes in "
              f"{len(result['shards'])} shards, content sha256 {result['content_sha256']} "
              f"({result['seconds']:.1f} s, {result['mb_s']:.1f} MB/s)")
    return 0
