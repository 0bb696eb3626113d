"""measure_speed on a fake model whose cost is known (it sleeps), thread pinning, and the machine description.

Bounds are generous on purpose: sleep only ever overshoots, and the machine is shared and noisy.
"""

from __future__ import annotations

import time

import pytest
import torch

from headstart.speed import (
    format_speed,
    machine_info,
    measure_speed,
    percentile,
    time_calls,
    torch_threads,
)

FIXED_S = 0.002  # per call
PER_IMAGE_S = 0.0001


class FakeModel:
    """Sleeps 2 ms per call plus 0.1 ms per image; counts calls per batch size."""

    def __init__(self) -> None:
        self.calls: dict[int, int] = {}

    def __call__(self, batch: list[int]) -> int:
        n = len(batch)
        self.calls[n] = self.calls.get(n, 0) + 1
        time.sleep(FIXED_S + PER_IMAGE_S * n)
        return n


def make_batch(n: int) -> list[int]:
    return list(range(n))


def test_latency_and_throughput_of_a_known_cost():
    speed = measure_speed(FakeModel(), make_batch, warmup=1, min_runs=10, min_seconds=0.05)
    assert set(speed) == {
        "latency_p50_ms",
        "latency_p90_ms",
        "throughput_images_per_s",
        "latency_batch",
        "throughput_batch",
    }
    assert speed["latency_batch"] == 1 and speed["throughput_batch"] == 32
    one = 1000 * (FIXED_S + PER_IMAGE_S)  # 2.1 ms
    assert one * 0.95 <= speed["latency_p50_ms"] < one + 20
    assert speed["latency_p90_ms"] >= speed["latency_p50_ms"]
    per_batch = FIXED_S + 32 * PER_IMAGE_S  # 5.2 ms for 32 images: at most ~6150 images/s
    assert 32 / (per_batch + 0.03) < speed["throughput_images_per_s"] <= 32 / per_batch * 1.05
    # batching pays: per image, the batch-32 call is far cheaper than the batch-1 call
    assert speed["throughput_images_per_s"] > 2 * 1000 / speed["latency_p50_ms"]


def test_min_runs_and_warmup_are_respected():
    model = FakeModel()
    measure_speed(model, make_batch, latency_batch=1, throughput_batch=4, warmup=2, min_runs=7, min_seconds=0)
    assert model.calls == {1: 2 + 7, 4: 2 + 7}


def test_min_seconds_extends_and_max_runs_caps():
    times = time_calls(FakeModel(), [0], min_runs=1, min_seconds=0.05)
    assert len(times) > 3 and sum(times) >= 0.04
    assert len(time_calls(FakeModel(), [0], min_runs=1, min_seconds=60, max_runs=5)) == 5
    with pytest.raises(ValueError):
        time_calls(FakeModel(), [0], min_runs=0)


def test_sync_is_called_around_every_timed_call():
    syncs = []
    times = time_calls(lambda b: None, [0], min_runs=4, min_seconds=0, sync=lambda: syncs.append(1))
    assert len(times) == 4 and len(syncs) == 8


def test_percentile():
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([1.0, 2.0], 50) == 1.5
    assert percentile([5.0], 90) == 5.0
    assert percentile(list(map(float, range(11))), 90) == pytest.approx(9.0)


def test_torch_threads_sets_and_restores():
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), torch_threads(1):
        raise RuntimeError("boom")
    assert torch.get_num_threads() == before


def test_machine_info_and_format():
    info = machine_info(threads=3, runtime="onnxruntime")
    assert set(info) >= {
        "cpu",
        "cores",
        "threads",
        "runtime",
        "device",
        "platform",
        "python",
        "torch",
        "onnxruntime",
    }
    assert info["threads"] == 3 and info["runtime"] == "onnxruntime" and info["device"] == "cpu"
    assert info["cores"] >= 1 and info["cpu"] and info["torch"] == torch.__version__
    speed = {
        "latency_p50_ms": 25.12,
        "latency_p90_ms": 27.0,
        "throughput_images_per_s": 80.0,
        "latency_batch": 1,
        "throughput_batch": 32,
    }
    text = format_speed(speed, info)
    assert "25.1 ms" in text and "80.0 images/s" in text and "3 threads" in text and "onnxruntime" in text
    assert "\n" not in text
