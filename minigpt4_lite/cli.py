"""The command line: `python -m minigpt4_lite {info,demo,train,eval,chat,build-assets} ...`.

Only the CLI prints. Errors a user can cause (`MiniGPT4Error`) become one line on stderr and exit
code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from .errors import MiniGPT4Error


def cmd_info(args) -> int:
    """Build the preset on the meta device (no download, no memory) and count parameters."""
    from .checkpoints import build_meta
    from .config import preset

    counts = build_meta(preset(args.preset)).param_counts()
    if args.json:
        print(json.dumps(counts))
    else:
        print(f"MiniGPT-4 preset {args.preset!r} (built on the meta device):")
        for key, value in counts.items():
            print(f"  {key:<18} {value:>15,}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .config import PRESETS

    parser = argparse.ArgumentParser(prog="python -m minigpt4_lite", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="parameter counts of a preset (meta device, no download)")
    p.add_argument("--preset", default="minigpt4-7b", choices=PRESETS)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_info)

    for add in _EXTRA_COMMANDS:
        add(sub)
    return parser


_EXTRA_COMMANDS: list = []  # filled by the modules that add subcommands (see below)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except MiniGPT4Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
