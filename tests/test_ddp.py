"""trainer=ddp: two CPU processes (gloo) started the way users start them (python train.py trainer=ddp), one run
directory, checkpoints and metrics.json written once, and metrics synchronized across ranks: equal to a single-process
evaluation of the same checkpoint on the same data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, compose_train, make_tree, run_script
from omegaconf import OmegaConf
from torch.utils.data import SequentialSampler
from torchmetrics import Metric

from headstart.data.features import RowBatchSampler
from headstart.flow import FlowMetrics, TaskFlow
from headstart.train.recipe import EachOnce, train

DDP = ["trainer=ddp", "trainer.devices=2", "data.num_workers=0"]


def _ddp_run(tmp_path: Path, overrides: list[str]) -> tuple[Path, str]:
    """Run train.py with two processes; return its one run directory and its output."""
    result = run_script(["train.py", *DDP, f"paths.root_dir={tmp_path}", *overrides], cwd=ROOT, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    runs = [p for p in (tmp_path / "outputs").glob("*/*") if p.is_dir()]
    assert len(runs) == 1, runs  # the second rank did not make its own run directory
    run = runs[0]
    assert (
        run / "train_ddp_process_1.log"
    ).is_file()  # there was a second process, and it wrote into this run
    assert [p.relative_to(tmp_path) for p in tmp_path.rglob("metrics.json")] == [
        (run / "metrics.json").relative_to(tmp_path)
    ]
    assert output.count("headstart.train.recipe][INFO] - final metrics") == 1  # only rank 0 records and ships
    return run, output


def _single_process_metrics(tmp_path: Path, overrides: list[str], ckpt: Path) -> dict[str, float]:
    """Validate and test `ckpt` in this process on one device (no DDP), as train.py train=false ckpt_path=... does."""
    cfg = compose_train(
        [*overrides, "train=false", f"ckpt_path={ckpt}", "export.onnx=false"],
        tmp_path,
    )
    train(cfg)
    return json.loads((tmp_path / "run" / "metrics.json").read_text())


def _assert_same_evaluation(
    ddp: dict[str, float], single: dict[str, float], skip: tuple[str, ...] = ()
) -> None:
    keys = {k for k in single if k.startswith(("val/", "test/")) and k not in skip}
    assert keys and keys <= set(ddp)
    for key in sorted(keys):
        if key.endswith("/count"):
            assert ddp[key] == single[key], key  # every sample once: no padding, nothing left out
        else:
            assert ddp[key] == pytest.approx(single[key], rel=1e-5, abs=1e-6), key


@pytest.mark.slow
def test_ddp_on_images_writes_one_run_with_synchronized_metrics(tmp_path):
    overrides = ["experiment=digits", "trainer.max_epochs=1", "+trainer.limit_train_batches=4"]
    run, _ = _ddp_run(tmp_path, overrides)
    ckpts = sorted(p.relative_to(run).as_posix() for p in (tmp_path / "outputs").rglob("*.ckpt"))
    assert ckpts == ["checkpoints/best.ckpt", "checkpoints/last.ckpt"]
    assert (run / "model.onnx").is_file() and (run / "bundle" / "model.json").is_file()
    assert (run / ".hydra" / "config.yaml").is_file()
    ddp = json.loads((run / "metrics.json").read_text())
    assert ddp["test/label/count"] == 179  # an odd count: a padded sampler would have evaluated 180

    single = _single_process_metrics(tmp_path, overrides, run / "checkpoints" / "best.ckpt")
    _assert_same_evaluation(ddp, single)


@pytest.mark.slow
def test_ddp_on_dof_features_trains_reattaches_and_synchronizes(tmp_path):
    # 7 validation images in batches of 4: the ranks get 4 and 3 rows, not a padded 4 and 4.
    splits = {
        "train": {"a": 8, "b": 8, "c": 8},
        "val": {"a": 3, "b": 2, "c": 2},
        "test": {"a": 3, "b": 3, "c": 3},
    }
    make_tree(tmp_path / "imgs", splits)
    overrides = [
        "data=folder",
        f"data.root={tmp_path / 'imgs'}",
        "backbone=small_cnn",
        "extract.progress=false",
        "features=true",
        "extract.train_batch_size=4",
        "trainer.max_epochs=2",
    ]
    run, _ = _ddp_run(tmp_path, [*overrides, "export.onnx=false"])
    ckpts = sorted(p.relative_to(run).as_posix() for p in (tmp_path / "outputs").rglob("*.ckpt"))
    assert ckpts == ["checkpoints/best.ckpt", "checkpoints/image_model.ckpt", "checkpoints/last.ckpt"]
    assert len(list((tmp_path / "dof").glob("*/*/manifest.json"))) == 1  # extracted once, by rank 0
    ddp = json.loads((run / "metrics.json").read_text())
    assert ddp["val/label/count"] == 7 and ddp["test/label/count"] == 9
    assert ddp["dof/epochs"] == 2

    single = _single_process_metrics(tmp_path, overrides, run / "checkpoints" / "best.ckpt")
    _assert_same_evaluation(ddp, single)


@pytest.mark.slow
def test_ddp_in_a_multirun_stops_with_a_clear_error(tmp_path):
    result = run_script(["train.py", "-m", *DDP, f"paths.root_dir={tmp_path}"], cwd=ROOT, timeout=120)
    assert result.returncode == 2
    assert "-m sweep" in result.stderr and "Traceback" not in result.stderr


def test_evaluation_sampler_gives_every_sample_to_exactly_one_rank():
    items = [list(EachOnce(SequentialSampler(range(7)), 2, r)) for r in (0, 1)]
    assert items == [[0, 2, 4, 6], [1, 3, 5]]
    # A sampler of whole batches (DoF features): shared row by row, re-batched at its batch size.
    batches = RowBatchSampler(np.arange(7), batch_size=4, shuffle=False)
    shares = [[b.tolist() for b in EachOnce(batches, 2, r)] for r in (0, 1)]
    assert shares == [[[0, 2, 4, 6]], [[1, 3, 5]]]
    assert [len(EachOnce(batches, 3, r)) for r in (0, 1, 2)] == [1, 1, 1]


def test_top_k_accuracy_stays_its_own_after_a_first_batch_of_one_class():
    # torchmetrics' compute groups would merge top-2 accuracy into macro F1 when their states are equal after the
    # first update (one class only, all predicted alike), and report top-1 values for top-2 from then on.
    flow = TaskFlow.from_spec({"tasks": {"label": {"kind": "multiclass", "classes": ["a", "b", "c"]}}})
    metrics = FlowMetrics(flow)
    logits = torch.tensor([[-0.03, -0.02, 0.01]] * 4)
    metrics.update({"label": logits}, {"label": torch.zeros(4)})
    metrics.compute()  # the first flush: the point where torchmetrics would group
    metrics.reset()
    metrics.update({"label": logits}, {"label": torch.tensor([0.0, 1.0, 2.0, 2.0])})
    values = metrics.compute()
    assert values["label/acc"] == pytest.approx(0.5) and values["label/top2_acc"] == pytest.approx(0.75)


@pytest.mark.slow
def test_ddp_taskflow_masked_metrics_match_one_process(tmp_path):
    """A conditional flow: each task's metrics count only the samples where it applies, summed across the ranks."""
    overrides = [
        "experiment=security",
        "data.n=240",
        f"data.root={tmp_path / 'security'}",
        "trainer.max_epochs=1",
        "export.onnx=false",
    ]
    run, _ = _ddp_run(tmp_path, overrides)
    ddp = json.loads((run / "metrics.json").read_text())
    assert (
        0 < ddp["test/door_locked/count"] < ddp["test/camera_blocked/count"]
    )  # masked: only closed doors count
    single = _single_process_metrics(tmp_path, overrides, run / "checkpoints" / "best.ckpt")
    # Every task's metrics and loss, and the flow loss (the monitored val/loss), although the ranks batch differently.
    _assert_same_evaluation(ddp, single)


def test_two_processes_sum_to_the_epoch_loss_of_one():
    """What DDP makes of FlowMetrics: each rank's states, added. Ranks get every other row, in their own batches."""
    spec = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "flow" / "security.yaml"))
    flow = TaskFlow.from_spec(spec)
    n, g = 90, torch.Generator().manual_seed(0)
    logits = {p: torch.randn(n, t.num_outputs, generator=g).squeeze(-1) for p, t in flow.tasks.items()}
    targets = {}
    for path, task in flow.tasks.items():
        shape = (n, len(task.classes)) if task.kind == "multilabel" else (n,)
        high = len(task.classes) if task.kind == "multiclass" else 2
        value = torch.randint(0, high, shape, generator=g).float()
        value = value * 64 / high if task.kind == "bounded_regression" else value
        targets[path] = torch.where(torch.rand(shape, generator=g) < 0.2, torch.nan, value)

    def fed(rows: torch.Tensor, batch_size: int) -> FlowMetrics:
        metrics = FlowMetrics(flow, flush_every=1)
        for batch in rows.split(batch_size):
            part = {p: v[batch] for p, v in logits.items()}, {p: v[batch] for p, v in targets.items()}
            metrics.update(*part, flow.loss(*part)[1])
        return metrics

    one = fed(torch.arange(n), 32).compute()
    ranks = [fed(torch.arange(r, n, 2), 4) for r in (0, 1)]
    for mine, other in zip(ranks[0].modules(), ranks[1].modules(), strict=True):
        if isinstance(mine, Metric):
            mine.merge_state(other)
    for name, buffer in ranks[0].named_buffers(recurse=False):  # the sums, as compute's all_reduce adds them
        buffer += ranks[1].get_buffer(name)
    two = ranks[0].compute()
    losses = [k for k in one if k == "loss" or k.endswith("/loss")]
    assert len(losses) == len(flow.tasks) + 1
    for key in losses:
        assert two[key].item() == pytest.approx(one[key].item(), rel=1e-5), key
