"""The DoF benefit: what training on stored features saves, from measured costs (the DoF paper's formulas).

HNCT  the backbone's cost of one epoch over the images, decoding included (seconds)
HOLT  loading the stored features for one epoch (seconds)
TNCT  the head's training cost of one epoch (seconds)
EC    the number of epochs
IS, IC, HOS, DIS  image bytes (mean), image count, feature bytes per sample, manifest bytes
"""

from __future__ import annotations


def dof_benefit(
    hnct: float,
    holt: float,
    tnct: float,
    epochs: int,
    image_bytes: float,
    image_count: int,
    feature_bytes: float,
    manifest_bytes: int,
    views: int = 1,
) -> dict[str, float]:
    """The four figures, plus the inputs, as `dof/<name>` metrics.

    With K views the extraction pass itself costs K * HNCT; the saved time counts that cost.
    """
    extraction = views * hnct
    saved_time = (hnct - holt) * epochs - extraction
    ratio = (tnct + holt) / (hnct + tnct)
    total_ratio = ((tnct + holt) * (epochs - 1) + (hnct + tnct)) / ((hnct + tnct) * epochs)
    saved_space = image_bytes * image_count - feature_bytes * image_count * views - manifest_bytes
    return {
        "dof/hnct_s": hnct,
        "dof/holt_s": holt,
        "dof/tnct_s": tnct,
        "dof/epochs": float(epochs),
        "dof/views": float(views),
        "dof/total_saved_time_s": saved_time,
        "dof/benefit_ratio": ratio,
        "dof/total_benefit_ratio": total_ratio,
        "dof/total_saved_space_bytes": saved_space,
    }


def describe_benefit(b: dict[str, float]) -> str:
    """The formulas with the measured numbers, for people."""
    e, k = int(b["dof/epochs"]), int(b["dof/views"])
    h, o, t = b["dof/hnct_s"], b["dof/holt_s"], b["dof/tnct_s"]
    lines = [
        f"DoF benefit over {e} epochs (HNCT {h:.3f} s, HOLT {o:.5f} s, TNCT {t:.5f} s per epoch):",
        f"  total saved time     (HNCT - HOLT) * EC - {k} * HNCT = {b['dof/total_saved_time_s']:.2f} s",
        f"  benefit ratio        (TNCT + HOLT) / (HNCT + TNCT) = {b['dof/benefit_ratio']:.2e}"
        f"  (an epoch on features costs {b['dof/benefit_ratio']:.2e} of one on images)",
        f"  total benefit ratio  ((TNCT + HOLT)(EC - 1) + (HNCT + TNCT)) / ((HNCT + TNCT) EC)"
        f" = {b['dof/total_benefit_ratio']:.4f}",
        f"  total saved space    IS * IC - HOS * IC * K - DIS = {b['dof/total_saved_space_bytes'] / 1e6:.2f} MB",
    ]
    if k > 1:
        lines.append(f"  (with {k} views the extraction pass cost {k} * HNCT)")
    return "\n".join(lines)
