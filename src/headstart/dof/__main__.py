"""``python -m headstart.dof describe PATH --name ... --description ... --license ... --source ...``.

Sets the descriptive fields of a DoF set (an empty value removes a field) and prints them; without options it
prints them only. Everything else in a set's manifest is covered by its fingerprints: edit it by hand and the set
is refused until it is extracted again.
"""

from __future__ import annotations

import argparse
import sys

from headstart.dof.format import INFO_FIELDS, DofError
from headstart.dof.info import describe, info_text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m headstart.dof", description="Tools for DoF feature sets."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    cmd = commands.add_parser(
        "describe",
        help="set the descriptive fields of a DoF set (name, description, license, source)",
        description="Set the descriptive fields of a DoF set and print them; an empty value removes a field. "
        "The set stays verifiable: these fields are outside its fingerprints.",
    )
    cmd.add_argument("path", help="the set's directory (the one holding manifest.json)")
    for field in INFO_FIELDS:
        cmd.add_argument(f"--{field}", default=None, help=f"the set's {field}")
    args = parser.parse_args(argv)
    try:
        info = describe(args.path, **{field: getattr(args, field) for field in INFO_FIELDS})
    except DofError as e:
        print(f"headstart.dof: error: {e}", file=sys.stderr)
        return 2
    print(info_text(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
