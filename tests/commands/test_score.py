"""``neat score``: static and prequential (test-time adaptive) bits per byte of ByteLM and NeatModel checkpoints."""

from __future__ import annotations

import copy
import hashlib
import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from neat_lightning.codec import EOS_ID, ids_from_bytes
from neat_lightning.commands.score import (
    ByteScorer,
    ScoreSettings,
    compression_bpb,
    describe_checkpoint,
    load_scorer,
    main,
    score_bytes,
    static_scores,
    window_spans,
)
from neat_lightning.components.titans import TitansConfig
from neat_lightning.data import ByteTextDataModule
from neat_lightning.modules import ByteLM, NeatModel
from tests.conftest import neat

TRAIN = "The quick brown fox jumps over the lazy dog; the lazy dog sleeps on under the warm afternoon sun.\n" * 30
# never seen in training, and repetitive: a model that learns while it reads gets better at it
TEXT = "Pack my box with five dozen liquor jugs, said the quiet grocer to the very late customer.\n" * 12
KEYS = {"bytes", "bpb", "bpb_adaptive", "gzip9", "bz2_9", "xz9e", "seconds"}


def fit_and_save(model: L.LightningModule, root: Path, name: str) -> Path:
    (root / "train.txt").write_text(TRAIN)
    L.seed_everything(0)
    trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0)
    trainer.fit(model, ByteTextDataModule(train_files=[str(root / "train.txt")], block_size=32, batch_size=4,
                                          batches_per_epoch=3))
    trainer.save_checkpoint(root / name)
    return root / name


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A ByteLM and a NeatModel with Titans memory, each trained three steps, and a text file to score."""
    root = tmp_path_factory.mktemp("score")
    (root / "text.txt").write_text(TEXT)
    lm = fit_and_save(ByteLM(dim=16, n_layers=1, heads=2, block_size=32, warmup_steps=1), root, "lm.ckpt")
    memory = TitansConfig(dim_memory=8, chunk_size=8, persistent_tokens=2, memory_size=16)
    neat_model = NeatModel(dim=16, n_layers=1, heads=2, block_size=32, window=16, titans_config=memory, svf=False,
                           warmup_steps=1)
    return {"lm": lm, "neat": fit_and_save(neat_model, root, "neat.ckpt"), "text": root / "text.txt"}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("n, context, stride", [(1, 8, 4), (7, 8, 4), (8, 8, 4), (9, 8, 4), (100, 8, 4),
                                                (100, 8, 8), (100, 8, 1), (37, 16, 5)])
def test_windows_score_every_byte_once_with_the_context_they_promise(n, context, stride):
    spans = window_spans(n, context, stride)
    scored = [t for s, e, f in spans for t in range(f + 1, e + 1)]
    assert scored == list(range(1, n + 1))
    for i, (s, e, f) in enumerate(spans):
        assert e - s == min(context, n) and s <= f < e
        if i:
            assert e - f <= stride and f - s >= context - stride  # new bytes, and the context before them


def test_static_bpb_is_the_model_cross_entropy_from_eos(files):
    """Input shorter than the context: one window, the plain next-byte cross-entropy of EOS + bytes."""
    model = load_scorer(files["lm"])
    data = TEXT.encode()[:30]
    (static,) = score_bytes(model, data, ScoreSettings(context=32, stride=16))
    ids = torch.cat([torch.tensor([EOS_ID]), ids_from_bytes(data)])[None]
    with torch.no_grad():
        nats = F.cross_entropy(model(ids[:, :-1])[0], ids[0, 1:], reduction="sum")
    assert static.name == "static" and static.bpb == pytest.approx(float(nats) / len(data) / math.log(2), rel=1e-5)


def test_adaptive_scores_each_window_before_learning_from_it(files):
    """The adaptive pass scores window 0 exactly as the static pass does, and window 1 exactly as a model that
    took one Adam step on window 0 alone: it never learns from bytes before scoring them."""
    model = load_scorer(files["lm"])
    settings = ScoreSettings(context=32, stride=16, lr=3e-3)
    data = TEXT.encode()
    before = copy.deepcopy(model.state_dict())
    static, adaptive = score_bytes(model, data, settings, adapt=True)
    assert adaptive.name == "adaptive" and len(adaptive.window_nats) == len(window_spans(len(data), 32, 16))
    assert float(adaptive.window_nats[0]) == pytest.approx(float(static.window_nats[0]), rel=1e-5)
    assert float(adaptive.window_nats[1]) != pytest.approx(float(static.window_nats[1]), rel=1e-4)

    # replay by hand: score window 1 after one Adam step on window 0
    ids = torch.cat([torch.tensor([EOS_ID]), ids_from_bytes(data)])
    (s0, e0, _), (s1, e1, f1) = window_spans(len(data), 32, 16)[:2]
    learner = copy.deepcopy(model).eval().requires_grad_(True)
    optimizer = torch.optim.Adam(learner.parameters(), lr=3e-3)
    ByteScorer(learner).nats(ids[s0 : e0 + 1][None])[0].mean().backward()
    optimizer.step()
    with torch.no_grad():
        window1 = ByteScorer(learner).nats(ids[s1 : e1 + 1][None])[0][0, f1 - s1 :].sum()
    assert float(adaptive.window_nats[1]) == pytest.approx(float(window1), rel=1e-5)

    assert adaptive.bpb < static.bpb  # it learns the repeated line
    for key, value in model.state_dict().items():  # the caller's model is untouched
        assert torch.equal(value, before[key]), key


def test_static_windows_batched_or_one_by_one_agree(files):
    model = load_scorer(files["lm"])
    ids = torch.cat([torch.tensor([EOS_ID]), ids_from_bytes(TEXT.encode())])
    spans = window_spans(len(TEXT), 32, 16)
    batched = static_scores(ByteScorer(model), ids, spans, batch_size=7)
    single = static_scores(ByteScorer(model), ids, spans, batch_size=1)
    assert torch.allclose(batched, single, rtol=1e-5)


def test_json_keys_and_the_checkpoint_file_is_untouched(files, capsys):
    digest, mtime = sha256(files["lm"]), files["lm"].stat().st_mtime_ns
    code = main(["--ckpt", str(files["lm"]), "--input", str(files["text"]), "--adapt", "--json", "--context", "32",
                 "--stride", "16", "--lr", "3e-3"])
    assert code == 0
    out = capsys.readouterr().out
    result = json.loads(out)  # one object and nothing else on stdout
    assert KEYS <= set(result) and result["bytes"] == len(TEXT)
    assert {result["gzip9"], result["bz2_9"], result["xz9e"]} == set(compression_bpb(TEXT.encode()).values())
    assert 0 < result["bpb_adaptive"] < result["bpb"] < 9 and result["seconds"] > 0
    assert result["checkpoint"]["global_step"] == 3 and result["settings"]["lr"] == 3e-3
    assert sha256(files["lm"]) == digest and files["lm"].stat().st_mtime_ns == mtime


def test_the_cache_passes_build_on_each_pass_and_learn_repeats(files):
    """``cache=True`` adds ``static + cache`` and ``adaptive + cache``: per byte the cache's mixture over the pass
    it builds on (the first bytes, with nothing counted yet, keep their nats), cheaper on text that repeats."""
    from neat_lightning.components.byte_cache import cache_nats, context_counts

    model = load_scorer(files["lm"])
    data = TEXT.encode()
    settings = ScoreSettings(context=32, stride=16, lr=3e-3, cache_orders=(2, 5))
    passes = score_bytes(model, data, settings, adapt=True, cache=True)
    static, adaptive, static_c, adaptive_c = passes
    assert [p.name for p in passes] == ["static", "adaptive", "static + cache", "adaptive + cache"]
    counts = context_counts(data, 5, 2)
    assert torch.allclose(static_c.byte_nats, cache_nats(static.byte_nats, counts))
    assert torch.allclose(static_c.byte_nats[:2], static.byte_nats[:2])
    assert static_c.bpb < static.bpb and adaptive_c.bpb < adaptive.bpb  # TEXT repeats its line
    assert static_c.window_nats.sum() == pytest.approx(float(static_c.byte_nats.sum()))
    assert static_c.seconds >= static.seconds


def test_json_has_the_cache_keys(files, capsys):
    assert main(["--ckpt", str(files["lm"]), "--input", str(files["text"]), "--adapt", "--cache", "--json",
                 "--context", "32", "--cache-orders", "2", "6"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["bpb_cache"] < result["bpb"] and result["bpb_adaptive_cache"] < result["bpb_adaptive"]
    assert result["settings"]["cache"] is True and result["settings"]["cache_orders"] == [2, 6]


def test_table_names_the_checkpoint(files, capsys):
    assert main(["--ckpt", str(files["lm"]), "--input", str(files["text"]), "--context", "32"]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert f"checkpoint: {files['lm']} (ByteLM, global step 3, written " in printed
    for label in ("ByteLM (", "static", "gzip -9", "bz2 -9", "xz -9e", "bytes/s"):
        assert label in printed, label
    assert "adaptive" not in printed
    assert describe_checkpoint(files["lm"]).startswith(f"{files['lm']} (ByteLM, global step 3, written ")


def test_titans_memory_and_gradient_side_by_side(files, capsys):
    """A NeatModel with Titans memory: static (memory from its slow weights in every window), memory (state carried
    through the input), gradient and memory + gradient. Every pass scores window 0 from the same start."""
    model = load_scorer(files["neat"])
    passes = score_bytes(model, TEXT.encode(), ScoreSettings(context=32, stride=16, lr=3e-3), adapt=True)
    assert [p.name for p in passes] == ["static", "memory", "gradient", "memory + gradient"]
    first = [float(p.window_nats[0]) for p in passes]
    assert first == pytest.approx([first[0]] * 4, rel=1e-5)
    static, memory, gradient, both = passes
    assert not torch.allclose(memory.window_nats[1:], static.window_nats[1:])  # the carried state is used
    assert gradient.bpb < static.bpb and both.bpb < memory.bpb

    digest = sha256(files["neat"])
    assert main(["--ckpt", str(files["neat"]), "--input", str(files["text"]), "--adapt", "--json", "--context",
                 "32", "--stride", "16"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert KEYS | {"bpb_memory", "bpb_gradient"} <= set(result) and sha256(files["neat"]) == digest


@pytest.mark.parametrize("args, message", [
    (["--input", "{missing}"], r"^neat score: --input: no such file: '.*nothing.txt'$"),
    (["--input", "{empty}"], r"^neat score: --input: the input is empty \(0 bytes in 1 files\)$"),
    (["--input", "{text}", "--context", "16", "--stride", "32"],
     r"^neat score: --stride=32 must be in \[1, --context=16\]$"),
    (["--input", "{text}", "--steps", "0"], r"^neat score: --steps=0 must be >= 1$"),
    (["--input", "{text}", "--lr", "-1"], r"^neat score: --lr=-1.0 must be a finite number > 0$"),
    (["--input", "{text}", "--max-bytes", "0"], r"^neat score: --max-bytes=0 must be >= 1$"),
    (["--input", "{text}", "--cache", "--cache-orders", "6", "3"],
     r"^neat score: --cache-orders=6 3 must satisfy 1 <= shortest <= longest$"),
    (["--input", "{text}", "--ckpt", "{not_a_scorer}"],
     (r"^neat score: --ckpt: checkpoint '.*vqvae.ckpt' holds a VQVAE, which does not predict bytes; neat score "
      r"takes a ByteLM or NeatModel checkpoint$")),
])
def test_bad_inputs_are_one_line(args, message, files, tmp_path, capsys):
    import re

    (tmp_path / "empty.txt").write_text("")
    torch.save({"hyper_parameters": {"_class_path": "neat_lightning.modules.VQVAE"}}, tmp_path / "vqvae.ckpt")
    names = {"missing": tmp_path / "nothing.txt", "empty": tmp_path / "empty.txt", "text": files["text"],
             "not_a_scorer": tmp_path / "vqvae.ckpt"}
    args = [a.format(**names) for a in args]
    if "--ckpt" not in args:
        args += ["--ckpt", str(files["lm"])]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert re.search(message, err), err


@pytest.mark.slow
def test_the_neat_command(files, tmp_path):
    proc = neat("score", "--ckpt", str(files["lm"]), "--input", str(files["text"]), "--adapt", "--json",
                "--context", "32", "--stride", "16", cwd=tmp_path)
    result = json.loads(proc.stdout)
    assert KEYS <= set(result) and result["bytes"] == len(TEXT)
