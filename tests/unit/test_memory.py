"""measure_step_memory on steps whose memory is known exactly, and median_step_time."""
import pytest
import torch

from meft_fx.memory import StepMemory, measure_step_memory, median_step_time

MiB = 1 << 20
SLACK = 64 * 1024  # bytes of bookkeeping (scalars, small temporaries) tolerated on top of the known sizes


def _alloc(nbytes):
    t = torch.empty(nbytes, dtype=torch.uint8)
    t.fill_(1)
    return t


def test_allocated_and_freed_counts_as_peak_not_retained():
    def step():
        t = _alloc(MiB)
        del t

    m = measure_step_memory(step)
    assert isinstance(m, StepMemory)
    assert MiB <= m.peak_bytes <= MiB + SLACK
    assert abs(m.retained_bytes) <= SLACK
    assert m.activation_bytes == m.peak_bytes - m.retained_bytes


def test_kept_tensor_is_retained():
    kept = []

    def step():
        kept.append(_alloc(MiB))

    m = measure_step_memory(step)
    assert MiB <= m.retained_bytes <= MiB + SLACK
    assert MiB <= m.peak_bytes <= MiB + SLACK
    assert abs(m.activation_bytes) <= SLACK
    assert kept[0].numel() == MiB


def test_returned_tensor_is_not_retained():
    m = measure_step_memory(lambda: _alloc(MiB))
    assert MiB <= m.peak_bytes <= MiB + SLACK
    assert abs(m.retained_bytes) <= SLACK


def test_peak_is_a_running_maximum_not_a_sum_of_allocations():
    def sequential():  # 1 MiB, freed, then 2 MiB, freed: peak 2 MiB
        a = _alloc(MiB)
        del a
        b = _alloc(2 * MiB)
        del b

    def overlapping():  # 1 MiB and 2 MiB live together: peak 3 MiB
        a = _alloc(MiB)
        b = _alloc(2 * MiB)
        del a, b

    s = measure_step_memory(sequential)
    o = measure_step_memory(overlapping)
    assert 2 * MiB <= s.peak_bytes <= 2 * MiB + SLACK
    assert 3 * MiB <= o.peak_bytes <= 3 * MiB + SLACK
    assert abs(s.retained_bytes) <= SLACK and abs(o.retained_bytes) <= SLACK


def test_memory_live_before_the_step_is_not_counted():
    before = [_alloc(4 * MiB)]

    def step():
        t = _alloc(MiB)
        del t
        before.clear()  # frees 4 MiB that existed before the step

    m = measure_step_memory(step)
    assert MiB <= m.peak_bytes <= MiB + SLACK
    # The CPU allocator only reports frees of blocks it saw allocated while profiling, so the
    # 4 MiB free may be invisible (retained ~0); on CUDA it shows as -4 MiB. Never positive.
    assert -4 * MiB - SLACK <= m.retained_bytes <= SLACK


def test_autograd_step_saves_activations_and_retains_the_gradient():
    n = 1 << 18  # float32: 1 MiB per tensor of n elements
    x = torch.randn(n, requires_grad=True)

    def step():
        (x.exp() * 2).sum().backward()  # exp saves its 1 MiB output for backward

    m = measure_step_memory(step)
    assert x.grad is not None
    assert MiB <= m.retained_bytes <= MiB + SLACK  # x.grad, created by this step
    assert m.activation_bytes >= MiB
    assert m.peak_bytes <= 4 * MiB + SLACK

    # With the gradient buffer already there (zeroed in place) nothing is retained.
    x.grad.zero_()
    m2 = measure_step_memory(step)
    assert abs(m2.retained_bytes) <= SLACK
    assert m2.activation_bytes >= MiB


def test_unsupported_device_raises():
    with pytest.raises(ValueError):
        measure_step_memory(lambda: None, device="meta")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_known_allocation():
    def step():
        t = torch.empty(MiB, dtype=torch.uint8, device="cuda")
        del t

    m = measure_step_memory(step, device="cuda")
    assert MiB <= m.peak_bytes <= MiB + SLACK
    assert abs(m.retained_bytes) <= SLACK


def test_median_step_time_counts_calls_and_returns_the_median():
    calls = []
    m = median_step_time(lambda: calls.append(1), warmup=2, repeats=3)
    assert len(calls) == 5
    assert 0 <= m < 1
    with pytest.raises(ValueError):
        median_step_time(lambda: None, repeats=0)


def test_alternating_times_runs_the_steps_in_turn():
    from meft_fx.memory import alternating_times

    order = []
    times = alternating_times({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, rounds=3, warmup=1)
    assert order == ["a", "b", "a", "b", "b", "a", "a", "b"] and {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        alternating_times({"a": lambda: None}, rounds=0)


@pytest.mark.parametrize("n", [2, 3, 4, 5, 7])
def test_balanced_orders_put_every_step_after_every_other_equally_often(n):
    from collections import Counter

    from meft_fx.memory import balanced_orders

    rounds = n if n % 2 == 0 else 2 * n
    orders = balanced_orders(n, rounds)
    assert all(sorted(o) == list(range(n)) for o in orders)
    positions = Counter((i, o.index(i)) for o in orders for i in range(n))
    assert set(positions.values()) == {rounds // n}  # every step in every position equally often
    follows = Counter((o[j], o[j + 1]) for o in orders for j in range(n - 1))
    assert len(follows) == n * (n - 1) and len(set(follows.values())) == 1  # every ordered pair equally often


def test_paired_ratio_is_the_median_of_the_rounds_ratios():
    """Four rounds, a method 0.9x of its base in three of them, the machine slowing in rounds 2-3: 0.9 paired, where
    the ratio of the medians reads 1.395 / 1.5 = 0.93; unequal round counts are refused."""
    from meft_fx.memory import paired_ratio

    assert paired_ratio([0.9, 1.8, 1.8, 0.99], [1.0, 2.0, 2.0, 1.0]) == pytest.approx((0.9, 0.9, 0.99))
    with pytest.raises(ValueError, match="one time per round for both, got 2 and 3"):
        paired_ratio([1.0, 1.0], [1.0, 1.0, 1.0])
