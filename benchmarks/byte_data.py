"""Byte stores at scale: ``neat prepare`` throughput, loader windows/s and the loader's peak RSS by corpus size.

For each size, a corpus of generated documents (1 KiB to 64 KiB, log-uniform; slices of the built-in pydoc topics,
so the bytes are text) is written to a temporary directory, one file per document. Then, each in a fresh process:

* ``neat prepare --input DIR/**/*.txt --out STORE`` -- ``prepare_mb_s`` is corpus MB over the command's own timing
  (reading, hashing and writing; interpreter start excluded, reported separately as ``prepare_wall_s``);
* a process that imports the package, builds ``ByteTextDataModule(data_dir=STORE)`` with the quickstart's shape
  (block 256, batch 32), runs ``setup`` and reads ``--batches`` training batches -- ``windows_s`` (windows per second
  while reading) and ``peak_rss_mb`` (``ru_maxrss`` of that process, imports included; ``import_rss_mb`` is the RSS
  before the DataModule is built).

Targets: ``peak_rss_mb`` at 1 GB within +64 MB of the 10 MB row; loader bytes/s (``windows_s`` x block) at least
100x the quickstart's training consumption (batch x block x steps/s; benchmarks/results/byte_lm.json measures the
quickstart model's step time).

    python benchmarks/byte_data.py                     # 10MB 100MB 1GB
    python benchmarks/byte_data.py --sizes 10MB 100MB  # a subset; rows of other sizes in the JSON are kept

Prints a table and writes benchmarks/results/byte_data.json (``rows``: ``corpus_bytes``, ``prepare_mb_s``,
``windows_s``, ``peak_rss_mb``, ...).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
REPO = Path(__file__).resolve().parents[1]
UNITS = {"": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}
QUICKSTART = {"batch": 32, "block": 256}  # configs/byte_lm_quickstart.yaml

LOADER = """
import json, resource, sys, time
sys.path.insert(0, {repo!r})
from neat_lightning.data.bytes import ByteTextDataModule
import torch
torch.set_num_threads(1)
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t0 = time.perf_counter()
dm = ByteTextDataModule(data_dir={store!r}, block_size={block}, batch_size={batch}, batches_per_epoch={batches})
dm.setup("fit")
t1 = time.perf_counter()
n = 0
for batch in dm.train_dataloader():
    n += batch.shape[0]
t2 = time.perf_counter()
print(json.dumps({{"setup_s": t1 - t0, "read_s": t2 - t1, "windows": n, "import_rss_mb": rss0,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "train_docs": len(dm.train_docs)}}))
"""


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMG]?B?)\s*", text.upper())
    if not m:
        raise argparse.ArgumentTypeError(f"--sizes: {text!r} is not a size like 10MB or 1GB")
    unit = m.group(2) if m.group(2).endswith("B") or not m.group(2) else m.group(2) + "B"
    return int(float(m.group(1)) * UNITS[unit])


def label(n: int) -> str:
    return f"{n / 1e9:g} GB" if n >= 10**9 else f"{n / 1e6:g} MB"


def generate(root: Path, size: int, seed: int = 0) -> int:
    """Documents of 1-64 KiB (log-uniform) cut from the pydoc topics, ``size`` bytes in all; returns the count."""
    from pydoc_data.topics import topics

    base = "\n\n".join(topics[k] for k in sorted(topics)).encode()
    base = base + base[: 2**16]  # any start leaves room for the longest document
    rng = np.random.default_rng(seed)
    written = n = 0
    while written < size:
        length = int(min(size - written, np.exp(rng.uniform(np.log(2**10), np.log(2**16)))))
        start = int(rng.integers(0, len(base) - 2**16))
        folder = root / f"{n // 1000:04d}"
        if n % 1000 == 0:
            folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{n:07d}.txt").write_bytes(base[start : start + length])
        written, n = written + length, n + 1
    return n


def measure(size: int, work: Path, args) -> dict:
    corpus, store = work / "corpus", work / "store"
    t = time.perf_counter()
    n_docs = generate(corpus, size)
    generate_s = time.perf_counter() - t
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "neat_lightning.cli", "prepare", "--input", f"{corpus}/**/*.txt",
                           "--out", str(store), "--json"], capture_output=True, text=True, env=env, cwd=REPO,
                          check=False)
    prepare_wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"neat prepare failed:\n{proc.stderr[-3000:]}")
    prepared = json.loads(proc.stdout.strip().splitlines()[-1])
    shutil.rmtree(corpus)  # the loader reads the store only
    code = LOADER.format(repo=str(REPO), store=str(store), block=args.block, batch=args.batch, batches=args.batches)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"loader failed:\n{proc.stderr[-3000:]}")
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    shutil.rmtree(store)
    return {
        "corpus_bytes": prepared["bytes"], "documents": n_docs, "shards": prepared["shards"],
        "prepare_mb_s": prepared["mb_s"], "prepare_s": prepared["seconds"], "prepare_wall_s": prepare_wall,
        "windows_s": loaded["windows"] / loaded["read_s"], "batches": args.batches, "setup_s": loaded["setup_s"],
        "peak_rss_mb": loaded["peak_rss_mb"], "import_rss_mb": loaded["import_rss_mb"],
        "generate_s": generate_s, "load_average": os.getloadavg(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", type=parse_size, default=[10**7, 10**8, 10**9])
    parser.add_argument("--batches", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=QUICKSTART["batch"])
    parser.add_argument("--block", type=int, default=QUICKSTART["block"])
    parser.add_argument("--tmp", type=Path, default=None, help="where the corpora are generated (default: TMPDIR)")
    parser.add_argument("--out", type=Path, default=RESULTS / "byte_data.json")
    args = parser.parse_args()

    rows = []
    for size in args.sizes:
        with tempfile.TemporaryDirectory(dir=args.tmp, prefix="neat_byte_data.") as work:
            row = measure(size, Path(work), args)
        rows.append(row)
        print(f"{label(size)}: {json.dumps(row)}", flush=True)

    previous = json.loads(args.out.read_text()).get("rows", []) if args.out.exists() else []
    measured = {r["corpus_bytes"] for r in rows}
    kept = [r for r in previous if r["corpus_bytes"] not in measured]
    all_rows = sorted(kept + rows, key=lambda r: r["corpus_bytes"])

    step_s = None
    lm = RESULTS / "byte_lm.json"
    if lm.exists():
        training = json.loads(lm.read_text()).get("training") or []
        step_s = next((r["s_per_step"] for r in training if r["loop"] == "Lightning"), None)
    need = None if step_s is None else 100 * QUICKSTART["batch"] / step_s  # windows/s at 100x consumption

    print(f"\n{'corpus':>9} {'docs':>8} {'prepare MB/s':>13} {'windows/s':>10} {'x quickstart':>13} "
          f"{'peak RSS MB':>12} {'import RSS MB':>14} {'setup s':>8} {'load avg':>9}")
    for r in all_rows:
        ratio = f"{r['windows_s'] / need * 100:.0f}x" if need else "-"
        print(f"{label(r['corpus_bytes']):>9} {r['documents']:>8,} {r['prepare_mb_s']:>13.1f} "
              f"{r['windows_s']:>10,.0f} {ratio:>13} {r['peak_rss_mb']:>12.1f} {r['import_rss_mb']:>14.1f} "
              f"{r['setup_s']:>8.2f} {r['load_average'][0]:>9.2f}")
    small = next((r for r in all_rows if r["corpus_bytes"] <= 2 * 10**7), None)
    big = next((r for r in all_rows if r["corpus_bytes"] >= 10**9), None)
    if small and big:
        growth = big["peak_rss_mb"] - small["peak_rss_mb"]
        print(f"peak RSS 1 GB - 10 MB: {growth:+.1f} MB (target <= +64 MB): {'met' if growth <= 64 else 'NOT met'}")
    if need:
        print(f"quickstart consumption: {QUICKSTART['batch']} x {QUICKSTART['block']} bytes per step at "
              f"{step_s:.3f} s/step (byte_lm.json) = {QUICKSTART['batch'] / step_s:.1f} windows/s; 100x = "
              f"{need:,.0f} windows/s")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {"config": {"batch": args.batch, "block": args.block, "batches": args.batches,
                         "documents": "1-64 KiB log-uniform slices of pydoc_data.topics"},
              "machine": {"cpu": platform.machine(), "cores": os.cpu_count(), "python": platform.python_version()},
              "quickstart": {"s_per_step": step_s, "windows_s_needed_100x": need},
              "rows": all_rows}
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
