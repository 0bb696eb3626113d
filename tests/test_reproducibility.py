"""seed=... trainer.deterministic=true: two runs of the same config on CPU record the same metrics, to the bit."""

from __future__ import annotations

import json

import pytest
from conftest import compose_train

from headstart.train.recipe import train


@pytest.mark.slow
def test_same_seed_deterministic_runs_give_identical_metrics(tmp_path):
    overrides = [
        "experiment=digits",
        "seed=123",
        "trainer.deterministic=true",
        "trainer.max_epochs=2",
        "data.batch_size=16",
        "+trainer.limit_train_batches=4",
        "+trainer.limit_val_batches=2",
        "+trainer.limit_test_batches=2",
        "callbacks.confusion_matrix=null",  # figures: slow, and not what is compared
        "callbacks.prediction_grid=null",
        "callbacks.worst_examples=null",
        "export.onnx=false",
        "cost.latency=false",  # timings (cost/torch_ms) differ from run to run; params and MACs are compared
        f"paths.data_dir={tmp_path / 'data'}",  # digits written once, read by both runs
    ]
    results = []
    for run in ("first", "second"):
        cfg = compose_train([*overrides, f"paths.output_dir={tmp_path / run}"], tmp_path)
        train(cfg)
        results.append(json.loads((tmp_path / run / "metrics.json").read_text()))
    first, second = results
    assert {"val/loss", "test/loss", "test/label/acc"} <= set(first)
    assert first == second  # exactly: same weights, same augmentation draws, same batches
