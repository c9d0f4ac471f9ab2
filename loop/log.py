"""`din log VERB`: the impression log's offline jobs (today `export`), each in its own module."""

from __future__ import annotations

import argparse
import importlib

# verb -> (module, one-line help). Each module defines add_arguments(parser) and run(args) -> int.
VERBS: dict[str, tuple[str, str]] = {
    "export": ("loop.export", "label the logged impressions with their clicks and write Parquet by hour"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for verb, (module_name, help_) in VERBS.items():
        sub = verbs.add_parser(verb, help=help_, description=help_)
        importlib.import_module(module_name).add_arguments(sub)


def run(args: argparse.Namespace) -> int:
    module_name, _ = VERBS[args.verb]
    return int(importlib.import_module(module_name).run(args) or 0)
