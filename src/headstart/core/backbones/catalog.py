"""What backbones there are: `python -m headstart.core.backbones` lists each registered backbone with its feature size,
input size, stages and parameters, and whether its pretrained weights are on this machine (so it works offline).

Nothing is downloaded and no weights are loaded: models are built on the meta device (shapes only), and the weight
caches are only looked at.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass

import torch

from headstart.core.backbones.registry import available_backbones, build_backbone, resolve
from headstart.core.backbones.timm import TIMM_PREFIX

__all__ = ["BackboneInfo", "describe_backbone", "main", "pretrained_offline"]


@dataclass
class BackboneInfo:
    name: str
    source: str  # torchvision, timm, package (efficientnet_lite0), headstart (small_cnn)
    feature_dim: int
    input_size: int  # the center crop the backbone sees (square)
    resize: int  # shorter side before the crop
    stages: int  # what backbone.trainable_stages and the finetune schedules count
    params: int
    offline: bool | None  # pretrained weights usable without network; None: it has none
    weights: str  # where the pretrained weights come from, or why there are none


def describe_backbone(name: str) -> BackboneInfo:
    """Sizes from a shape-only build of `name`, and where its pretrained weights are."""
    with torch.device("meta"):
        backbone = build_backbone(name, weights=None)
    offline, where = pretrained_offline(name)
    family, _ = resolve(name)
    return BackboneInfo(
        name=name,
        source=family.source,
        feature_dim=backbone.feature_dim,
        input_size=backbone.transform.crop,
        resize=backbone.transform.resize,
        stages=len(backbone.stages),
        params=sum(p.numel() for p in backbone.parameters()),
        offline=offline,
        weights=where,
    )


def pretrained_offline(name: str) -> tuple[bool | None, str]:
    """(whether `backbone.weights=pretrained` works without network, where the weights are or would come from).

    None first: the backbone has no pretrained weights. Each family knows where its weights live (its `offline`
    probe); caches are only looked at, nothing is fetched.
    """
    family, arch = resolve(name)
    return family.offline(name, arch)


def _rows(names: list[str]) -> list[BackboneInfo]:
    return [describe_backbone(n) for n in names]


def _print_table(rows: list[BackboneInfo], note: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title="headstart backbones (backbone=<name>, or backbone.name=<name>)", title_justify="left"
    )
    for column, justify in (
        ("name", "left"),
        ("source", "left"),
        ("features", "right"),
        ("input", "right"),
        ("stages", "right"),
        ("params", "right"),
        ("pretrained offline", "left"),
        ("weights", "left"),
    ):
        table.add_column(column, justify=justify, overflow="fold")
    for r in rows:
        offline = {True: "yes", False: "no", None: "-"}[r.offline]
        table.add_row(
            r.name,
            r.source,
            str(r.feature_dim),
            f"{r.input_size}x{r.input_size}",
            str(r.stages),
            f"{r.params / 1e6:.2f}M",
            offline,
            r.weights.split(":", 1)[0],  # the full place (path, URL) is in --json
        )
    console = Console(width=max(Console().width, 120))  # rows stay one line when piped
    console.print(table)
    console.print(note)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m headstart.core.backbones",
        description="List the registered backbones: feature size, input size, stages, parameters, and whether "
        "their pretrained weights are available offline. Nothing is downloaded.",
    )
    parser.add_argument(
        "--timm",
        metavar="PATTERN",
        help="also list timm models matching PATTERN (e.g. 'convnext_*'), as backbone=timm with "
        "backbone.name=timm:<name>; only models timm has pretrained weights for",
    )
    parser.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    args = parser.parse_args(argv)

    names = available_backbones()
    if args.timm:
        import timm

        matched = sorted({m.split(".")[0] for m in timm.list_pretrained(args.timm)})
        if not matched:
            parser.error(f"--timm {args.timm!r} matches no timm model with pretrained weights")
        names += [TIMM_PREFIX + m for m in matched]
    rows = _rows(names)
    if args.json:
        for r in rows:
            print(json.dumps(asdict(r)))
        return 0
    _print_table(
        rows,
        "Any timm model also works as backbone.name=timm:<name> (list them with --timm PATTERN). "
        "'download' means backbone.weights=pretrained fetches the weights once (then cached); "
        "efficientnet_lite0 is pretrained without network.",
    )
    return 0
