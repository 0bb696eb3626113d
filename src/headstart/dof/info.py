"""The descriptive fields of a DoF set (name, description, license, source): the one part of a manifest meant to be
edited. They live in the manifest's ``info`` object, outside every fingerprint, so rewriting them keeps the set
verifiable; everything else in the manifest is checked against the set's fingerprints and shards when it is opened.
"""

from __future__ import annotations

import json
from pathlib import Path

from headstart.dof.files import atomic_write_text
from headstart.dof.format import INFO_FIELDS, MANIFEST_NAME, DofError, check_info, to_json
from headstart.dof.reader import open_dof


def describe(path: str | Path, **fields: str | None) -> dict[str, str]:
    """Set descriptive fields of the complete DoF set at ``path``; returns its ``info`` afterwards.

    ``fields`` are ``name``, ``description``, ``license`` and ``source``: a string sets the field, ``""`` removes it,
    None leaves it as it is. The set is opened (and so checked) first, so that describing never blesses a set
    whose manifest was edited otherwise, and ``manifest.json`` is rewritten atomically with nothing else changed.
    """
    unknown = sorted(set(fields) - set(INFO_FIELDS))
    if unknown:
        raise DofError(f"DoF sets have no descriptive field(s) {unknown}: the fields are {list(INFO_FIELDS)}")
    given = {key: value for key, value in fields.items() if value is not None}
    check_info(given)
    root = Path(path)
    dof = open_dof(root)
    if not given:
        return check_info(dof.manifest.get("info", {}))
    manifest = dict(dof.manifest)
    info = {**check_info(manifest.get("info", {})), **given}
    manifest["info"] = check_info({key: value for key, value in info.items() if value != ""})
    atomic_write_text(root / MANIFEST_NAME, to_json(manifest, "DoF manifest"))
    return dict(open_dof(root).manifest["info"])


def info_text(info: dict[str, str]) -> str:
    """The info object as indented JSON, as the command prints it."""
    return json.dumps(info, indent=1, ensure_ascii=False)
