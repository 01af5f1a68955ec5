"""Measuring the activation memory and the time of one training step.

    mem = measure_step_memory(lambda: model(**batch).loss.backward())
    mem.activation_bytes      # peak of live tensor bytes during the step minus what outlives it

CPU: the step runs under `torch.profiler.profile(profile_memory=True)`. Every allocation and free
of the CPU allocator is recorded as a `[memory]` event with a signed byte count (allocations
positive, frees negative). They are read from `prof.profiler.kineto_results.events()`
(`event.name() == "[memory]"`, `event.nbytes()`, `event.start_ns()`, `event.device_type()`),
sorted by start time and summed; the running maximum is the peak, the final sum what the step
retained. (`prof.events()` is not enough: it only lists the `[memory]` events that happen outside
any operator, the others are folded into the operators' `cpu_memory_usage`.)

CUDA: `torch.cuda.reset_peak_memory_stats` and `torch.cuda.max_memory_allocated` around the step.

All numbers are relative to the live bytes when the step starts, so parameters, inputs and
gradient buffers that already exist are not counted. On CPU the allocator reports only the frees
of blocks allocated while profiling, so freeing a tensor that existed before the step is invisible
(it does not lower `retained_bytes`); on CUDA it does. To measure activation memory cleanly, run
one step first so that `.grad` buffers exist, zero them in place (`zero_grad(set_to_none=False)`)
and then measure: gradients accumulate into the existing buffers and `retained_bytes` is ~0.
"""
from __future__ import annotations

import contextlib
import gc
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch

__all__ = ["StepMemory", "measure_step_memory", "median_step_time", "alternating_times", "balanced_orders",
           "memory_deltas", "paired_ratio"]

MiB = 1 << 20


@dataclass
class StepMemory:
    """Memory of one step, in bytes, relative to the live tensor bytes when the step started."""

    peak_bytes: int        # peak of live tensor bytes during the step, relative to the start
    retained_bytes: int    # bytes still live at the end of the step (e.g. .grad buffers), relative to the start
    activation_bytes: int  # peak_bytes - retained_bytes  (the number we report as "activation memory")

    @property
    def activation_mib(self) -> float:
        """`activation_bytes` in MiB: the step's peak minus what it leaves behind (what the README reports)."""
        return self.activation_bytes / MiB

    @property
    def peak_mib(self) -> float:
        """`peak_bytes` in MiB: the most the step had allocated at once, relative to its start."""
        return self.peak_bytes / MiB

    @property
    def retained_mib(self) -> float:
        """`retained_bytes` in MiB: still allocated when the step ended (e.g. new .grad buffers)."""
        return self.retained_bytes / MiB


def _device(device) -> torch.device:
    return device if isinstance(device, torch.device) else torch.device(device)


def _from_deltas(deltas: Iterable[int]) -> StepMemory:
    total = peak = 0
    for d in deltas:
        total += d
        if total > peak:
            peak = total
    return StepMemory(peak_bytes=int(peak), retained_bytes=int(total), activation_bytes=int(peak - total))


def memory_deltas(prof, device: str = "cpu") -> list[int]:
    """Signed byte deltas of the allocator events recorded by a finished
    `torch.profiler.profile(profile_memory=True)`, in time order (allocations positive, frees
    negative), for one device type ("cpu" or "cuda")."""
    results = getattr(getattr(prof, "profiler", None), "kineto_results", None)
    if results is None:
        raise RuntimeError("the profiler recorded no results (was it run with profile_memory=True, and has it exited?)")
    events = []
    try:
        want = getattr(torch._C._autograd.DeviceType, device.upper())
        for i, e in enumerate(results.events()):
            if e.name() == "[memory]" and e.device_type() == want:
                events.append((e.start_ns(), i, int(e.nbytes())))
    except AttributeError:  # a different binding layout: walk the experimental event tree instead
        events = []
        stack = list(results.experimental_event_tree())
        while stack:
            node = stack.pop()
            stack.extend(node.children)
            if node.name == "[memory]" and node.extra_fields.device.type == device:
                events.append((node.start_time_ns, len(events), int(node.extra_fields.alloc_size)))
    events.sort()
    return [d for _, _, d in events]


def measure_step_memory(step: Callable[[], Any], device: str | torch.device = "cpu") -> StepMemory:
    """Run `step()` once and return its memory profile (see `StepMemory`).

    The step's return value is dropped before the measurement ends, so a returned tensor does not
    count as retained; state the step leaves behind (`.grad` buffers, tensors stored elsewhere) does.
    `device`: "cpu" (profiler allocator events) or a CUDA device (the allocator's peak statistics).
    """
    dev = _device(device)
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        start = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        out = step()
        del out
        torch.cuda.synchronize(dev)
        peak = max(torch.cuda.max_memory_allocated(dev) - start, 0)
        retained = torch.cuda.memory_allocated(dev) - start
        return StepMemory(peak_bytes=int(peak), retained_bytes=int(retained), activation_bytes=int(peak - retained))
    if dev.type != "cpu":
        raise ValueError(f"measure_step_memory supports cpu and cuda devices, not {dev}")
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _silenced_fds():  # the profiler's start and stop print lines of their own (USDT probes) from C++
        prof.__enter__()
    try:
        out = step()
        del out
    finally:
        with _silenced_fds():
            prof.__exit__(None, None, None)
    return _from_deltas(memory_deltas(prof))


@contextlib.contextmanager
def _silenced_fds():
    """Standard output and error (the file descriptors, which C++ writes to) go to /dev/null inside."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = [os.dup(fd) for fd in (1, 2)]
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        for fd in (1, 2):
            os.dup2(null, fd)
        yield
    finally:
        for fd, old in zip((1, 2), saved):
            os.dup2(old, fd)
            os.close(old)
        os.close(null)


def median_step_time(step: Callable[[], Any], warmup: int = 1, repeats: int = 5,
                     device: str | torch.device | None = None) -> float:
    """Median wall-clock seconds of `step()` over `repeats` runs after `warmup` untimed runs.
    For a CUDA `device` the device is synchronized around each timed run."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    dev = None if device is None else _device(device)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev is not None and dev.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return float(statistics.median(times))


def balanced_orders(n: int, rounds: int) -> list:
    """`rounds` orders of range(n) in which every item runs in every position and after every other item
    equally often over each 2n rounds (n rounds for even n): a Williams design, so that what one step
    leaves behind (a grown heap, warm caches) does not always favour the same successor."""
    first, lo, hi = [0], 1, n - 1
    while len(first) < n:
        first.append(lo)
        lo += 1
        if len(first) < n:
            first.append(hi)
            hi -= 1
    orders = []
    for r in range(rounds):
        row = [(x + r) % n for x in first]
        orders.append(row[::-1] if n % 2 and (r // n) % 2 else row)
    return orders


def alternating_times(steps: dict, rounds: int = 3, warmup: int = 1) -> dict:
    """{name: [seconds per round]} of each `steps[name]()`, run in turn so that a machine whose load
    changes slows every method alike; each round takes the next of `balanced_orders`, so every method
    follows every other one equally often. `warmup` untimed turns first (in the given order)."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    for _ in range(warmup):
        for step in steps.values():
            step()
    names = list(steps)
    times: dict = {name: [] for name in steps}
    for order in balanced_orders(len(names), rounds):
        for i in order:
            t0 = time.perf_counter()
            steps[names[i]]()
            times[names[i]].append(time.perf_counter() - t0)
    return times


def paired_ratio(times, base_times) -> tuple[float, float, float]:
    """(median, min, max) of the per-round ratios times[i] / base_times[i] of two steps timed in the same rounds
    (`alternating_times`): a load change during the run slows both in its rounds, so the ratio of each round is
    steadier than the ratio of the two medians, which a round set of either one's own can move."""
    if not times or len(times) != len(base_times):
        raise ValueError(f"paired_ratio: needs one time per round for both, got {len(times)} and {len(base_times)}")
    per_round = [a / b for a, b in zip(times, base_times)]
    return statistics.median(per_round), min(per_round), max(per_round)
