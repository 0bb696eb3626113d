"""Built-in data set: synthetic 64x64 home-camera scenes with conditional, partial labels (no download).

Each scene answers the questions of `SECURITY_FLOW`: is the camera blocked; if not, is the door open; if closed, is
it locked; if open, is a person there; if so, where is the face (left x of the head square), which colour is the
shirt, which of the R, G, B channels are on in the face. The cues are large and clean so that a small CNN trained
from scratch learns every task:

- blocked: the whole image is dark grey noise (no wall, no door);
- door: a big frame in the middle of a light wall (lit from the right: brighter to the right, so the wall beside
  the head also says where it is, which a globally pooled CNN needs for face_x1); closed = a brown panel, open = a dark slate gap with the panel swung
  to a thin strip at the frame's left edge;
- lock (closed doors only): a bright yellow bolt on the panel when locked, a small grey handle when not;
- person (open doors only): a 14x14 head square at x = face_x1 (pixels, 0..50), its colour the multi-hot R, G, B
  of face_colour (at least one channel on), above a 20-pixel-wide shirt block in one of 7 colours.

Written once as `root/images/NNNNN.png` plus `root/samples.csv` (path, split, one column per leaf path), so it goes
through exactly the same table reader as user data. Labels that do not apply to a scene (by its true state) are
empty; in addition about 10% of the applicable labels other than camera_blocked are left empty at random, to
exercise partial labels. A child's label is kept when only its parent's label was dropped (the annotator skipped
one question): the flow then does not train the child on that sample, because its condition is unknown.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from headstart.data.building import MARKER, build_once
from headstart.data.samples import stratified_split
from headstart.data.table import MultiTaskTable, TableDataModule, leaf_specs
from headstart.errors import DataError

SIZE = 64
HEAD = 14
FACE_X1_MAX = SIZE - HEAD
SHIRT_COLOURS: dict[str, tuple[int, int, int]] = {
    "blue": (0, 0, 255),
    "red": (255, 0, 0),
    "yellow": (255, 255, 0),
    "cyan": (0, 255, 255),
    "magenta": (255, 0, 255),
    "green": (0, 255, 0),
    "black": (0, 0, 0),
}
FACE_CHANNELS = ("red", "green", "blue")

SECURITY_FLOW: dict[str, Any] = {
    "tasks": {
        "camera_blocked": {"kind": "binary"},
        "door_open": {"kind": "binary", "given": "~camera_blocked"},
        "door_locked": {"kind": "binary", "given": "~door_open"},
        "person_present": {"kind": "binary", "given": "door_open"},
        "person": {
            "given": "person_present",
            "tasks": {
                "face_x1": {"kind": "bounded_regression", "scale": SIZE},
                "shirt": {"kind": "multiclass", "classes": list(SHIRT_COLOURS)},
                "face_colour": {"kind": "multilabel", "classes": list(FACE_CHANNELS)},
            },
        },
    }
}
LEAF_PATHS: list[str] = [x.path for x in leaf_specs(SECURITY_FLOW)]

P_BLOCKED = 0.12
P_OPEN = 0.55
P_LOCKED = 0.5
P_PERSON = 0.7
P_MISSING = 0.1


def _scene(rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any], int]:
    """One scene: uint8[64, 64, 3], its full true labels ({} entries for what does not apply) and a stratum key."""
    if rng.random() < P_BLOCKED:
        level = rng.uniform(25, 70)
        img = level + rng.normal(0, 6, (SIZE, SIZE, 1)) + rng.normal(0, 2, (SIZE, SIZE, 3))
        return np.clip(img, 0, 255).astype(np.uint8), {"camera_blocked": 1}, 0

    labels: dict[str, Any] = {"camera_blocked": 0}
    img = np.empty((SIZE, SIZE, 3), dtype=np.float64)
    img[:] = np.array([200, 195, 180]) + rng.uniform(-12, 12, 3)  # wall
    img[:54] += np.linspace(-30, 30, SIZE)[None, :, None]  # light from the right: the wall tells x apart
    img[54:] = np.array([120, 110, 100]) + rng.uniform(-8, 8, 3)  # floor
    dx = int(rng.integers(-3, 4))
    x0, x1, y0, y1 = 18 + dx, 46 + dx, 6, 56  # door frame (outer)
    img[y0:y1, x0:x1] = (90, 60, 30)
    ix0, ix1, iy0 = x0 + 2, x1 - 2, y0 + 2  # inside the frame
    door_open = rng.random() < P_OPEN
    labels["door_open"] = int(door_open)
    if not door_open:
        img[iy0:y1, ix0:ix1] = (150, 100, 50)
        locked = rng.random() < P_LOCKED
        labels["door_locked"] = int(locked)
        if locked:
            img[27:35, ix1 - 9 : ix1 - 2] = (255, 230, 0)  # bright bolt
        else:
            img[30:33, ix1 - 6 : ix1 - 3] = (70, 70, 70)  # small plain handle
        key = 1 + int(locked)
    else:
        img[iy0:y1, ix0:ix1] = (70, 80, 100)  # dark slate gap (not black: black is a shirt colour)
        img[iy0:y1, ix0 : ix0 + 4] = (150, 100, 50)  # the panel, swung open
        person = rng.random() < P_PERSON
        labels["person_present"] = int(person)
        key = 3 + int(person)
        if person:
            fx = int(rng.integers(0, FACE_X1_MAX + 1))
            bits = np.zeros(3, dtype=np.int64)
            while not bits.any():
                bits = rng.integers(0, 2, 3)
            shirt = str(rng.choice(list(SHIRT_COLOURS)))
            sx0, sx1 = max(0, fx + HEAD // 2 - 10), min(SIZE, fx + HEAD // 2 + 10)
            img[27:52, sx0:sx1] = SHIRT_COLOURS[shirt]
            img[10 : 10 + HEAD, fx : fx + HEAD] = bits * 255
            labels["person.face_x1"] = fx
            labels["person.shirt"] = shirt
            labels["person.face_colour"] = ",".join(c for c, b in zip(FACE_CHANNELS, bits, strict=True) if b)
    img += rng.normal(0, 3, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), labels, key


def _write_security(folder: Path, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True)
    rows: list[dict[str, str]] = []
    keys = np.empty(n, dtype=np.float64)
    for i in range(n):
        img, labels, keys[i] = _scene(rng)
        name = f"images/{i:05d}.png"
        Image.fromarray(img).save(folder / name)
        row = {"path": name}
        for path in LEAF_PATHS:
            applies = path in labels
            dropped = path != "camera_blocked" and applies and rng.random() < P_MISSING
            row[path] = str(labels[path]) if applies and not dropped else ""
        rows.append(row)
    splits = stratified_split(keys, 0.1, 0.1, seed=seed)  # 80/10/10 within each scene type
    frame = pd.DataFrame(rows)
    frame.insert(1, "split", splits)
    frame.to_csv(folder / "samples.csv", index=False)
    (folder / MARKER).write_text(json.dumps({"n": n, "seed": seed}) + "\n")  # last: marks the set complete


def make_security(root: str | os.PathLike, n: int = 1200, seed: int = 0) -> Path:
    """Write `n` scenes and `root/samples.csv` (deterministic for `seed`), once; returns the absolute root.

    Atomic: written into a temporary folder beside `root`, then renamed; the marker `root/.complete` (holding n
    and seed) is written last. Safe to call twice, also concurrently. A complete set made with another n or seed
    is an error rather than silently reused.
    """
    n, seed = int(n), int(seed)
    if n < 10:
        raise DataError(f"make_security needs n >= 10 scenes (for train/val/test splits), got n={n}.")
    root = Path(root).expanduser().absolute()
    if not (root / MARKER).is_file():
        build_once(root, lambda tmp: _write_security(tmp, n, seed), "security data set")
    _check_marker(root, n, seed)
    return root


def _check_marker(root: Path, n: int, seed: int) -> None:
    try:
        made = json.loads((root / MARKER).read_text())
    except (OSError, ValueError):
        made = {}
    if made.get("n") != n or made.get("seed") != seed:
        raise DataError(
            f"{root} holds a security data set made with {made or 'unknown settings'}, not n={n}, seed={seed}. "
            "Delete the folder to rebuild it, or set data.root=... to another folder."
        )


class SecurityDataModule(TableDataModule):
    """The synthetic home-camera scenes under `root` as a multi-task table (materialized by `prepare_data`).

    `csv` and `flow` default to the generated table and SECURITY_FLOW; setting `csv` trains on another table
    (nothing is generated then), so an experiment built on this module also runs a user's table and flow.
    """

    def __init__(
        self,
        root: str = "data/security",
        n: int = 1200,
        seed: int = 0,
        csv: str | None = None,
        flow: dict | None = None,
        split_column: str | None = "split",
        **common: Any,
    ) -> None:
        self.generated = csv is None
        csv = str(Path(root) / "samples.csv") if csv is None else csv
        super().__init__(
            csv=csv, flow=SECURITY_FLOW if flow is None else flow, split_column=split_column, **common
        )
        self.data_root = str(root)
        self.n = int(n)
        self.seed = int(seed)

    def prepare_data(self) -> None:
        if self.generated:
            make_security(self.data_root, self.n, self.seed)

    def _build_table(self) -> MultiTaskTable:
        self.prepare_data()  # no-op when prepare_data ran; covers direct setup() calls
        return super()._build_table()
