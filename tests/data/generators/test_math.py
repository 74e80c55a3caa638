"""Synthetic math / memory-task generator: answers, memory gaps, determinism, packing into rows."""

from __future__ import annotations

import random
import re

import pytest

from neat_lightning.codec import BOS_ID, EOS_ID, PAD_ID, decode
from neat_lightning.data.generators.math import (
    KEYS,
    TASK_TYPES,
    Problem,
    check_answer,
    encode_segments,
    encode_problem,
    generate_problem,
    generate_problems,
    mqar,
    pack_problems,
    parse_answer,
    routine_text,
)


def test_every_generated_answer_passes_check_answer_on_its_own_solution():
    problems = generate_problems(10_000, seed=7, gap_range=(0, 48))
    assert {p.task for p in problems} == set(TASK_TYPES)
    assert {p.difficulty for p in problems} == {1, 2, 3}
    assert all(check_answer(p, p.solution) for p in problems)
    assert all(check_answer(p, p.text) for p in problems[:500] if p.marker)
    assert all(check_answer(p, t.solution, j + 1) for p in problems for j, t in enumerate(p.turns))
    # and a wrong final answer fails: the check can fail
    wrong = [p.solution.rsplit(p.marker, 1)[0] + p.marker + p.answer + "1\n" if p.marker else p.answer + "1."
             for p in problems[:500]]
    assert not any(check_answer(p, w) for p, w in zip(problems, wrong))


def _evaluate(expr: str, x: int | None = None) -> int:
    expr = re.sub(r"(\d)x", r"\1*X", expr).replace("x", "X")
    assert re.fullmatch(r"[\dX+\-*() ]+", expr), expr
    return eval(expr, {"__builtins__": {}}, {"X": x})  # only digits, X and + - * ( )


@pytest.mark.parametrize("difficulty", [1, 2, 3])
def test_math_answers_are_mathematically_right(difficulty):
    for i in range(200):
        rng = random.Random(i)
        p = generate_problem("arithmetic", difficulty, rng)
        assert _evaluate(p.prompt[3:].split("=")[0]) == int(p.answer)
        p = generate_problem("algebra", difficulty, rng)
        left, right = p.prompt[3:].split(",")[0].split("=")
        assert _evaluate(left, int(p.answer)) == _evaluate(right, int(p.answer))
        p = generate_problem("sequence", difficulty, rng)
        terms = [int(t) for t in p.prompt[3:].split(",?")[0].split(",")] + [int(p.answer)]
        d1 = [b - a for a, b in zip(terms, terms[1:])]
        d2 = [b - a for a, b in zip(d1, d1[1:])]
        ratios = {b / a for a, b in zip(terms, terms[1:]) if a}
        assert len(set(d1)) == 1 or len(set(d2)) == 1 or len(ratios) == 1
        p = generate_problem("word_problem", difficulty, rng)
        last_step = p.solution.splitlines()[-2]
        assert _evaluate(last_step.split("=")[0]) == int(p.answer)


@pytest.mark.parametrize(
    "text, ok",
    [("#### 7", True), ("####7\n", True), ("#### +7", True), ("#### 007", True), ("x\n#### 3\n#### 7\n", True),
     ("#### 7.5", False), ("#### 8", False), ("7", False), ("####", False), ("#### -7", False)],
)
def test_check_answer_parses_the_last_marker(text, ok):
    assert check_answer(Problem("arithmetic", 1, "Q: 3+4=?\n", "", "7"), text) is ok


def test_check_answer_words_compare_case_insensitively():
    p = Problem("surprise", 1, "", "", "owl")
    assert check_answer(p, "#### OWL\n") and not check_answer(p, "#### owls")
    assert parse_answer("no marker") is None


@pytest.mark.parametrize("gap", [0, 1, 37, 300])
def test_temporal_gap_puts_exactly_gap_routine_bytes_between_facts_and_question(gap):
    p = generate_problem("temporal_gap", 2, random.Random(gap), gap=gap)
    header, routine, question = p.prompt.split("\n")[:3]
    assert header.startswith("Remember: ") and question.startswith("Q: ")
    assert len(routine) == gap == p.gap
    assert not re.search(r"[\d=?#]", routine)
    key = question[3:-1]
    assert f"{key}={p.answer}." in header


def test_fact_recall_and_surprise_ask_what_was_stated():
    for seed in range(50):
        p = generate_problem("fact_recall", 3, random.Random(seed), gap=80)
        key = p.prompt.rsplit("Q: ", 1)[1][:-2]
        assert f"{key}={p.answer}." in p.prompt
        s = generate_problem("surprise", 2, random.Random(seed), gap=20)
        facts = re.findall(r"(\w+)=(\d)\.", s.prompt)
        odd = [k for k, v in facts if v != "0"]
        assert odd == [s.answer] and s.answer in KEYS and len(facts) >= 3


def test_generation_is_deterministic_from_the_seed():
    assert generate_problems(40, seed=3) == generate_problems(40, seed=3)
    assert generate_problems(40, seed=3) != generate_problems(40, seed=4)
    assert len(routine_text(random.Random(0), 123)) == 123


def test_generator_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"task='calculus' is not a task type"):
        generate_problem("calculus", 1, random.Random(0))
    with pytest.raises(ValueError, match=r"difficulty=4 must be one of"):
        generate_problem("arithmetic", 4, random.Random(0))
    with pytest.raises(ValueError, match=r"gap=-1 must be >= 0"):
        generate_problem("temporal_gap", 1, random.Random(0), gap=-1)


def test_encode_and_pack_mark_only_completions():
    p = generate_problem("arithmetic", 1, random.Random(0))
    ids, mask = encode_problem(p)
    assert ids[0] == BOS_ID and ids[-1] == EOS_ID
    assert decode(ids[mask], stop_at_eos=False) == p.solution
    row, answer, k = pack_problems([p, p, p], 2 * len(ids) + 3)
    assert k == 2 and (row[2 * len(ids) :] == PAD_ID).all()
    assert set(answer.unique().tolist()) == {0, 1, 2}
    with pytest.raises(ValueError, match=r"needs \d+ ids but the row holds block_size \+ 1 = 5"):
        pack_problems([p], 5)


# ----------------------------------------------------------------------------------------------------------------------
# mqar and needle


@pytest.mark.parametrize(("gap", "n_facts", "queries"), [(0, 1, 1), (37, 4, 2), (300, 8, 2), (64, 10, 10)])
def test_mqar_puts_exactly_gap_routine_bytes_between_the_last_fact_and_the_first_query(gap, n_facts, queries):
    p = generate_problem("mqar", 2, random.Random(gap), gap=gap, n_facts=n_facts, queries=queries)
    header, routine, query_line = p.text.split("\n")[:3]
    facts = dict(re.findall(r"(\w+)=(\d+)\.", header))
    assert header.startswith("Remember: ") and header.endswith(".") and len(facts) == n_facts
    assert len(routine) == gap == p.gap and not re.search(r"[\d=?#]", routine)
    asked = re.findall(r"(\w+)=(\d+)\.", query_line)
    assert query_line.startswith("Q: ") and len(asked) == queries == len(p.answers)
    assert len({k for k, _ in asked}) == queries  # distinct keys, each stated once, answered with its value
    assert all(facts[k] == v for k, v in asked) and tuple(v for _, v in asked) == p.answers


def test_mqar_scores_every_query_on_its_own_and_its_answers_are_checkable():
    p = generate_problem("mqar", 3, random.Random(5), gap=10, n_facts=4, queries=3)
    ids, seg = encode_segments(p)
    assert ids[0] == BOS_ID and ids[-1] == EOS_ID and seg.max() == 3
    # each completion is the queried value (two digits at difficulty 3) and its '.', nothing of the key
    assert [decode(ids[seg == k], stop_at_eos=False) for k in (1, 2, 3)] == [f"{a}." for a in p.answers[:2]] + [
        f"{p.answers[2]}.\n"
    ]
    assert all(10 <= int(a) <= 99 for a in p.answers)
    assert decode(ids[seg == 0], stop_at_eos=False).endswith(p.turns[-1].question[:-1] + "=")
    for j, a in enumerate(p.answers):
        assert check_answer(p, f"{a}. ", j) and not check_answer(p, f"{int(a) % 90 + 10}.", j)
    with pytest.raises(ValueError, match=r"query=3 must be in \[0, 2\] for this mqar problem"):
        check_answer(p, "7", 3)
    # two problems in a row: completion numbers continue across them
    _, answer, k = pack_problems([p, p], 2 * len(ids))
    assert k == 2 and set(answer.unique().tolist()) == set(range(7))


def test_mqar_keys_and_values_are_not_guessable():
    problems = [generate_problem("mqar", 2, random.Random(s), gap=0, n_facts=4, queries=2) for s in range(3000)]
    values = [a for p in problems for a in p.answers]
    counts = [values.count(str(d)) for d in range(10)]
    assert min(counts) > 0.08 * len(values) and max(counts) < 0.12 * len(values)  # uniform digits: chance 1/10
    keys = {k for p in problems for k in re.findall(r"(\w+)=", p.prompt.split("\n")[0])}
    assert keys == set(KEYS)  # the whole pool of 20 > n_facts is used
    first = [p.prompt.split("Remember: ")[1].split("=")[0] for p in problems]
    assert len(set(first)) == len(KEYS)


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 1.0])
def test_needle_sits_at_its_relative_depth_of_the_document(depth):
    p = generate_problem("needle", 2, random.Random(3), gap=200, depth=depth)
    doc, question = p.prompt[len("Doc: ") :].rsplit("\nQ: ", 1)
    key = question[:-2]
    fact = re.search(rf" ({key})=(\d)\. ", doc)
    assert fact is not None and fact.group(2) == p.answer and check_answer(p, p.solution)
    assert fact.start() == round(depth * 200) and len(doc) - fact.end() == p.gap == 200 - round(depth * 200)
    assert len(re.findall(r"=", doc)) == 1  # one fact in the whole document


def test_memory_generators_are_deterministic():
    for task in ("mqar", "needle"):
        a = [generate_problem(task, 2, random.Random(s), gap=50, n_facts=4) for s in range(20)]
        b = [generate_problem(task, 2, random.Random(s), gap=50, n_facts=4) for s in range(20)]
        assert a == b and len({p.text for p in a}) == 20


def test_mqar_and_needle_refuse_bad_values():
    rng = random.Random(0)
    with pytest.raises(ValueError, match=r"queries=5 must be in \[1, n_facts=4\]"):
        mqar(rng, 2, 10, n_facts=4, queries=5)
    with pytest.raises(ValueError, match=r"queries=0 must be >= 1"):
        generate_problem("mqar", 2, rng, gap=10, n_facts=4, queries=0)
    with pytest.raises(ValueError, match=r"n_facts=11 must be in \[1, 10\]"):
        generate_problem("mqar", 2, rng, gap=10, n_facts=11)
    with pytest.raises(ValueError, match=r"depth=1.5 must be in \[0, 1\]"):
        generate_problem("needle", 2, rng, gap=10, depth=1.5)
    with pytest.raises(ValueError, match=r"gap=-3 must be >= 0"):
        generate_problem("needle", 2, rng, gap=-3)
