"""Peak extra memory of a piece of CPU work: the most bytes torch held at once above what it held before.

    peak_bytes, result = cpu_peak_extra_bytes(lambda: loss_fn(logits).backward())

How: run the work under `torch.profiler.profile(profile_memory=True)` and replay, in time order,
every allocation and free the profiler saw on the CPU; the running sum starts at 0 when the
profiler starts (the inputs already exist), and its maximum is the peak extra.

Why the raw allocation events and not the `[memory]` rows of `prof.events()`: those rows hold
only the frees (and allocations) that happen outside any op; an allocation inside an op (say
aten::empty, or a temporary that an op allocates and frees again) is folded into that op's
`cpu_memory_usage` total and never appears as its own row, so summing `[memory]` rows misses
most of the traffic and every transient. The profiler's event tree
(`kineto_results.experimental_event_tree()`, what torch's own memory profiler reads) keeps one
Allocation event per malloc/free with its signed size and time; that is what we replay.

What it cannot see: memory obtained outside torch's CPU allocator (a C++ library calling
malloc or std::vector for scratch). The earkit native twin gets its outputs from torch, so they
count; scratch it allocates itself would not. Frees of blocks that existed before the profiler
started are also not reported (torch warns about it); here that only makes the number an upper
bound, and in a fwd+bwd benchmark the inputs outlive the work anyway.
"""

from __future__ import annotations

import warnings

from torch.profiler import ProfilerActivity, profile

MB = 1 << 20


def _allocation_events(prof) -> list[tuple[int, int]]:
    """(time ns, signed bytes) of every CPU allocation (+) and free (-) the profiler recorded."""
    from torch._C._profiler import _EventType

    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        if event.tag == _EventType.Allocation:
            fields = event.extra_fields
            if fields.device.type == "cpu":
                events.append((event.start_time_ns, fields.alloc_size))
        stack.extend(event.children)
    events.sort(key=lambda e: e[0])
    return events


def peak_of_running_sum(signed_sizes) -> int:
    """Max over time of the cumulative sum of allocation (+) and free (-) sizes, never below 0."""
    running = peak = 0
    for size in signed_sizes:
        running += size
        peak = max(peak, running)
    return peak


def cpu_peak_extra_bytes(fn):
    """Run fn() once under the profiler; return (peak extra bytes allocated by torch on CPU, fn's result)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the profiler's notes about blocks that predate it
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            result = fn()
    return peak_of_running_sum(size for _, size in _allocation_events(prof)), result
