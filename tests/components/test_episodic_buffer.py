"""EpisodicBuffer: what stays (reservoir / greedy, importance, usage, age), prioritised draws, pruning, checkpoints,
and the distillation term of sleep."""

from __future__ import annotations

import pytest
import torch

from neat_lightning.components.episodic_buffer import EpisodicBuffer, EpisodicConfig, distillation_loss


def rows(values: list[int], length: int = 4) -> dict[str, torch.Tensor]:
    """Rows tagged by a value (every id of row i is values[i]) plus a per-row scalar field."""
    v = torch.tensor(values)
    return {"ids": v[:, None].repeat(1, length), "task": v.clone()}


def stored(buffer: EpisodicBuffer) -> list[int]:
    return sorted(buffer.rows["task"][buffer.filled].tolist())


def test_greedy_keeps_the_most_surprising_windows_relative_to_the_running_mean():
    buf = EpisodicBuffer(EpisodicConfig(capacity=3, policy="greedy", surprise_momentum=0.5))
    assert buf.write(rows([0, 1, 2, 3]), torch.tensor([1.0, 4.0, 2.0, 1.0]), step=0) == 3
    assert stored(buf) == [0, 1, 2]  # ties of the lowest: the earlier offer wins
    assert torch.allclose(buf.importance[buf.filled].sort().values, torch.tensor([0.5, 1.0, 2.0]))  # loss / mean 2
    # the running mean is 2 now: a window of loss 3 scores 1.5 and replaces the 0.5 one
    assert buf.write(rows([7]), torch.tensor([3.0]), step=1) == 1
    assert stored(buf) == [1, 2, 7]
    assert float(buf.mean_surprise) == pytest.approx(0.5 * 2.0 + 0.5 * 3.0)
    snap = buf.snapshot(step=5)
    assert set(snap) == {"slot", "importance", "priority", "age", "replays"}
    assert sorted(snap["age"].tolist()) == [4, 5, 5] and snap["replays"].tolist() == [0, 0, 0]


def test_reservoir_keeps_every_phase_of_the_stream_in_proportion_to_surprise():
    """A stream of 40 batches from task 0 then 40 from task 1 (same surprise): the reservoir keeps both about half,
    a greedy buffer of the same stream keeps whatever scored highest."""
    kept = []
    for seed in range(5):
        buf = EpisodicBuffer(EpisodicConfig(capacity=32))
        g = torch.Generator().manual_seed(seed)
        for step in range(80):
            task = 0 if step < 40 else 1
            buf.write(rows([task] * 8), torch.rand(8, generator=g) + 1.0, step=step, generator=g)
        kept.append(sum(t == 0 for t in stored(buf)))
    assert all(8 <= k <= 24 for k in kept), kept  # binomial(32, 1/2): 8..24 is beyond 2.8 sigma either side
    # weights tilt it: task 1 offered with 4x the surprise keeps most of the slots
    buf = EpisodicBuffer(EpisodicConfig(capacity=32))
    g = torch.Generator().manual_seed(0)
    for step in range(80):
        task = 0 if step < 40 else 1
        buf.write(rows([task] * 8), torch.full((8,), 1.0 if task == 0 else 4.0), step=step, generator=g)
    assert sum(t == 1 for t in stored(buf)) > 20


def test_usage_and_age_lower_the_keep_score_and_pruning_takes_the_lowest():
    cfg = EpisodicConfig(capacity=4, policy="greedy", usage_weight=1.0, age_weight=0.1)
    buf = EpisodicBuffer(cfg)
    buf.write(rows([0, 1, 2, 3]), torch.ones(4), step=0)
    buf.replayed(torch.tensor([0, 0, 0]), torch.ones(3))  # slot 0 replayed three times
    buf.written[1] = -20  # slot 1 is 20 steps older
    logw = buf.log_weight(step=0)
    assert logw[0] == pytest.approx(-torch.log(torch.tensor(4.0)).item())  # (1 + 3) ** -1
    assert logw[1] == pytest.approx(-2.0) and logw[2] == logw[3] == 0.0
    assert buf.prune(0.5, step=0) == 2 and stored(buf) == [2, 3]
    assert buf.prune(0.4, step=0) == 0  # floor(0.8)
    with pytest.raises(ValueError, match=r"prune fraction=1.5 must be in \[0, 1\]"):
        buf.prune(1.5, step=0)


def test_draws_follow_priority_and_the_generator_and_replays_update_priorities():
    buf = EpisodicBuffer(EpisodicConfig(capacity=6, policy="greedy"))
    buf.write(rows(list(range(6))), torch.ones(6), step=0)
    buf.priority.copy_(torch.tensor([1e-9, 1e-9, 1e-9, 1.0, 1.0, 1.0]))
    picked = buf.draw(3, torch.Generator().manual_seed(0))
    assert sorted(buf.rows["task"][picked].tolist()) == [3, 4, 5]  # without replacement, by priority
    a, b = (buf.draw(4, torch.Generator().manual_seed(1)) for _ in range(2))
    assert torch.equal(a, b)
    assert len(buf.draw(10, torch.Generator())) == 10  # more than stored: with replacement
    assert buf.draw(0).shape == (0,) and EpisodicBuffer(EpisodicConfig()).draw(3).shape == (0,)
    assert torch.equal(buf.gather(torch.tensor([2]))["ids"], torch.full((1, 4), 2))
    buf.replayed(torch.tensor([3, 3, 4]), torch.tensor([2.0, 2.0, 0.5]))
    assert buf.replays[3] == 2 and buf.replays[4] == 1
    assert buf.priority[3] == pytest.approx(2.0) and buf.priority[4] == pytest.approx(0.5)  # loss / mean loss 1


def test_writes_per_step_offers_only_the_most_surprising_rows():
    buf = EpisodicBuffer(EpisodicConfig(capacity=8, writes_per_step=2))
    assert buf.write(rows([0, 1, 2, 3]), torch.tensor([1.0, 5.0, 2.0, 6.0]), step=0,
                     generator=torch.Generator().manual_seed(0)) == 2
    assert stored(buf) == [1, 3]


def test_state_dict_round_trip_is_exact_and_checks_the_capacity():
    buf = EpisodicBuffer(EpisodicConfig(capacity=5))
    g = torch.Generator().manual_seed(0)
    for step in range(4):
        buf.write(rows([step] * 3), torch.rand(3, generator=g) + 0.5, step=step, generator=g)
    buf.replayed(torch.tensor([1]), torch.tensor([0.7]))
    state = buf.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())  # plain tensors: weights_only loads them
    copy = EpisodicBuffer(EpisodicConfig(capacity=5))
    copy.load_state_dict(state)
    for k, v in copy.state_dict().items():
        assert torch.equal(v, state[k]), k
    nxt = [(b.write(rows([9, 8]), torch.tensor([3.0, 0.1]), step=9, generator=torch.Generator().manual_seed(3)),
            b.state_dict()) for b in (buf, copy)]
    assert nxt[0][0] == nxt[1][0] and all(torch.equal(nxt[0][1][k], nxt[1][1][k]) for k in state)
    with pytest.raises(ValueError, match=r"holds 5 windows, this model's episodic.capacity is 6"):
        EpisodicBuffer(EpisodicConfig(capacity=6)).load_state_dict(state)


def test_rows_must_keep_their_shape():
    buf = EpisodicBuffer(EpisodicConfig(capacity=4))
    buf.write(rows([0, 1]), torch.ones(2), step=0)
    with pytest.raises(ValueError, match=r"rows\['ids'\] are \(6,\) per row, the buffer stores \(4,\)"):
        buf.write(rows([0, 1], length=6), torch.ones(2), step=1)
    with pytest.raises(ValueError, match=r"rows have fields \['ids'\], the buffer stores \['ids', 'task'\]"):
        buf.write({"ids": torch.zeros(2, 4, dtype=torch.long)}, torch.ones(2), step=1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"capacity": 0}, r"capacity=0 must be >= 1"), ({"policy": "fifo"}, r"policy='fifo' must be"),
     ({"surprise": "grad"}, r"surprise='grad' must be"), ({"writes_per_step": 0}, r"writes_per_step=0 must be"),
     ({"surprise_momentum": 1.0}, r"surprise_momentum=1.0 must be in \[0, 1\)"),
     ({"age_weight": -1.0}, r"age_weight=-1.0 must be >= 0")],
)
def test_bad_configs_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EpisodicConfig(**kwargs)


def test_distillation_is_zero_at_the_teacher_and_reaches_only_the_student():
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(2, 3, 7, generator=g)
    student = teacher.clone().requires_grad_(True)
    mask = torch.ones(2, 3, dtype=torch.bool)
    assert float(distillation_loss(student, teacher, mask).detach()) == pytest.approx(0.0, abs=1e-6)
    other = torch.randn(2, 3, 7, generator=g).requires_grad_(True)
    loss = distillation_loss(other, teacher, mask, temperature=2.0)
    loss.backward()
    assert float(loss.detach()) > 0 and other.grad is not None and other.grad.abs().sum() > 0
    # masked positions do not count; no position at all gives 0
    mask[0] = False
    t = 2.0
    kl = torch.nn.functional.kl_div(torch.log_softmax(other / t, -1), torch.log_softmax(teacher / t, -1),
                                    log_target=True, reduction="none").sum(-1)
    assert float(distillation_loss(other, teacher, mask, t).detach()) == pytest.approx(float(t * t * kl[1].mean()), rel=1e-5)
    assert float(distillation_loss(other, teacher, torch.zeros_like(mask)).detach()) == 0.0
