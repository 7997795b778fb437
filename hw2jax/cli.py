"""The `hw2jax` command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence


def _theory(args: argparse.Namespace) -> int:
    from hw2jax import theory

    report = theory.run_all(lengths=args.lengths)
    print(json.dumps(report, indent=2) if args.json else theory.format_report(report))
    return 0


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"lengths must be positive, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hw2jax", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    theory = commands.add_parser(
        "theory", help="show the RNN recurrence, the self-attention copy and linear attention"
    )
    theory.add_argument("--json", action="store_true", help="print machine-readable JSON")
    theory.add_argument(
        "--lengths",
        type=_int_list,
        default=(256, 1024, 4096),
        help="comma-separated sequence lengths to time (default: 256,1024,4096)",
    )
    theory.set_defaults(func=_theory)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
