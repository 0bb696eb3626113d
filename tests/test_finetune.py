"""finetune=: each schedule trains exactly the backbone stages it names, from the epochs it names, at the learning rates
it names (the head's, the head's x backbone_lr_ratio), with frozen BatchNorm in eval mode; resuming keeps all of it.

The model is the digits job's small_cnn (3 stages: block1, block2, block3, each a conv and a BatchNorm) on the real
digits, two small batches per epoch."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import ROOT, compose_train
from hydra.utils import instantiate
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.nn.modules.batchnorm import _BatchNorm

from headstart.errors import ConfigError
from headstart.train.config import validate_train_config
from headstart.train.finetune import FrozenStages
from headstart.train.recipe import build_callbacks, build_datamodule, build_model, train

LR = 0.01
EPOCHS = 3
STAGES = {1, 2, 3}
ETA_MIN = 0.002
OPTIONS = sorted(p.stem for p in (ROOT / "conf" / "finetune").glob("*.yaml"))


def _overrides(data_dir: Path) -> list[str]:
    return [
        f"paths.data_dir={data_dir}",
        "data.augment=[]",
        "data.batch_size=16",
        f"optimizer.lr={LR}",
        f"trainer.max_epochs={EPOCHS}",
        "trainer.accelerator=cpu",
        "+trainer.limit_train_batches=2",
        "+trainer.limit_val_batches=1",
        "+trainer.num_sanity_val_steps=0",
        "+trainer.enable_progress_bar=false",
    ]


def _cosine(epoch: int, eta_min: float = 0.0) -> float:
    """The head's learning rate at `epoch` under the default scheduler (cosine, T_max = max_epochs)."""
    return eta_min + (LR - eta_min) * (1 + math.cos(math.pi * epoch / EPOCHS)) / 2


class Recorder(L.Callback):
    """Per epoch, at its first batch: trainable stages, parameter groups (name, lr, stages), stages whose BatchNorm
    is in train mode, and the backbone's state; so that what changed during each epoch is known too."""

    def __init__(self) -> None:
        self.epochs: list[dict] = []
        self.states: list[dict[str, torch.Tensor]] = []

    def _stage_of(self, pl_module: L.LightningModule) -> dict[str, object]:
        where: dict[str, object] = {n: "head" for n, _ in pl_module.named_parameters()}
        for i, stage in enumerate(pl_module.backbone.stages, 1):
            where.update({f"backbone.body.{n}": i for n in stage})
        return where

    def _state(self, pl_module: L.LightningModule) -> dict[str, torch.Tensor]:
        return {
            k: v.detach().clone() for k, v in pl_module.state_dict().items() if not k.startswith("metrics")
        }

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx:
            return
        stage_of, body = self._stage_of(pl_module), pl_module.backbone.body
        names = {id(p): n for n, p in pl_module.named_parameters()}
        self.epochs.append(
            {
                "trainable": {stage_of[n] for n, p in pl_module.named_parameters() if p.requires_grad},
                "frozen": {stage_of[n] for n, p in pl_module.named_parameters() if not p.requires_grad},
                "groups": [
                    (g.get("name"), g["lr"], {stage_of[names[id(p)]] for p in g["params"]})
                    for g in trainer.optimizers[0].param_groups
                ],
                "bn_train": {
                    int(n[5]) for n, m in body.named_modules() if isinstance(m, _BatchNorm) and m.training
                },
            }
        )
        self.states.append(self._state(pl_module))

    def on_train_end(self, trainer, pl_module) -> None:
        self.states.append(self._state(pl_module))

    def changed(self, epoch: int, suffix: str) -> set:
        """Stages (or "head") with a tensor ending in `suffix` that changed during `epoch`."""
        before, after = self.states[epoch], self.states[epoch + 1]
        out: set = set()
        for k in before:
            if k.endswith(suffix) and not torch.equal(before[k], after[k]):
                out.add(int(k.split(".")[2][5]) if k.startswith("backbone.") else "head")
        return out


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, L.LightningDataModule]:
    """The digits DataModule, built once (the data dir is shared with other tests of the session)."""
    data_dir = tmp_path_factory.getbasetemp() / "data"
    cfg = compose_train(_overrides(data_dir), tmp_path_factory.mktemp("dm"))
    return data_dir, build_datamodule(cfg)


def _fit(digits, tmp_path: Path, overrides: list[str], recorder: Recorder | None = None) -> Recorder:
    """Fit the tiny model with only the schedule (and `recorder`) as callbacks."""
    data_dir, datamodule = digits
    cfg = compose_train(
        [*_overrides(data_dir), "~callbacks", "~logger", "+trainer.enable_checkpointing=false", *overrides],
        tmp_path,
    )
    validate_train_config(cfg)
    recorder = recorder or Recorder()
    trainer = instantiate(cfg.trainer, callbacks=[*build_callbacks(cfg), recorder], logger=False)
    trainer.fit(build_model(cfg, datamodule), datamodule=datamodule)
    return recorder


ALL = {"backbone": (1.0, STAGES)}
SCHEDULES = {
    # overrides: per epoch, the backbone parameter groups after the head's: {name: (lr / head lr, stages)}
    "linear_probe": (["finetune=linear_probe"], [{}] * EPOCHS),
    "frozen_stages": (
        ["finetune=frozen_stages", "finetune.backbone_lr_ratio=0.5"],
        [{"backbone_stage3": (0.5, {3})}] * EPOCHS,
    ),
    # A cosine with a floor (eta_min) moves a group's rate toward the floor, not in proportion to the head's: the
    # schedule sets the ratio again at every epoch start.
    "freeze_unfreeze": (
        ["finetune=freeze_unfreeze", "finetune.epoch=1", f"+scheduler.eta_min={ETA_MIN}"],
        [{}, {"backbone": (0.1, STAGES)}, {"backbone": (0.1, STAGES)}],
    ),
    "milestones": (
        ["finetune=milestones", "finetune.epochs=[1,2]"],
        [
            {},
            {"backbone_stage3": (0.1, {3})},
            {"backbone_stage3": (0.1, {3}), "backbone_stages1-2": (0.1, {1, 2})},
        ],
    ),
    "full": (["finetune=full"], [ALL] * EPOCHS),
}


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_schedule_trains_exactly_its_stages_at_its_learning_rates(schedule, digits, tmp_path):
    overrides, plan = SCHEDULES[schedule]
    rec = _fit(digits, tmp_path, overrides)
    assert len(rec.epochs) == EPOCHS
    for epoch, (seen, groups) in enumerate(zip(rec.epochs, plan, strict=True)):
        head_lr = _cosine(epoch, ETA_MIN if f"+scheduler.eta_min={ETA_MIN}" in overrides else 0.0)
        want = [("head", head_lr, {"head"})] + [(n, r * head_lr, s) for n, (r, s) in groups.items()]
        got = seen["groups"]
        assert [(n, s) for n, _, s in got] == [(n, s) for n, _, s in want], f"epoch {epoch}"
        assert [lr for _, lr, _ in got] == pytest.approx([lr for _, lr, _ in want], rel=1e-6), (
            f"epoch {epoch}"
        )
        trainable = set().union(*(s for _, (_, s) in groups.items()))
        assert seen["trainable"] == {"head"} | trainable, f"epoch {epoch}"
        assert seen["frozen"] == STAGES - trainable, f"epoch {epoch}"
        assert seen["bn_train"] == trainable, f"epoch {epoch}: frozen BatchNorm must be in eval mode"
        # what the optimizer touched: exactly the trainable stages' weights and their BatchNorm statistics
        assert rec.changed(epoch, "weight") == {"head"} | trainable, f"epoch {epoch}"
        assert rec.changed(epoch, "running_mean") == trainable, f"epoch {epoch}"


# --- configuration errors ------------------------------------------------------------------------------------------


def test_every_finetune_option_composes_and_validates(tmp_path):
    assert OPTIONS == ["freeze_unfreeze", "frozen_stages", "full", "linear_probe", "milestones"]
    assert (
        compose_train([], tmp_path).get("finetune") is None
    )  # the default: backbone.freeze decides, as before
    for option in OPTIONS:
        validate_train_config(compose_train([f"finetune={option}"], tmp_path))


@pytest.mark.parametrize("option", ["frozen_stages", "freeze_unfreeze", "milestones", "full"])
def test_schedules_that_train_the_backbone_refuse_dof_features(option, tmp_path):
    cfg = compose_train(["features=true", f"finetune={option}"], tmp_path)
    with pytest.raises(
        ConfigError, match=rf"finetune={option} trains the backbone.*features=true.*linear_probe"
    ):
        validate_train_config(cfg)


def test_linear_probe_fits_dof_features(tmp_path):
    validate_train_config(compose_train(["features=true", "finetune=linear_probe"], tmp_path))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["finetune=frozen_stages", "backbone.trainable_stages=1"],
            r"backbone\.trainable_stages=1 and finetune=",
        ),
        (["finetune=full", "finetune.backbone_lr_ratio=0"], r"backbone_lr_ratio must be above 0"),
        (["finetune=freeze_unfreeze", "finetune.epoch=-1"], r"finetune\.epoch must be a whole number"),
        (["finetune=milestones", "finetune.epochs=[3,1]"], r"second epoch .* must come after the first"),
        (["finetune=milestones", "finetune.epochs=[3]"], r"finetune\.epochs must be two epochs"),
        (
            ["finetune=freeze_unfreeze", "+finetune.epochs=3"],
            r"unknown key 'finetune\.epochs'; did you mean 'epoch'",
        ),
        (
            ["finetune=frozen_stages", "finetune.stages=two"],
            r"'finetune\.stages' must be an integer, got 'two'",
        ),
    ],
)
def test_bad_schedule_values_are_config_errors(overrides, message, tmp_path):
    cfg = compose_train(overrides, tmp_path)
    with pytest.raises(ConfigError, match=message):
        validate_train_config(cfg)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["finetune=frozen_stages", "finetune.stages=4"],
            r"finetune\.stages=4 is out of range: the backbone has 3",
        ),
        (["finetune=milestones", "finetune.stages=3"], r"finetune\.stages=3 is out of range: .* from 1 to 2"),
        (["finetune=milestones", "finetune.stages=0"], r"finetune\.stages=0 is out of range"),
    ],
)
def test_stage_counts_out_of_range_are_config_errors(overrides, message, tmp_path):
    cfg = compose_train(overrides, tmp_path)  # checked against the backbone's stages before any work
    with pytest.raises(ConfigError, match=message):
        validate_train_config(cfg)


def test_stage_counts_are_those_of_the_chosen_backbone(tmp_path):
    overrides = ["finetune=frozen_stages", "finetune.stages=4", "backbone=resnet18", "backbone.weights=null"]
    validate_train_config(compose_train(overrides, tmp_path))  # resnet18 has 5 stages, small_cnn 3


def test_a_schedule_checks_the_model_it_trains_too(digits, tmp_path):
    """Used outside train() (no config check), the callback stops in setup, before the first batch."""
    data_dir, datamodule = digits
    cfg = compose_train([*_overrides(data_dir), "~callbacks", "~logger"], tmp_path)
    recorder = Recorder()
    trainer = instantiate(cfg.trainer, callbacks=[FrozenStages(stages=4), recorder], logger=False)
    with pytest.raises(ConfigError, match=r"finetune\.stages=4 is out of range: the backbone has 3 stages"):
        trainer.fit(build_model(cfg, datamodule), datamodule=datamodule)
    assert recorder.epochs == []


# --- the whole recipe: train(), then resuming after the unfreeze epoch ------------------------------------------------


def _scalars(run: Path, tag: str) -> dict[int, float]:
    out: dict[int, float] = {}
    for f in sorted(run.glob("tensorboard/**/events.*")):
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0}).Reload()
        if tag in acc.Tags()["scalars"]:
            out.update({e.step: e.value for e in acc.Scalars(tag)})
    return out


@pytest.mark.slow
def test_freeze_unfreeze_run_resumes_after_its_unfreeze_epoch(digits, tmp_path):
    """train() as train.py runs it (checkpoints, LR monitor, TensorBoard): run 1 unfreezes at epoch 1 and stops after
    it; run 2 resumes from its last.ckpt: the backbone must keep training, in its own group at 0.1 x the head's rate.
    In run 2 the cosine passes T_max=3, where torch zips the scheduler's base_lrs strictly against the parameter
    groups: the added group's base rate must be there, or the run crashes."""
    data_dir, _ = digits
    common = [
        *_overrides(data_dir),
        "finetune=freeze_unfreeze",
        "finetune.epoch=1",
        "scheduler.T_max=3",
        "test=false",
        "export.onnx=false",
    ]
    first = compose_train([*common, "trainer.max_epochs=2"], tmp_path / "a")
    train(first)
    last = Path(first.paths.output_dir) / "checkpoints" / "last.ckpt"
    second = compose_train([*common, "trainer.max_epochs=4", f"ckpt_path={last}"], tmp_path / "b")
    train(second)
    resumed = Path(second.paths.output_dir) / "checkpoints" / "last.ckpt"

    before, after = (torch.load(p, map_location="cpu", weights_only=True) for p in (last, resumed))
    assert (before["epoch"], after["epoch"]) == (1, 3)
    for key in ("backbone.body.block1.0.weight", "backbone.body.block1.1.running_mean"):
        assert not torch.equal(before["state_dict"][key], after["state_dict"][key]), key
    for ckpt in (before, after):
        groups = ckpt["optimizer_states"][0]["param_groups"]
        assert [(g["name"], len(g["params"])) for g in groups] == [("head", 2), ("backbone", 9)]
        assert groups[0]["lr"] > 0
        assert groups[1]["lr"] == pytest.approx(0.1 * groups[0]["lr"], rel=1e-6)
    # the LR monitor logs each group under its name; the backbone's from the unfreeze epoch
    head = _scalars(Path(first.paths.output_dir), "lr/AdamW/head")
    backbone = _scalars(Path(first.paths.output_dir), "lr/AdamW/backbone")
    (unfrozen,) = backbone.values()
    assert len(head) == 2
    assert unfrozen == pytest.approx(0.1 * head[max(head)], rel=1e-6)
    assert list(head.values()) == pytest.approx([LR, LR * 0.75], rel=1e-6)
