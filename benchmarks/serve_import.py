"""Import cost of serving: `import headstart.serve; headstart.serve.Predictor` now, against the same before the
layers and issue #17 part 5 (commit 866485d: `import headstart.predictor; headstart.predictor.Predictor`).

    git worktree add /tmp/wt-before 866485d      # once: the tree before
    .venv/bin/python benchmarks/serve_import.py [--before /tmp/wt-before/src] [--reps 7]

Each measurement is a fresh interpreter (caches of the previous one cannot help), run --reps times alternating the
sides; printed are medians of the import time (wall clock, perf_counter around the import) and of the peak resident
memory of the process (ru_maxrss, so the interpreter's own is included: a bare `python -c pass` is printed for
reference), the number of modules loaded and whether torch was among them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, resource, sys, time
t = time.perf_counter()
{statement}
dt = time.perf_counter() - t
print(json.dumps({{"s": dt, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "modules": len(sys.modules), "torch": "torch" in sys.modules}}))
"""


def measure(src: Path | None, statement: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if src is not None:
        env["PYTHONPATH"] = str(src)
    out = subprocess.run(
        [sys.executable, "-c", CHILD.format(statement=statement)],
        env=env,
        cwd="/",  # not a source tree: only PYTHONPATH decides which headstart is imported
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--before", type=Path, default=Path("/tmp/wt-before/src"), help="src/ of commit 866485d"
    )
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    if not (args.before / "headstart" / "predictor.py").is_file():
        sys.exit(
            f"{args.before} is not the src/ of the tree before (git worktree add /tmp/wt-before 866485d)"
        )
    sides = {
        "python -c pass": (None, "pass"),
        "before: headstart.predictor.Predictor": (
            args.before,
            "import headstart.predictor; headstart.predictor.Predictor",
        ),
        "now:    headstart.serve.Predictor": (
            ROOT / "src",
            "import headstart.serve; headstart.serve.Predictor",
        ),
    }
    runs: dict[str, list[dict]] = {name: [] for name in sides}
    for _ in range(args.reps):
        for name, (src, statement) in sides.items():
            runs[name].append(measure(src, statement))
    print(
        f"{'':40s} {'import s':>9s} {'peak RSS MB':>12s} {'modules':>8s}  torch   (median of {args.reps} fresh processes)"
    )
    medians = {}
    for name, rows in runs.items():
        med = {k: statistics.median(r[k] for r in rows) for k in ("s", "rss_mb", "modules")}
        medians[name] = med
        print(f"{name:40s} {med['s']:9.3f} {med['rss_mb']:12.1f} {med['modules']:8.0f}  {rows[0]['torch']}")
    before, now = (
        medians["before: headstart.predictor.Predictor"],
        medians["now:    headstart.serve.Predictor"],
    )
    print(
        f"now / before: import time {now['s'] / before['s']:.2f}x, peak RSS {now['rss_mb'] / before['rss_mb']:.2f}x "
        f"({before['s'] / now['s']:.1f}x faster, {before['rss_mb'] - now['rss_mb']:.0f} MB less)"
    )


if __name__ == "__main__":
    main()
