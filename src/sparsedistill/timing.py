"""The one GPU timing routine (benchmarks and recipes): CUDA events, warm-up, median of many repetitions."""

from __future__ import annotations

import os
import re
import statistics
import time
import traceback
import warnings

import torch

__all__ = ["time_ms", "kernel_times", "top_kernels", "kernel_groups", "host_syncs", "host_sync_sites", "LapTimer"]


def time_ms(fn, graph: bool, calls: int = 20, reps: int = 30, warmup: int = 3) -> float:
    """Median milliseconds per call; with ``graph`` the calls are captured once and replayed.

    ``warmup`` eager calls come first (a graph also gets two on a side stream before capture).
    """
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    if graph:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(calls):
                fn()
        run = g.replay
    else:
        def run():
            for _ in range(calls):
                fn()
    run()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        run()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / calls)
    return statistics.median(times)


def kernel_times(fn) -> dict[str, float]:
    """GPU milliseconds per kernel name in one call of ``fn`` (after one untimed call): a profiler split."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    out: dict[str, float] = {}
    for ev in prof.events():  # kernels only (operator events would count their kernels twice)
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            out[ev.name] = out.get(ev.name, 0.0) + ev.self_device_time_total / 1e3
    return out


def top_kernels(times: dict[str, float], n: int = 8, width: int = 60) -> dict[str, float]:
    """The ``n`` largest entries of a ``kernel_times`` split, names cut to ``width`` characters; kernels whose cut
    names coincide (templated PyTorch kernels share long prefixes) are summed, not overwritten."""
    merged: dict[str, float] = {}
    for name, ms in times.items():
        merged[name[:width]] = merged.get(name[:width], 0.0) + ms
    return {name: round(ms, 3) for name, ms in sorted(merged.items(), key=lambda kv: -kv[1])[:n]}


def kernel_groups(times: dict[str, float], groups: dict[str, tuple[str, ...]]) -> dict[str, float]:
    """A ``kernel_times`` split summed into named groups (e.g. GEMM / attention / fused elementwise): a kernel joins
    the first group, in ``groups``' order, one of whose substrings its name contains (case-insensitive); the rest is
    ``other``. Every group is in the result, 0 where no kernel matched."""
    out = {name: 0.0 for name in groups} | {"other": 0.0}
    for kernel, ms in times.items():
        low = kernel.lower()
        group = next((g for g, keys in groups.items() if any(k.lower() in low for k in keys)), "other")
        out[group] += ms
    return {name: round(ms, 3) for name, ms in out.items()}


SYNC_WARNING = "called a synchronizing CUDA operation"  # c10's text for each wait in the "warn" sync debug mode


def host_sync_sites(fn) -> list[str]:
    """Where ``fn`` makes the host wait for the GPU (each wait idles the card while the host launches what follows):
    per wait that CUDA's sync debug mode reports, the innermost Python frames outside torch that led to it, as
    ``file:line function <- file:line function``. A wait inside ``loss.backward()`` is reported at that line (the
    autograd engine replays its threads' warnings there); to find its operation, run the step under
    ``torch.cuda.set_sync_debug_mode("error")`` with ``torch.autograd.detect_anomaly()``."""
    before, sites, show = torch.cuda.get_sync_debug_mode(), [], warnings.showwarning
    skip = (os.path.dirname(torch.__file__), os.path.abspath(__file__), os.path.abspath(warnings.__file__))

    def record(message, category, filename, lineno, file=None, line=None):
        # torch appends "(Triggered internally at ...)"; other warnings pass on as usual, among them torch's one-time
        # notice on first enabling the mode ("... does not yet detect all synchronizing operations")
        if not str(message).startswith(SYNC_WARNING):
            return show(message, category, filename, lineno, file, line)
        frames = [f for f in traceback.extract_stack()[:-1] if not os.path.abspath(f.filename).startswith(skip)]
        sites.append(" <- ".join(f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in reversed(frames[-2:])))

    with warnings.catch_warnings():  # restores the filters and showwarning on the way out
        warnings.filterwarnings("always", message=re.escape(SYNC_WARNING))  # every wait, the others as filtered
        warnings.showwarning = record
        try:  # the mode is restored even if torch's notice on setting it is raised (-W error)
            torch.cuda.set_sync_debug_mode("warn")
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(before)
    return sites


def host_syncs(fn) -> int:
    """How many times ``fn`` makes the host wait for the GPU (``host_sync_sites`` says where)."""
    return len(host_sync_sites(fn))


class LapTimer:
    """Seconds since the last call (``device``'s queue drained first, so that each stage of a loop is charged its own
    work, not the work queued before it): ``lap = LapTimer(device); ...; split["stage"] += lap()``."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.last = torch.device(device), time.perf_counter()

    def __call__(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        elapsed, self.last = now - self.last, now
        return elapsed
