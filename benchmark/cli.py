"""`python -m benchmark <command>` / `tumorbench <command>`."""
from __future__ import annotations

import argparse
import sys

from . import intake


def _check_data(args) -> int:
    try:
        dataset = intake.load_dataset(args.data, skip_bad=args.skip_bad)
    except intake.DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"data set:    {dataset.name}")
    print(f"root:        {dataset.root}")
    print(f"layout:      {dataset.layout}")
    print(f"fingerprint: {dataset.fingerprint}")
    print(f"classes:     {len(dataset.class_names)} ({', '.join(dataset.class_names)}; index = position)")
    for split_name, samples in dataset.splits.items():
        counts = ", ".join(f"{name} {n}" for name, n in dataset.counts(split_name).items())
        print(f"  {split_name:<6} {len(samples):>6} images: {counts}")
    sizes = ", ".join(f"{w}x{h} ({n})" for (w, h), n in dataset.sizes.most_common(5))
    more = f" and {len(dataset.sizes) - 5} more" if len(dataset.sizes) > 5 else ""
    print(f"sizes:       {len(dataset.sizes)} distinct: {sizes}{more}")
    print(f"modes:       {', '.join(f'{m} ({n})' for m, n in dataset.modes.most_common())}")
    print(f"problems:    {len(dataset.skipped)} bad file(s) skipped, {len(dataset.ignored)} non-image file(s) ignored")
    for problem in dataset.skipped:
        print(f"  skipped {problem}")
    for path in dataset.ignored:
        print(f"  ignored {path}: not an image file extension")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tumorbench", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    check = commands.add_parser("check-data", help="read a data set and report its layout and problems")
    check.add_argument("data", help="folder of class folders (or splits), or an .npz file")
    check.add_argument("--skip-bad", action="store_true", help="leave unreadable files out instead of failing")
    check.set_defaults(run=_check_data)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)
