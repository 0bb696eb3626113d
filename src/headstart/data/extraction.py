"""The DoF extraction engine: run a frozen backbone once over an image DataModule and store its outputs as a DoF
set. Plain arguments only; `headstart.train.extract` reads them from a composed config.

The set lands in `<dof dir>/<dataset>/<fingerprint>/`. The fingerprint hashes everything that determines the
features and their labels (backbone identity and weights hash, cut point, input transform, augmentation policy,
number of views, dtype, the list of input files, the tasks and classes), so a complete set with the same fingerprint
is reused, and an interrupted one resumes from its finished shards. One process extracts a set at a time: another
extraction of the same set waits for it (an OS lock on `<fingerprint>.lock` beside the set) and then reuses it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

import headstart
from headstart.core.backbones import Backbone
from headstart.core.cpu_forward import inference_forward
from headstart.core.transforms import eval_transform, train_transform
from headstart.data import ImageDataModule, collate_skip_none, data_flow
from headstart.dof import DofWriter, fingerprint, open_dof
from headstart.dof.files import exclusive_lock
from headstart.dof.parts import (
    PARTS_DIR,
    DofPartWriter,
    finished_parts,
    merge_parts,
    try_lock_merge,
)
from headstart.errors import ConfigError, DataError

log = logging.getLogger(__name__)

_held_locks = threading.local()  # the sets whose extraction lock this thread holds
CUT_POINT = "pre-logits: the input of the model's last linear classifier, globally pooled"


def files_sha256(datamodule: ImageDataModule) -> str:
    """sha256 of the sample table: each row's split, path, file size and label."""
    frame = datamodule.table.frame
    h = hashlib.sha256()
    for split, path, label in zip(frame["split"], frame["path"], frame["label"], strict=True):
        size = os.path.getsize(path) if os.path.exists(path) else -1
        h.update(f"{split}\t{path}\t{size}\t{label}\n".encode())
    for task, values in sorted(getattr(datamodule.table, "targets", {}).items()):  # multi-task tables
        h.update(task.encode())
        h.update(np.ascontiguousarray(values, dtype=np.float64).tobytes())
    return h.hexdigest()


def dof_spec(
    backbone: Backbone, datamodule: ImageDataModule, augment: Sequence[Any] | None, views: int, dtype: str
) -> dict[str, Any]:
    """What determines the features and what their labels mean: the fingerprint is the hash of this."""
    return {
        "backbone": {"name": backbone.name, "weights_sha256": backbone.weights_sha256(), "cut": CUT_POINT},
        "transform": backbone.transform.to_dict(),
        "augment": list(augment or []) if views > 1 else [],
        "views": int(views),
        "dtype": str(dtype),
        "files_sha256": files_sha256(datamodule),
        "flow": json.loads(json.dumps(data_flow(datamodule))),  # as the manifest stores it
    }


class _SeededView(Dataset):
    """A view of an image dataset whose random augmentation is seeded per (view, sample): reproducible views."""

    def __init__(self, dataset: Dataset, view: int, seed: int) -> None:
        self.dataset, self.view, self.seed = dataset, view, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Any:
        torch.manual_seed(hash((self.seed, self.view, i)) & 0x7FFFFFFF)
        return self.dataset[i]


def plan_shards(
    datamodule: ImageDataModule, views: int, shard_size: int
) -> list[tuple[str, int, np.ndarray, int]]:
    """Every shard of the set, in order: (split, view, positions in the split's dataset, shard number k).

    The plan depends only on the sample table, `views` and `shard_size`, so every rank of a distributed extraction
    computes the same plan and the same shards as one process would."""
    jobs = []
    for split in ("train", "val", "test"):
        rows = datamodule.table.rows(split)
        if len(rows) == 0:
            continue
        k = 0
        for view in range(views if split == "train" else 1):
            for start in range(0, len(rows), shard_size):
                jobs.append((split, view, np.arange(start, min(start + shard_size, len(rows))), k))
                k += 1
    return jobs


def _device(device: str | torch.device | None, rank: int, world_size: int) -> torch.device:
    if device is not None:
        return torch.device(device)
    if not torch.cuda.is_available():
        return torch.device("cpu")
    if (
        world_size > 1 and torch.cuda.device_count() > 1
    ):  # one GPU per rank on a multi-GPU node (torchrun, srun)
        local = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", rank)))
        return torch.device(f"cuda:{local % torch.cuda.device_count()}")
    return torch.device("cuda")


def extract_dof(
    datamodule: ImageDataModule,
    backbone: Backbone,
    root: str | Path,
    *,
    views: int = 1,
    dtype: str = "float16",
    batch_size: int = 64,
    shard_size: int = 4096,
    num_workers: int = 2,
    seed: int = 0,
    meta: dict[str, Any] | None = None,
    config: dict[str, Any] | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    rank: int = 0,
    world_size: int = 1,
) -> Path:
    """Write a DoF set of `datamodule`'s splits through `backbone` into `root` (which names its fingerprint).

    Resumable: shards already finished under `root` are kept. Returns `root`; a complete set is left untouched.
    A single process holds the set's lock while it extracts: a second extraction of the same set waits for the first
    and then finds the set complete.

    With `world_size` > 1 this process is rank `rank` of independent processes: it writes every `world_size`-th
    shard of the plan into its own part (see `headstart.dof.parts`), and the last rank to finish merges the parts
    into the set (else `merge_dof` does). Shards, batches and seeds are those of a single-process extraction, so
    the merged set holds the same bytes.
    """
    root = Path(root)
    # ranks write their own parts at the same time on purpose (their merge has its own lock)
    lock = extraction_lock(root) if world_size == 1 else contextlib.nullcontext()
    with lock:
        if (root / "manifest.json").is_file():
            return root
        if views < 1:
            raise ValueError("views must be >= 1")
        if dtype not in ("float16", "float32"):
            raise ValueError("dtype must be float16 or float32")
        check_rank(rank, world_size)
        datamodule.setup("fit")
        device = _device(device, rank, world_size)
        backbone = backbone.to(device).eval()
        jobs = plan_shards(datamodule, views, shard_size)
        if world_size > 1:
            writer: DofWriter = DofPartWriter(
                root, meta or {}, rank, world_size, _part_plan(shard_size, batch_size)
            )
            jobs = jobs[rank::world_size]
            if not jobs:
                log.warning(
                    "rank %d of %d has no shard to extract (the set has fewer shards than ranks)",
                    rank,
                    world_size,
                )
        else:
            writer = DofWriter(root, meta or {})
        done = writer.completed_shards()
        table = datamodule.table
        eval_tf = eval_transform(backbone.transform)
        train_tf = train_transform(backbone.transform, datamodule.augment)

        todo = [j for j in jobs if (j[0], j[3]) not in done]
        total_images = sum(len(j[2]) for j in todo)
        where = root if world_size == 1 else f"{root} (rank {rank} of {world_size})"
        log.info(
            "extracting %d images (%d shards, %d already done) into %s",
            total_images,
            len(todo),
            len(done),
            where,
        )

        seconds, images = 0.0, 0
        bar = tqdm(total=total_images, unit="img", desc="extract", disable=not progress, dynamic_ncols=True)
        for split, view, positions, k in todo:
            base = datamodule.dataset(split)
            base.transform = eval_tf if view == 0 else train_tf
            dataset = Subset(_SeededView(base, view, seed) if view > 0 else base, positions.tolist())
            loader = DataLoader(
                dataset,
                batch_size=batch_size,
                num_workers=num_workers,
                collate_fn=collate_skip_none,
                pin_memory=device.type == "cuda",
            )
            start = time.perf_counter()
            features, targets, index = [], [], []
            with torch.inference_mode():
                for batch in loader:
                    if batch is None:
                        continue
                    out = inference_forward(backbone, batch["inputs"].to(device, non_blocking=True))
                    stored = out.to(getattr(torch, dtype))
                    check_finite_features(out, stored, batch["index"], table, backbone.name, dtype)
                    features.append(stored.cpu().numpy())
                    targets.append({t: v.numpy() for t, v in batch["targets"].items()})
                    index.append(batch["index"].numpy())
                    bar.update(len(batch["index"]))
            seconds += time.perf_counter() - start
            n = sum(len(i) for i in index)
            images += n
            arrays = {
                "features": np.concatenate(features)
                if features
                else np.zeros((0, backbone.feature_dim), dtype=dtype),
                "index": np.concatenate(index) if index else np.zeros(0, dtype=np.int64),
                "view": np.full(n, view, dtype=np.int16),
            }
            for task in targets[0] if targets else ["label"]:
                arrays[f"target.{task}"] = (
                    np.concatenate([t[task] for t in targets]) if targets else np.zeros(0, dtype=np.float32)
                )
            writer.write_shard(split, k, arrays)
        bar.close()

        stats = _stats(
            table, backbone.feature_dim, dtype, views, images, seconds, device, num_workers, config
        )
        if world_size == 1:
            writer.finalize(stats)
            return root
        assert isinstance(writer, DofPartWriter)
        spec = (meta or {}).get("fingerprint_spec")
        if (
            todo or not (writer.root / "part.json").is_file()
        ):  # a finished part keeps the stats of its real run
            writer.finish_part(
                [(j[0], j[3]) for j in jobs], {**stats, "rank": rank, "fingerprint_spec": spec}
            )
        if len(finished_parts(root, world_size)) == world_size:  # the last rank to finish merges
            if try_lock_merge(root):
                log.info("rank %d finished last: merging the %d parts of %s", rank, world_size, root)
                _merge_locked(
                    datamodule, root, meta or {}, world_size, views, shard_size, batch_size, config, rank
                )
            else:
                log.info("rank %d finished; another rank is merging %s", rank, root)
        else:
            waiting = sorted(set(range(world_size)) - set(finished_parts(root, world_size)))
            log.info(
                "rank %d of %d finished; waiting for rank(s) %s: the last rank merges the set (or run extract.py with "
                "the same overrides and extract.merge=true once all ranks are done)",
                rank,
                world_size,
                waiting,
            )
        return root


@contextlib.contextmanager
def extraction_lock(root: Path) -> Iterator[None]:
    """Exclusive right to extract the set at `root`, held until the block ends (or the process dies).

    The lock is the file `<root>.lock` beside the set, never inside it (a complete set is exactly its manifest and
    shards); it is deleted on release. A thread that holds it already (find_or_extract, then extract_dof) goes on."""
    key = os.path.abspath(root)
    held = _held_locks.__dict__.setdefault("paths", set())
    if key in held:
        yield
        return
    root.parent.mkdir(parents=True, exist_ok=True)

    def waiting(holder: str) -> None:
        log.info(
            "waiting for another extraction of the DoF set %s (%s) to finish; it is reused then", root, holder
        )

    with exclusive_lock(root.with_name(root.name + ".lock"), on_wait=waiting):
        held.add(key)
        try:
            yield
        finally:
            held.discard(key)


def check_finite_features(
    out: torch.Tensor, stored: torch.Tensor, index: torch.Tensor, table: Any, backbone: str, dtype: str
) -> None:
    """A DataError naming the image files whose features are NaN or inf, from the backbone (`out`) or from the cast
    to the stored dtype (`stored`: float16 overflows beyond 65504). DoF sets hold finite features only."""
    for what, features in (("backbone", out), ("cast", stored)):
        bad = ~torch.isfinite(features.flatten(1)).all(dim=1)
        if not bad.any():
            continue
        rows = index[bad.cpu()].tolist()
        files = [str(table.frame["path"].iloc[i]) for i in rows[:5]]
        shown = ", ".join(files) + (f" and {len(rows) - 5} more" if len(rows) > 5 else "")
        if what == "backbone":
            raise DataError(
                f"backbone '{backbone}' gives NaN or inf features for {len(rows)} image(s): {shown}. Nothing of "
                "them was stored (DoF sets hold finite features only): check the backbone's weights "
                "(backbone.weights) and these images"
            )
        raise DataError(
            f"the features of {len(rows)} image(s) exceed the range of {dtype} (|x| > "
            f"{torch.finfo(getattr(torch, dtype)).max:g}): {shown}. Nothing of them was stored (DoF sets hold "
            "finite features only): extract with extract.dtype=float32"
        )


def _stats(
    table: Any,
    feature_dim: int,
    dtype: str,
    views: int,
    images: int,
    seconds: float,
    device: torch.device | str,
    num_workers: int,
    config: dict[str, Any] | None,
) -> dict[str, Any]:
    image_bytes = [os.path.getsize(p) for p in table.frame["path"]]
    stats = {
        "images_this_run": images,
        "seconds_this_run": round(seconds, 3),
        "images_per_second": round(images / seconds, 2) if seconds else None,
        "image_count": len(table.frame),
        "image_bytes_mean": float(np.mean(image_bytes)) if image_bytes else 0.0,
        "feature_bytes_per_sample": feature_dim * np.dtype(dtype).itemsize,
        "views": views,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "num_workers": num_workers,
        "machine": platform.machine(),
        "config": config,
    }
    # HNCT: the backbone's cost of one epoch over the images, decoding included (one view of every sample).
    if images and seconds:
        stats["hnct_seconds_per_epoch"] = round(seconds / images * len(table.frame), 4)
    return stats


# --- distributed extraction: independent ranks, each writing a part; one merge ----------------------------------


def check_rank(rank: Any, world_size: Any) -> None:
    """A ConfigError naming the fix when `rank`/`world_size` are not a valid rank of a world."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ConfigError(
            f"extract.world_size={world_size!r} is invalid: give the number of extraction processes (an integer "
            ">= 1; 1 extracts in this process alone)"
        )
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ConfigError(
            f"extract.rank={rank!r} is out of range for extract.world_size={world_size}: ranks are "
            f"0..{world_size - 1} (with a SLURM array, use --array=0-{world_size - 1} and "
            "extract.rank=${oc.env:SLURM_ARRAY_TASK_ID})"
        )


def _part_plan(shard_size: int, batch_size: int) -> dict[str, int]:
    """What every rank and the merge must agree on beyond the fingerprint (both shape the shards' bytes)."""
    return {"shard_size": int(shard_size), "batch_size": int(batch_size)}


def _merged_stats(parts: dict[int, dict[str, Any]], config: dict[str, Any] | None) -> dict[str, Any]:
    ranks = [dict(parts[r].get("stats") or {}, rank=r) for r in sorted(parts)]
    first = ranks[0]
    images = sum(int(s.get("images_this_run") or 0) for s in ranks)
    seconds = sum(float(s.get("seconds_this_run") or 0.0) for s in ranks)
    wall = max(float(s.get("seconds_this_run") or 0.0) for s in ranks)
    stats = {
        "images_this_run": images,
        "seconds_this_run": round(seconds, 3),  # summed over ranks: the compute, not the wall time
        "images_per_second": round(images / seconds, 2) if seconds else None,
        "images_per_second_all_ranks": round(images / wall, 2) if wall else None,
        **{k: first.get(k) for k in ("image_count", "image_bytes_mean", "feature_bytes_per_sample", "views")},
        "device": first.get("device"),
        "torch_threads": first.get("torch_threads"),
        "num_workers": first.get("num_workers"),
        "machine": first.get("machine"),
        "config": config,
        "distributed": {
            "world_size": len(ranks),
            "ranks": [
                {k: s.get(k) for k in ("rank", "images_this_run", "seconds_this_run", "device", "machine")}
                for s in ranks
            ],
        },
    }
    if images and seconds:
        stats["hnct_seconds_per_epoch"] = round(seconds / images * int(first.get("image_count") or 0), 4)
    return stats


def _rerun_hint(root: Path, world_size: int, missing: list[int], here: dict | None) -> str:
    """How to finish the missing ranks; names a part found under another fingerprint (a rank run with another
    config) and what differs from `here` (this config's fingerprint spec)."""
    hints = []
    for rank in missing:
        for other in sorted(root.parent.glob(f"*/{PARTS_DIR}/rank-{rank}-of-{world_size}/part.json")):
            if other.parents[2] == root:
                continue
            try:
                spec = json.loads(other.read_text())["stats"]["fingerprint_spec"]
            except (OSError, ValueError, KeyError, TypeError):
                spec = None
            diff = sorted(
                k for k in set(spec or {}) | set(here or {}) if (spec or {}).get(k) != (here or {}).get(k)
            )
            hints.append(
                f"rank {rank}'s part was found under {other.parents[2]}, a set made with another config"
                + (f" (it differs in {diff})" if diff and here else "")
            )
    fix = (
        f"run extract.py with exactly the same overrides plus extract.rank=R extract.world_size={world_size} for "
        f"R in {missing}"
    )
    return "; ".join([*hints, fix]) if hints else fix


def _merge_locked(
    datamodule: ImageDataModule,
    root: Path,
    meta: dict[str, Any],
    world_size: int,
    views: int,
    shard_size: int,
    batch_size: int,
    config: dict[str, Any] | None,
    rank: int | None,
) -> Path:
    """Merge the parts of `root` while holding its merge lock (released on failure; deleted with the parts)."""
    lock = root / PARTS_DIR / "merge.lock"
    try:
        expected = [(j[0], j[3]) for j in plan_shards(datamodule, views, shard_size)]
        merge_parts(
            root,
            meta,
            world_size,
            _part_plan(shard_size, batch_size),
            expected,
            stats=lambda parts: _merged_stats(parts, config),
            rerun_hint=lambda missing: _rerun_hint(root, world_size, missing, meta.get("fingerprint_spec")),
        )
    except BaseException:
        lock.unlink(missing_ok=True)
        raise
    log.info("merged %d parts into %s", world_size, root)
    return root


def manifest_meta(backbone: Backbone, datamodule: ImageDataModule, spec: dict) -> dict:
    """Everything the manifest says beyond the shards: provenance, transform, tasks, the sample table.

    Only what determines the set goes here (a resumed extraction must produce the same meta); the run's resolved
    config and timings go into the manifest's stats.
    """
    import timm
    import torchvision

    frame = datamodule.table.frame
    return {
        "tool": {"name": "headstart", "version": headstart.__version__},
        "fingerprint": fingerprint(spec),
        "fingerprint_spec": spec,
        "backbone": {
            **spec["backbone"],
            "libraries": {
                "torch": torch.__version__,
                "torchvision": torchvision.__version__,
                "timm": timm.__version__,
            },
        },
        "transform": spec["transform"],
        "augment": spec["augment"],
        "views": spec["views"],
        "flow": spec["flow"],
        "samples": {
            "path": [str(p) for p in frame["path"]],
            "split": [str(s) for s in frame["split"]],
            "label": [None if np.isnan(v) else float(v) for v in frame["label"]],
            "class_folders": in_class_folders(frame["path"], frame["label"], datamodule.table.classes),
        },
    }


def in_class_folders(paths: Sequence[str], labels: Sequence[float], classes: Sequence[str]) -> bool:
    """Whether every labelled file lies in a folder named after its class (a folder data set). The DoF reader then
    checks that this still holds, so a class list reordered in the manifest cannot relabel the samples."""
    labelled = [(p, v) for p, v in zip(paths, labels, strict=True) if not np.isnan(v)]
    return bool(labelled) and all(
        os.path.basename(os.path.dirname(str(p))) == str(classes[int(v)]) for p, v in labelled
    )


def find_or_extract(
    datamodule: ImageDataModule,
    backbone: Backbone,
    dof_dir: str | Path,
    dataset: str,
    *,
    views: int = 1,
    dtype: str = "float16",
    augment_policy: Sequence[Any] | None = None,
    config: dict | None = None,
    merge: bool = False,
    **kwargs: Any,
) -> tuple[Path, bool]:
    """The set for this data and backbone: reused when complete, else extracted (or resumed). -> (path, reused).

    With `world_size` > 1 in `kwargs` this process extracts only its rank's part (the set is complete when the
    last rank has merged); `merge=True` extracts nothing and merges the finished parts of `world_size` ranks.
    """
    if getattr(datamodule, "folds", None) is not None:
        raise ConfigError(
            "extract from the data without cross-validation folds (folds=None): a set stores the train+val pool "
            "once, and FeatureDataModule(folds=k, fold=i) deals it into folds"
        )
    datamodule.setup("fit")
    spec = dof_spec(backbone, datamodule, augment_policy, views, dtype)
    root = Path(dof_dir) / dataset / fingerprint(spec)
    if (root / "manifest.json").is_file():
        open_dof(root)  # sizes checked: a damaged set is an error, not a silent reuse
        log.info("reusing DoF set %s", root)
        return root, True
    meta = manifest_meta(backbone, datamodule, spec)
    if merge:
        world_size = kwargs.get("world_size", 1)
        if world_size < 2:
            raise ConfigError(
                "extract.merge=true merges the parts of a distributed extraction: give the same "
                "extract.world_size=N (N > 1) and overrides the ranks ran with"
            )
        if (root / PARTS_DIR).is_dir() and not try_lock_merge(root):
            lock = root / PARTS_DIR / "merge.lock"
            raise DataError(
                f"another process is merging {root} (lock {lock}): wait for it; if no merge is running (it was "
                f"killed), delete {lock} and merge again"
            )
        args = (views, kwargs.get("shard_size", 4096), kwargs.get("batch_size", 64))
        _merge_locked(datamodule, root, meta, world_size, *args, config, None)
        return root, False
    lock = extraction_lock(root) if kwargs.get("world_size", 1) == 1 else contextlib.nullcontext()
    with lock:
        if (root / "manifest.json").is_file():  # another process extracted it while this one waited
            open_dof(root)
            log.info("reusing DoF set %s, extracted by another process meanwhile", root)
            return root, True
        extract_dof(datamodule, backbone, root, views=views, dtype=dtype, meta=meta, config=config, **kwargs)
    return root, False
