import pytest
import torch

from neat_lightning.codec import BOS_ID, EOS_ID, decode
from neat_lightning.data.qa import QADataModule, arithmetic_pairs, encode_pairs, fact_pairs, split_pairs, tsv_pairs


def test_arithmetic_answers_are_correct():
    for p in arithmetic_pairs(6, 4):
        a, op, b = p.question.removeprefix("What is ").removesuffix("?").split()
        want = {"plus": int(a) + int(b), "minus": int(a) - int(b), "times": int(a) * int(b)}[op]
        assert p.answer == f"{a} {op} {b} is {want}."
        assert want >= 0


def test_split_holds_out_arithmetic_and_keeps_facts_on_both_sides():
    pairs = arithmetic_pairs(10, 5) + fact_pairs()
    train, val = split_pairs(pairs, 0.2, seed=0)
    arith_train = {p.question for p in train if p.kind == "arithmetic"}
    arith_val = {p.question for p in val if p.kind == "arithmetic"}
    assert arith_val and not (arith_train & arith_val)
    facts = {p.question for p in fact_pairs()}
    assert facts <= {p.question for p in train} and facts <= {p.question for p in val}
    assert split_pairs(pairs, 0.2, seed=0) == (train, val)


def test_encode_pairs_frames_answers():
    q, a = encode_pairs(fact_pairs()[:3], 40, 40)
    assert q.shape == (3, 40) and a.shape == (3, 42)
    assert (a[:, 0] == BOS_ID).all()
    assert decode(a[0, 1:]) == fact_pairs()[0].answer
    assert ((a == EOS_ID).sum(1) == 1).all()
    q, a = encode_pairs(fact_pairs()[:1], 5, 3)  # truncation keeps the question's end and the answer's EOS
    assert decode(q[0]) == fact_pairs()[0].question[-5:]
    assert a[0, -1] == EOS_ID


def test_tsv_pairs(tmp_path):
    f = tmp_path / "qa.tsv"
    f.write_text("# comment\n\nWho wrote Hamlet?\tShakespeare\n2+2\t4\n")
    assert [(p.question, p.answer) for p in tsv_pairs([str(f)])] == [("Who wrote Hamlet?", "Shakespeare"), ("2+2", "4")]
    bad = tmp_path / "bad.tsv"
    bad.write_text("no tab here\n")
    with pytest.raises(ValueError, match=r"bad.tsv:1 has no tab"):
        tsv_pairs([str(bad)])
    with pytest.raises(FileNotFoundError, match="tsv_files: no such file"):
        tsv_pairs([str(tmp_path / "missing.tsv")])


def test_datamodule_batches_are_pure_functions_of_step(tmp_path):
    dm = QADataModule(batch_size=4, batches_per_epoch=5, max_operand=6, max_factor=3)
    dm.setup()
    ds = dm.train_dataloader().dataset
    first = list(ds)
    ds.start_batch = 3
    resumed = list(ds)
    assert len(first) == 5 and len(resumed) == 2
    for a, b in zip(first[3:], resumed):
        assert torch.equal(a["question"], b["question"]) and torch.equal(a["answer"], b["answer"])
    val = list(dm.val_dataloader())
    assert sum(len(b["question"]) for b in val) == len(dm.val_pairs)
    q, a = dm.validation_pairs(3)[0]
    assert isinstance(q, str) and a.endswith(".")


def test_datamodule_tsv_only(tmp_path):
    f = tmp_path / "qa.tsv"
    f.write_text("".join(f"question {i}?\tanswer {i}\n" for i in range(50)))
    dm = QADataModule(kinds=[], tsv_files=[str(f)], val_fraction=0.2)
    dm.setup()
    assert {p.kind for p in dm.train_pairs + dm.val_pairs} == {"tsv"}
    assert len(dm.train_pairs) + len(dm.val_pairs) == 50


@pytest.mark.parametrize("kw, match", [
    ({"kinds": ["poetry"]}, "kinds contains 'poetry'"),
    ({"kinds": []}, "no tsv_files"),
    ({"batch_size": 0}, "batch_size=0"),
    ({"val_fraction": 1.0}, "val_fraction=1.0"),
])
def test_datamodule_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        QADataModule(**kw)
