"""`python -m headstart.tools.compare`: several runs' validation curves from their TensorBoard events, as PNG and CSV."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from conftest import ROOT, MainJob, run_script
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.tensorboard import SummaryWriter

from headstart.tools.compare import compare_runs, find_curve_runs, read_curves, run_labels


def _fake_run(run: Path, overrides: list[str], losses: list[float], steps_per_epoch: int = 10) -> Path:
    """Events as Lightning writes them: `epoch` at every logging step, val/* at each epoch's last step, then the
    final validate of the best checkpoint again at the last step."""
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    writer = SummaryWriter(str(run / "tensorboard"))
    for epoch, loss in enumerate(losses):
        step = (epoch + 1) * steps_per_epoch - 1
        writer.add_scalar("epoch", epoch, step)
        writer.add_scalar("train/loss", loss + 0.1, step)
        writer.add_scalar("val/loss", loss, step)
        writer.add_scalar("val/label/acc", 1 - loss / 2, step)
        writer.add_scalar("val/label/count", 50, step)
    writer.add_scalar("epoch", len(losses), step + 1)  # validate(best) after training: not part of the curve
    writer.add_scalar("val/loss", min(losses), step + 1)
    writer.close()
    return run


@pytest.fixture
def two_runs(tmp_path: Path) -> list[Path]:
    sweep = tmp_path / "multirun" / "digits" / "2026-11-23_10-00-00"
    return [
        _fake_run(sweep / "0", ["experiment=digits", "optimizer.lr=0.01"], [1.0, 0.6, 0.4]),
        _fake_run(sweep / "1", ["experiment=digits", "optimizer.lr=0.001"], [1.2, 0.9, 0.7, 0.5], 7),
    ]


def test_curves_are_read_per_epoch_without_the_final_validate(two_runs: list[Path]) -> None:
    curves = read_curves(two_runs[1], ["val/loss"])
    assert curves["epoch"].tolist() == [0, 1, 2, 3]
    assert curves["step"].tolist() == [6, 13, 20, 27]
    assert curves["value"].round(6).tolist() == [1.2, 0.9, 0.7, 0.5]


def test_curves_of_the_curves_first_layout_are_read_by_metric_name(tmp_path: Path) -> None:
    """Runs logged by headstart's TensorBoard logger: tags like curves/loss/val, no `epoch` scalar."""
    writer = SummaryWriter(str(tmp_path / "run" / "tensorboard"))
    for epoch, loss in enumerate([0.9, 0.5, 0.3]):
        step = (epoch + 1) * 5 - 1
        writer.add_scalar("curves/loss/train", loss + 0.1, step)
        writer.add_scalar("curves/loss/val", loss, step)
        writer.add_scalar("metrics/label/f1/val", 1 - loss, step)
    writer.add_scalar("summary/val/loss", 0.3, 0)
    writer.close()
    curves = read_curves(tmp_path / "run", ["val/*"])
    assert set(curves["metric"]) == {"val/loss", "val/label/f1"}
    loss = curves[curves["metric"] == "val/loss"]
    assert loss["epoch"].tolist() == [0, 1, 2] and loss["step"].tolist() == [4, 9, 14]


def test_labels_name_the_overrides_that_differ(two_runs: list[Path]) -> None:
    assert run_labels(two_runs) == ["0 optimizer.lr=0.01", "1 optimizer.lr=0.001"]


def test_compare_writes_png_and_csv_with_every_point(two_runs: list[Path], tmp_path: Path) -> None:
    runs = find_curve_runs([two_runs[0].parent])  # the sweep folder: its runs are found
    assert runs == two_runs
    out = tmp_path / "report" / "compare"
    compare_runs(runs, ["val/*"], out)
    table = pd.read_csv(out.with_suffix(".csv"))
    assert set(table["metric"]) == {"val/loss", "val/label/acc"}  # counts are not curves
    loss = table[table["metric"] == "val/loss"]
    assert loss.groupby("label")["value"].count().to_dict() == {
        "0 optimizer.lr=0.01": 3,
        "1 optimizer.lr=0.001": 4,
    }
    assert loss[loss["label"].str.startswith("0")]["value"].round(6).tolist() == [1.0, 0.6, 0.4]
    with Image.open(out.with_suffix(".png")) as image:
        assert image.width > 600 and image.height > 300


def test_cli_on_a_real_run_and_its_errors(main_job: MainJob, tmp_path: Path) -> None:
    # the session's main job (conftest), only read: the folder that holds its run, <root>/outputs/digits/<run>
    outputs = main_job.run.parents[1]
    epochs = OmegaConf.load(main_job.run / ".hydra" / "config.yaml").trainer.max_epochs
    out = tmp_path / "cmp"
    result = run_script(
        [
            "-m",
            "headstart.tools.compare",
            str(outputs),
            "--metrics",
            "val/loss",
            "--out",
            str(out),
        ],
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    table = pd.read_csv(out.with_suffix(".csv"))
    assert table["epoch"].tolist() == list(range(epochs)) and (table["metric"] == "val/loss").all()
    assert out.with_suffix(".png").is_file()

    result = run_script(["-m", "headstart.tools.compare", str(outputs), "--metrics", "val/nothing"], cwd=ROOT)
    assert result.returncode == 2 and "no run has a scalar matching val/nothing" in result.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_script(["-m", "headstart.tools.compare", str(empty)], cwd=ROOT)
    assert result.returncode == 2 and "no TensorBoard event files" in result.stderr
