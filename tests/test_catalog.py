"""`python -m headstart.core.backbones`: the backbone catalog, its sizes and where pretrained weights are."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_script

from headstart.core.backbones import available_backbones, build_backbone
from headstart.core.backbones.catalog import describe_backbone, pretrained_offline


def test_catalog_lists_every_backbone_with_sizes_and_offline_weights() -> None:
    result = run_script(["-m", "headstart.core.backbones", "--json"], cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = {r["name"]: r for r in map(json.loads, result.stdout.splitlines())}
    assert sorted(rows) == available_backbones()
    lite0 = rows["efficientnet_lite0"]
    assert (lite0["feature_dim"], lite0["input_size"], lite0["offline"]) == (1280, 224, True)
    assert rows["small_cnn"]["offline"] is None and rows["small_cnn"]["input_size"] == 32
    assert rows["efficientnet_b2"]["input_size"] == 288
    # the shape-only build reports what a real build has
    real = build_backbone("resnet18", weights=None)
    assert rows["resnet18"]["feature_dim"] == real.feature_dim == 512
    assert rows["resnet18"]["params"] == sum(p.numel() for p in real.parameters())
    assert rows["resnet18"]["stages"] == len(real.stages)


def test_table_output_names_the_backbones() -> None:
    result = run_script(["-m", "headstart.core.backbones"], cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    for name in ("efficientnet_lite0", "resnet18", "small_cnn"):
        assert name in result.stdout
    assert "timm:<name>" in result.stdout


def test_torchvision_weights_are_offline_once_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    offline, where = pretrained_offline("resnet18")
    assert offline is False and where.startswith("download (45 MB)")
    url = where.split(": ", 1)[1]
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"")
    assert pretrained_offline("resnet18") == (True, f"cached: {cached}")


def test_timm_models_are_described_without_weights() -> None:
    info = describe_backbone("timm:convnext_atto")
    assert (info.source, info.feature_dim, info.input_size) == ("timm", 320, 224)
    assert info.offline in (
        True,
        False,
    )  # depends on this machine's cache; never None: timm has weights for it


def test_unknown_timm_pattern_is_a_clear_error() -> None:
    result = run_script(
        ["-m", "headstart.core.backbones", "--timm", "no_such_model_*"], cwd=ROOT, timeout=300
    )
    assert result.returncode == 2
    assert "matches no timm model" in result.stderr
