"""Inference speed: batch-1 latency and large-batch throughput of any callable, and what they were measured on.

A speed figure means little without the machine, the runtime and the thread count behind it, so every measurement
here comes with `machine_info`, and `format_speed` writes both as one line for reports.
"""

from __future__ import annotations

import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from headstart.serve.runtime import default_threads


def time_calls(
    run: Callable[[Any], Any],
    batch: Any,
    min_runs: int = 10,
    min_seconds: float = 1.0,
    max_runs: int = 1000,
    sync: Callable[[], Any] | None = None,
) -> list[float]:
    """Seconds taken by each of repeated `run(batch)` calls: at least `min_runs` calls and at least `min_seconds` in
    all, but never more than `max_runs` calls. `sync` (e.g. torch.cuda.synchronize) is called before each clock read,
    so asynchronous work is counted where it is done."""
    if min_runs < 1 or max_runs < 1:
        raise ValueError(f"min_runs and max_runs must be at least 1, got {min_runs} and {max_runs}")
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_runs and (len(times) < min_runs or time.perf_counter() - start < min_seconds):
        if sync is not None:
            sync()
        t = time.perf_counter()
        run(batch)
        if sync is not None:
            sync()
        times.append(time.perf_counter() - t)
    return times


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) of `values`, linearly interpolated between the nearest ranks."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize(
    latency_times: list[float], throughput_times: list[float], latency_batch: int, throughput_batch: int
) -> dict[str, float]:
    """The figures of `measure_speed` from raw call times (seconds): lets a caller pool times over several rounds."""
    return {
        "latency_p50_ms": 1000.0 * percentile(latency_times, 50),
        "latency_p90_ms": 1000.0 * percentile(latency_times, 90),
        "throughput_images_per_s": throughput_batch / statistics.median(throughput_times),
        "latency_batch": latency_batch,
        "throughput_batch": throughput_batch,
    }


def measure_speed(
    run: Callable[[Any], Any],
    make_batch: Callable[[int], Any],
    latency_batch: int = 1,
    throughput_batch: int = 32,
    warmup: int = 3,
    min_runs: int = 10,
    min_seconds: float = 1.0,
    max_runs: int = 1000,
    sync: Callable[[], Any] | None = None,
) -> dict[str, float]:
    """Latency at batch 1 (p50 and p90 over repeated single calls, ms) and throughput at a larger batch
    (images/s, from the median time per batch call). Returns keys: latency_p50_ms, latency_p90_ms,
    throughput_images_per_s, latency_batch, throughput_batch.

    `make_batch(n)` builds an input of n images (built once per batch size, outside the clock); `warmup` untimed
    calls precede each measurement; `sync` is called around each timed call (pass torch.cuda.synchronize for CUDA).
    """
    timings = []
    for n in (latency_batch, throughput_batch):
        batch = make_batch(n)
        for _ in range(warmup):
            run(batch)
        timings.append(time_calls(run, batch, min_runs, min_seconds, max_runs, sync))
        del batch
    return summarize(timings[0], timings[1], latency_batch, throughput_batch)


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Set torch.set_num_threads(n) inside the block and restore the previous count after it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def cpu_name() -> str:
    """The CPU's model name: /proc/cpuinfo where there is one, else platform.processor()."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_info(threads: int, runtime: str, device: str = "cpu") -> dict[str, Any]:
    """What a speed figure was measured on: cpu model name (from /proc/cpuinfo when present, else
    platform.processor()), logical cores available to the process, threads used, runtime name, device (GPU name when
    cuda), platform, python/torch/onnxruntime versions."""
    if device.startswith("cuda") and torch.cuda.is_available():
        index = torch.device(device).index
        device_name = f"{device} ({torch.cuda.get_device_name(index if index is not None else 0)})"
    else:
        device_name = device
    try:
        import onnxruntime

        ort_version: str | None = onnxruntime.__version__
    except ImportError:
        ort_version = None
    return {
        "cpu": cpu_name(),
        "cores": default_threads(),
        "threads": int(threads),
        "runtime": runtime,
        "device": device_name,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "onnxruntime": ort_version,
    }


def format_speed(speed: dict, info: dict) -> str:
    """One markdown-ready line: the figures, then what they were measured on."""
    versions = f"python {info.get('python')}, torch {info.get('torch')}"
    if info.get("onnxruntime"):
        versions += f", onnxruntime {info['onnxruntime']}"
    return (
        f"latency (batch {speed['latency_batch']}) p50 {speed['latency_p50_ms']:.1f} ms, "
        f"p90 {speed['latency_p90_ms']:.1f} ms; "
        f"throughput (batch {speed['throughput_batch']}) {speed['throughput_images_per_s']:.1f} images/s "
        f"— {info.get('runtime')} on {info.get('device')}, {info.get('threads')} threads, "
        f"{info.get('cpu')} ({info.get('cores')} cores available), {info.get('platform')}; {versions}"
    )
