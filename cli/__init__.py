"""The `din` command: a dispatcher. Each subcommand lives in the package that owns it and is imported
only when run, so `din serve` never imports torch and `din --help` stays instant."""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). Each module defines add_arguments(parser) and run(args) -> int.
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("model.synth", "generate a synthetic SNAP-format data set with known ground truth"),
    "prepare": ("model.data", "turn SNAP reviews + meta into train / valid / test samples"),
    "train": (
        "loop.retrain",
        "train a DIN (or the sum-pooling BaseModel) on prepared samples, or retrain on the impression log",
    ),
    "score": ("model.score", "score rows offline with the PyTorch model (the reference)"),
    "export": ("model.export", "write a parity-checked ONNX serving bundle"),
    "seed": ("service.store.seed", "bulk-load users' behaviour histories into Redis"),
    "serve": ("service.server", "run the ranking service"),
    "demo": ("demo.pipeline", "synth, prepare, train, export, seed and serve, end to end"),
    "loadtest": ("loadtest.openloop", "open-loop load test against a running service"),
    "simulate": ("loop.simulate", "simulated users of the synth world: rank, click, drift (online CTR, AUC)"),
    "report": ("loop.report", "A/B arms and shadows on the exported log: CTR with intervals, AUC, agreement"),
    "loop-demo": ("demo.loop", "serve, simulate, drift, export, retrain, promote, simulate again: one turn"),
    "promote": ("loop.promote", "put a retrained bundle live if no worse than its parent; --rollback"),
    "models": (
        "loop.models",
        "the versions a fleet serves: show, route (A/B arms, shadows), promote, rollback",
    ),
    "log": ("loop.log", "the impression log's offline jobs: `din log export` (labelled Parquet by hour)"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: din COMMAND [options]   (din COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name = argv[0]
    if name not in COMMANDS:
        print(f"din: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, help_ = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"din {name}", description=help_)
    module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
