"""Synthetic math problems and memory tasks, as bytes.

Task types (:data:`TASK_TYPES`), each at difficulty 1..3, each a :class:`Problem` with a ``prompt``, a step-by-step
``solution`` that ends in the line ``#### <answer>``, and the final ``answer``:

* math — ``arithmetic`` (``+ - *``, precedence at level 3), ``algebra`` (linear equations), ``sequence`` (next term of
  arithmetic / geometric / quadratic sequences), ``word_problem`` (templated stories, two steps at level 3);
* memory — ``fact_recall`` (facts stated early and spread through routine text, one asked at the end),
  ``temporal_gap`` (facts, then exactly ``gap`` bytes of routine text, then the question — far beyond an attention
  window when ``gap`` is large), ``surprise`` (routine facts that all read ``=0`` and one unexpected value; the
  question asks which key was the odd one), ``mqar`` (multi-query associative recall: ``k`` facts, exactly ``gap``
  routine bytes, then ``q`` queries ``key=`` whose values are each scored on their own) and ``needle`` (one fact at a
  relative depth of a routine document of ``gap`` bytes, then the question).

Everything is a pure function of a seed: problem ``i`` of ``(seed, split)`` never depends on other problems, so
any batch can be rebuilt from its index (exact mid-epoch resume, as in :mod:`neat_lightning.data.bytes`).
:func:`check_answer` parses the ``#### <answer>`` line of a generated text. Plain Python and torch only:
:class:`neat_lightning.data.math.MathDataModule` serves the rows to a Trainer.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from neat_lightning.codec import BOS_ID, EOS_ID, OFFSET, PAD_ID

MATH_TASKS = ("arithmetic", "algebra", "sequence", "word_problem")
MEMORY_TASKS = ("fact_recall", "temporal_gap", "surprise", "mqar", "needle")
TASK_TYPES = MATH_TASKS + MEMORY_TASKS
DIFFICULTIES = (1, 2, 3)

KEYS = (
    "ant", "ape", "bat", "bee", "cat", "cod", "cow", "dog", "eel", "elk",
    "emu", "fox", "gnu", "hen", "jay", "koi", "owl", "pig", "rat", "yak",
)  # fmt: skip
# routine text: no digits, '=', '?' or '#', so facts and questions stand out from it
ROUTINE = (
    "the sun rose over the quiet hill. ", "a bird sang in the old tree. ", "the river ran slow and wide. ",
    "we walked along the long road. ", "the wind moved the tall grass. ", "a cloud passed over the town. ",
    "the baker opened the shop early. ", "rain fell on the red roofs. ", "the old man slept by the fire. ",
    "children played in the green park. ", "the bell rang at noon again. ", "a boat drifted on the calm lake. ",
)
ANSWER_MARK = "#### "
_ANSWER_RE = re.compile(r"####[ \t]*([^\n]*)")
_LEADING_RE = re.compile(r"[ \t]*([0-9A-Za-z+-]+)")


@dataclass(frozen=True)
class Turn:
    """A further scored question of a multi-query problem: ``question`` (not scored) then ``solution`` (scored)."""

    question: str
    solution: str
    answer: str


@dataclass(frozen=True)
class Problem:
    """One generated problem. ``prompt + solution`` is its full text; ``solution`` ends with ``#### <answer>``."""

    task: str
    difficulty: int
    prompt: str
    solution: str
    answer: str
    gap: int = 0  # memory tasks: bytes of routine text between the queried fact and the question
    turns: tuple[Turn, ...] = ()  # mqar: the queries after the first, each scored on its own
    marker: str = ANSWER_MARK  # the answer follows this marker; "" when the completion starts with the answer

    @property
    def text(self) -> str:
        return self.prompt + self.solution + "".join(t.question + t.solution for t in self.turns)

    @property
    def answers(self) -> tuple[str, ...]:
        """The answer of every scored query, in order (one for single-question problems)."""
        return (self.answer,) + tuple(t.answer for t in self.turns)


# ----------------------------------------------------------------------------------------------------------------------
# answers


def parse_answer(text: str) -> str | None:
    """The text after the last ``####`` marker, stripped (``None`` when there is no marker)."""
    found = _ANSWER_RE.findall(text)
    return found[-1].strip() if found else None


def _as_int(s: str) -> int | None:
    s = s.replace(",", "").replace(" ", "")
    if re.fullmatch(r"[+-]?\d+", s):
        return int(s)
    return None


def check_answer(problem: Problem, text: str, query: int = 0) -> bool:
    """True when ``text`` states the answer of query ``query`` of ``problem`` (0: the only or the first question).

    With the ``####`` marker the last ``#### <answer>`` line counts; for marker-less problems (``mqar``) ``text`` is
    the completion after the query's ``key=`` and its leading word counts. Numbers compare by value (``+7``, ``7`` and
    ``0007`` agree; thousands commas are ignored); other answers compare case-insensitively after stripping. A text
    without the marker is wrong.
    """
    if not 0 <= query < len(problem.answers):
        raise ValueError(f"query={query} must be in [0, {len(problem.answers) - 1}] for this {problem.task} problem")
    if problem.marker:
        got = parse_answer(text)
    else:
        found = _LEADING_RE.match(text)
        got = found.group(1) if found else None
    if got is None or not got:
        return False
    want = problem.answers[query].strip()
    want_int, got_int = _as_int(want), _as_int(got)
    if want_int is not None:
        return got_int is not None and got_int == want_int
    return got.lower() == want.lower()


# ----------------------------------------------------------------------------------------------------------------------
# math generators: (rng, difficulty) -> Problem


def _solved(task: str, difficulty: int, prompt: str, steps: Sequence[str], answer: int | str) -> Problem:
    solution = "".join(f"{s}\n" for s in steps) + f"{ANSWER_MARK}{answer}\n"
    return Problem(task, difficulty, prompt, solution, str(answer))


def arithmetic(rng: random.Random, difficulty: int) -> Problem:
    if difficulty == 1:
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        op = rng.choice("+-")
        if op == "-" and b > a:
            a, b = b, a
        ans = a + b if op == "+" else a - b
        return _solved("arithmetic", 1, f"Q: {a}{op}{b}=?\n", [f"{a}{op}{b}={ans}"], ans)
    if difficulty == 2:
        op = rng.choice("+-*")
        a = rng.randint(10, 99)
        if op == "*":
            b = rng.randint(2, 9)
            tens, ones = a // 10 * 10, a % 10
            steps = [f"{a}*{b}={tens}*{b}+{ones}*{b}", f"{tens * b}+{ones * b}={a * b}"]
            return _solved("arithmetic", 2, f"Q: {a}*{b}=?\n", steps, a * b)
        b = rng.randint(10, 99)
        ans = a + b if op == "+" else a - b
        return _solved("arithmetic", 2, f"Q: {a}{op}{b}=?\n", [f"{a}{op}{b}={ans}"], ans)
    a, b, c = rng.randint(2, 50), rng.randint(2, 12), rng.randint(2, 12)
    if rng.random() < 0.5:  # precedence: multiply first
        op = rng.choice("+-")
        ans = a + b * c if op == "+" else a - b * c
        return _solved("arithmetic", 3, f"Q: {a}{op}{b}*{c}=?\n", [f"{b}*{c}={b * c}", f"{a}{op}{b * c}={ans}"], ans)
    ans = (a + b) * c
    return _solved("arithmetic", 3, f"Q: ({a}+{b})*{c}=?\n", [f"{a}+{b}={a + b}", f"{a + b}*{c}={ans}"], ans)


def algebra(rng: random.Random, difficulty: int) -> Problem:
    x = rng.randint(0, 9) if difficulty == 1 else rng.randint(-12, 20)
    if difficulty == 1:
        b = rng.randint(1, 9)
        c = x + b
        return _solved("algebra", 1, f"Q: x+{b}={c}, x=?\n", [f"x={c}-{b}", f"x={x}"], x)
    if difficulty == 2:
        a, b = rng.randint(2, 9), rng.randint(-20, 20)
        c = a * x + b
        sb = f"+{b}" if b >= 0 else f"{b}"
        steps = [f"{a}x={c}{-b:+d}", f"{a}x={a * x}", f"x={a * x}/{a}", f"x={x}"]
        return _solved("algebra", 2, f"Q: {a}x{sb}={c}, x=?\n", steps, x)
    a = rng.randint(2, 9)
    cc = rng.randint(1, a - 1)  # cc < a: exactly one solution
    b = rng.randint(-20, 20)
    d = a * x + b - cc * x
    sb = f"+{b}" if b >= 0 else f"{b}"
    sd = f"+{d}" if d >= 0 else f"{d}"
    steps = [f"{a}x-{cc}x={d}{-b:+d}", f"{a - cc}x={d - b}", f"x={d - b}/{a - cc}", f"x={x}"]
    return _solved("algebra", 3, f"Q: {a}x{sb}={cc}x{sd}, x=?\n", steps, x)


def sequence(rng: random.Random, difficulty: int) -> Problem:
    n = 4
    if difficulty == 1:
        a, step = rng.randint(0, 20), rng.randint(1, 5)
        terms = [a + step * i for i in range(n + 1)]
        steps = [f"step {step}", f"{terms[-2]}+{step}={terms[-1]}"]
    elif difficulty == 2 and rng.random() < 0.5:
        a, r = rng.randint(1, 5), rng.randint(2, 3)
        terms = [a * r**i for i in range(n + 1)]
        steps = [f"ratio {r}", f"{terms[-2]}*{r}={terms[-1]}"]
    elif difficulty == 2:
        a, step = rng.randint(20, 60), rng.randint(-9, -2)
        terms = [a + step * i for i in range(n + 1)]
        steps = [f"step {step}", f"{terms[-2]}{step:+d}={terms[-1]}"]
    else:
        a, b, c = rng.randint(0, 10), rng.randint(1, 4), rng.randint(1, 3)
        terms = [a + b * i + c * i * i for i in range(n + 1)]
        diffs = [terms[i + 1] - terms[i] for i in range(n)]
        steps = [f"diffs {','.join(map(str, diffs[:-1]))}", f"next diff {diffs[-1]}", f"{terms[-2]}+{diffs[-1]}={terms[-1]}"]
    prompt = f"Q: {','.join(map(str, terms[:-1]))},?\n"
    return _solved("sequence", difficulty, prompt, steps, terms[-1])


_NAMES = ("Ann", "Ben", "Cy", "Dee", "Eve", "Finn", "Gus", "Ivy", "Jo", "Kim")
_ITEMS = ("apples", "pens", "coins", "books", "cards", "eggs", "shells", "stamps")


def word_problem(rng: random.Random, difficulty: int) -> Problem:
    who, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    if difficulty == 1:
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        prompt = f"Q: {who} has {a} {item} and gets {b} more. How many {item}?\n"
        return _solved("word_problem", 1, prompt, [f"{a}+{b}={a + b}"], a + b)
    if difficulty == 2:
        if rng.random() < 0.5:
            a, b = rng.randint(10, 60), rng.randint(1, 9)
            prompt = f"Q: {who} has {a} {item} and gives away {b}. How many {item} are left?\n"
            return _solved("word_problem", 2, prompt, [f"{a}-{b}={a - b}"], a - b)
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        prompt = f"Q: {who} has {a} boxes with {b} {item} each. How many {item}?\n"
        return _solved("word_problem", 2, prompt, [f"{a}*{b}={a * b}"], a * b)
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    c = rng.randint(1, a * b)
    prompt = f"Q: {who} has {a} bags with {b} {item} each and loses {c}. How many {item} are left?\n"
    return _solved("word_problem", 3, prompt, [f"{a}*{b}={a * b}", f"{a * b}-{c}={a * b - c}"], a * b - c)


# ----------------------------------------------------------------------------------------------------------------------
# memory tasks


def routine_text(rng: random.Random, n_bytes: int) -> str:
    """Exactly ``n_bytes`` of routine sentences (ASCII, so bytes == characters)."""
    if n_bytes <= 0:
        return ""
    parts: list[str] = []
    total = 0
    while total < n_bytes:  # a loop over sentences (~30 bytes each), not over bytes
        s = rng.choice(ROUTINE)
        parts.append(s)
        total += len(s)
    return "".join(parts)[:n_bytes]


def _value(rng: random.Random, difficulty: int) -> str:
    return str(rng.randint(0, 9)) if difficulty < 3 else str(rng.randint(10, 99))


def _n_facts(difficulty: int, n_facts: int | None) -> int:
    return n_facts if n_facts is not None else (1, 2, 4)[difficulty - 1]


def temporal_gap(rng: random.Random, difficulty: int, gap: int, n_facts: int | None = None) -> Problem:
    """``Remember: k1=v1. k2=v2.`` + exactly ``gap`` routine bytes + ``Q: k?``; answer ``v`` of the asked key."""
    n = _n_facts(difficulty, n_facts)
    keys = rng.sample(KEYS, n)
    values = [_value(rng, difficulty) for _ in keys]
    asked = rng.randrange(n)
    facts = " ".join(f"{k}={v}." for k, v in zip(keys, values))
    prompt = f"Remember: {facts}\n{routine_text(rng, gap)}\nQ: {keys[asked]}?\n"
    return Problem("temporal_gap", difficulty, prompt, f"{ANSWER_MARK}{values[asked]}\n", values[asked], gap)


def fact_recall(rng: random.Random, difficulty: int, gap: int, n_facts: int | None = None) -> Problem:
    """Facts spread through ``gap`` bytes of routine text (the asked one is at least ``gap // 2`` bytes before the
    question); answer the value of the asked key."""
    n = _n_facts(difficulty, n_facts)
    keys = rng.sample(KEYS, n)
    values = [_value(rng, difficulty) for _ in keys]
    asked = rng.randrange(n)
    # the asked fact comes first; the others are spread over the first half of the routine text
    cuts = sorted(rng.randint(0, gap // 2) for _ in range(n - 1))
    order = [asked] + [i for i in range(n) if i != asked]
    pieces, last = [], 0
    pieces.append(f"{keys[order[0]]}={values[order[0]]}. ")
    for cut, i in zip(cuts, order[1:]):
        pieces.append(routine_text(rng, cut - last))
        pieces.append(f"{keys[i]}={values[i]}. ")
        last = cut
    pieces.append(routine_text(rng, gap - last))
    prompt = f"Facts: {''.join(pieces)}\nQ: {keys[asked]}?\n"
    return Problem("fact_recall", difficulty, prompt, f"{ANSWER_MARK}{values[asked]}\n", values[asked], gap)


def surprise(rng: random.Random, difficulty: int, gap: int, n_facts: int | None = None) -> Problem:
    """Routine facts ``k=0.`` with one unexpected non-zero value among them, ``gap`` routine bytes, then
    ``Q: odd?``; the answer is the key of the unexpected fact."""
    n = max(3, 2 * _n_facts(difficulty, n_facts) + 1)
    keys = rng.sample(KEYS, n)
    odd = rng.randrange(n)
    value = str(rng.randint(1, 9))
    facts = " ".join(f"{k}={value if i == odd else 0}." for i, k in enumerate(keys))
    prompt = f"Log: {facts}\n{routine_text(rng, gap)}\nQ: odd?\n"
    return Problem("surprise", difficulty, prompt, f"{ANSWER_MARK}{keys[odd]}\n", keys[odd], gap)


def mqar(rng: random.Random, difficulty: int, gap: int, n_facts: int | None = None, queries: int = 2) -> Problem:
    """Multi-query associative recall (Zoology, Arora et al. 2023) over bytes.

    ``Remember: k1=v1. … kn=vn.`` + newline + exactly ``gap`` routine bytes + newline + ``Q: ka=va. kb=vb.`` with
    ``queries`` distinct keys drawn from the facts (in random order). Keys are distinct draws from :data:`KEYS` (a pool
    of 20, larger than any ``n``), values independent uniform digits (two digits at difficulty 3): neither follows
    from anything but the facts. Each value of the query line (with its ``.``) is its own scored completion, so a
    row yields ``queries`` exact-match counts; chance per query is 1/10 (1/90 with two digits).
    """
    n = _n_facts(difficulty, n_facts)
    if not 1 <= queries <= n:
        raise ValueError(f"queries={queries} must be in [1, n_facts={n}] (each query asks a different stated key)")
    keys = rng.sample(KEYS, n)
    values = [_value(rng, difficulty) for _ in keys]
    asked = rng.sample(range(n), queries)
    facts = " ".join(f"{k}={v}." for k, v in zip(keys, values))
    prompt = f"Remember: {facts}\n{routine_text(rng, gap)}\nQ: {keys[asked[0]]}="
    solutions = [values[i] + "." for i in asked]
    solutions[-1] += "\n"
    turns = tuple(Turn(f" {keys[i]}=", sol, values[i]) for i, sol in zip(asked[1:], solutions[1:]))
    return Problem("mqar", difficulty, prompt, solutions[0], values[asked[0]], gap, turns, marker="")


def needle(rng: random.Random, difficulty: int, gap: int, n_facts: int | None = None, depth: float | None = None) -> Problem:
    """One fact ``key=v.`` at relative ``depth`` (0 = start, 1 = end; drawn uniformly when ``None``) of a routine
    document of exactly ``gap`` bytes, then ``Q: key?``; answer ``v``. ``Problem.gap`` is the routine bytes between
    the fact and the question, ``gap - round(depth * gap)``."""
    if depth is None:
        depth = rng.random()
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth} must be in [0, 1] (relative position of the fact in the document)")
    key, value = rng.choice(KEYS), _value(rng, difficulty)
    before = round(depth * gap)
    doc = f"{routine_text(rng, before)} {key}={value}. {routine_text(rng, gap - before)}"
    prompt = f"Doc: {doc}\nQ: {key}?\n"
    return Problem("needle", difficulty, prompt, f"{ANSWER_MARK}{value}\n", value, gap - before)


MATH_GENERATORS = {"arithmetic": arithmetic, "algebra": algebra, "sequence": sequence, "word_problem": word_problem}
MEMORY_GENERATORS = {
    "fact_recall": fact_recall, "temporal_gap": temporal_gap, "surprise": surprise, "mqar": mqar, "needle": needle,
}


def check_task(task: str, field: str = "task") -> None:
    if task not in TASK_TYPES:
        raise ValueError(f"{field}={task!r} is not a task type; choose from {list(TASK_TYPES)}")


def check_difficulty(difficulty: int, field: str = "difficulty") -> None:
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"{field}={difficulty} must be one of {list(DIFFICULTIES)}")


def generate_problem(
    task: str,
    difficulty: int,
    rng: random.Random,
    gap: int = 0,
    n_facts: int | None = None,
    queries: int = 2,
    depth: float | None = None,
) -> Problem:
    """One problem of ``task`` at ``difficulty`` from ``rng``. ``gap`` / ``n_facts`` apply to memory tasks,
    ``queries`` to ``mqar`` (at most the number of facts: ``min(queries, n_facts)`` are asked) and ``depth`` to
    ``needle``."""
    check_task(task)
    check_difficulty(difficulty)
    if task in MATH_GENERATORS:
        return MATH_GENERATORS[task](rng, difficulty)
    if gap < 0:
        raise ValueError(f"gap={gap} must be >= 0")
    if n_facts is not None and not 1 <= n_facts <= len(KEYS) // 2:
        raise ValueError(f"n_facts={n_facts} must be in [1, {len(KEYS) // 2}]")
    if queries < 1:
        raise ValueError(f"queries={queries} must be >= 1")
    if task == "mqar":
        return mqar(rng, difficulty, gap, n_facts, min(queries, _n_facts(difficulty, n_facts)))
    if task == "needle":
        return needle(rng, difficulty, gap, n_facts, depth)
    return MEMORY_GENERATORS[task](rng, difficulty, gap, n_facts)


def rng_for(*keys: object) -> random.Random:
    """A ``random.Random`` seeded by ``keys`` (stable across processes, independent of PYTHONHASHSEED)."""
    digest = hashlib.blake2b(repr(keys).encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "little"))


def generate_problems(
    n: int,
    seed: int = 0,
    tasks: Sequence[str] = TASK_TYPES,
    difficulties: Sequence[int] = DIFFICULTIES,
    gap_range: tuple[int, int] = (0, 256),
    n_facts: int | None = None,
) -> list[Problem]:
    """``n`` problems cycling through ``tasks``; problem ``i`` depends only on ``(seed, i)``."""
    for t in tasks:
        check_task(t, "tasks")
    for d in difficulties:
        check_difficulty(d, "difficulties")
    out = []
    for i in range(n):
        rng = rng_for("problems", seed, i)
        task = tasks[i % len(tasks)]
        out.append(generate_problem(task, rng.choice(difficulties), rng, rng.randint(*gap_range), n_facts))
    return out


# ----------------------------------------------------------------------------------------------------------------------
# bytes


def _ids(text: str) -> torch.Tensor:
    data = text.encode("utf-8")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long() + OFFSET


def encode_segments(problem: Problem) -> tuple[torch.Tensor, torch.Tensor]:
    """``BOS prompt solution [question solution]… EOS`` -> ids (N,) int64 and (N,) int64 completion indices:
    ``j + 1`` on the bytes of the j-th scored completion (the last one includes EOS), 0 elsewhere."""
    pieces = [(torch.tensor([BOS_ID]), 0), (_ids(problem.prompt), 0), (_ids(problem.solution), 1)]
    for j, turn in enumerate(problem.turns):
        pieces += [(_ids(turn.question), 0), (_ids(turn.solution), j + 2)]
    pieces.append((torch.tensor([EOS_ID]), len(problem.turns) + 1))
    ids = torch.cat([p for p, _ in pieces])
    seg = torch.cat([torch.full((len(p),), k, dtype=torch.long) for p, k in pieces])
    return ids, seg


def encode_problem(problem: Problem) -> tuple[torch.Tensor, torch.Tensor]:
    """``BOS prompt solution EOS`` -> ids (N,) int64 and a (N,) bool mask of the scored completions (solution(s) +
    EOS)."""
    ids, seg = encode_segments(problem)
    return ids, seg > 0


def pack_problems(problems: Sequence[Problem], length: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Pack whole problems into one row of ``length`` ids, PAD after the last that fits.

    Returns ids (length,) int64, answer_ids (length,) int64 (k on the k-th scored completion of the row, 1-based:
    one per problem, one per query of an ``mqar`` problem) and the number of problems packed. A first problem
    longer than the row raises.
    """
    ids = torch.full((length,), PAD_ID, dtype=torch.long)
    answer = torch.zeros(length, dtype=torch.long)
    pos, k, done = 0, 0, 0
    for p in problems:
        p_ids, p_seg = encode_segments(p)
        if pos + len(p_ids) > length:
            if done == 0:
                raise ValueError(
                    f"a {p.task} problem needs {len(p_ids)} ids but the row holds block_size + 1 = {length}; "
                    "raise block_size or lower gap_range"
                )
            break
        ids[pos : pos + len(p_ids)] = p_ids
        answer[pos : pos + len(p_ids)] = torch.where(p_seg > 0, p_seg + k, 0)
        k += int(p_seg.max())
        done += 1
        pos += len(p_ids)
    return ids, answer, done


# longest encoded problem (BOS + text + EOS) of each math task over all difficulties, with a small margin
MATH_MAX_IDS = {"arithmetic": 52, "algebra": 72, "sequence": 68, "word_problem": 112}


def memory_overhead(task: str, difficulty: int = 3, n_facts: int | None = None, queries: int = 2) -> int:
    """Upper bound on a memory problem's ids beyond its ``gap`` (BOS, facts, question(s), answer(s), EOS)."""
    n = _n_facts(difficulty, n_facts)
    if task == "mqar":  # BOS/EOS, header, "key=vv. " per fact and per query, newlines and "Q: "
        return 2 + 12 + n * 8 + 6 + min(queries, n) * 8
    if task == "needle":  # BOS/EOS, "Doc: ", " key=vv. ", question, "#### vv\n"
        return 2 + 6 + 9 + 10 + 10
    n_listed = max(3, 2 * n + 1) if task == "surprise" else n
    return 2 + 12 + n_listed * 8 + 12 + 10  # BOS/EOS, header, "key=vv. " per fact, question, "#### key\n"


@dataclass(frozen=True)
class RowSpec:
    """What one batch row holds: its task, difficulty and (memory tasks) gap, facts, queries and needle depth."""

    task: str
    difficulty: int
    gap: int
    queries: int = 2
    depth: float | None = None


def build_row(spec: RowSpec, length: int, rng: random.Random, n_facts: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One row of ``length`` ids: a single memory problem, or as many math problems of one type as fit."""
    if spec.task in MEMORY_GENERATORS:
        problems = [generate_problem(spec.task, spec.difficulty, rng, spec.gap, n_facts, spec.queries, spec.depth)]
    else:  # math problems are ~20-60 bytes: generate enough to fill the row
        problems = [generate_problem(spec.task, spec.difficulty, rng) for _ in range(max(1, length // 12))]
    ids, answer, _ = pack_problems(problems, length)
    return ids, answer
