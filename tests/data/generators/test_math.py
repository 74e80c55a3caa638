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
    encode_problem,
    generate_problem,
    generate_problems,
    pack_problems,
    parse_answer,
    routine_text,
)


def test_every_generated_answer_passes_check_answer_on_its_own_solution():
    problems = generate_problems(10_000, seed=7, gap_range=(0, 48))
    assert {p.task for p in problems} == set(TASK_TYPES)
    assert {p.difficulty for p in problems} == {1, 2, 3}
    assert all(check_answer(p, p.solution) for p in problems)
    assert all(check_answer(p, p.text) for p in problems[:500])
    # and a wrong final answer fails: the check can fail
    wrong = [p.solution.rsplit("#### ", 1)[0] + "#### " + p.answer + "1\n" for p in problems[:500]]
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
