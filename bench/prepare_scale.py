"""Time `din prepare` at the scale of 5-core Amazon Electronics (1.7M reviews, 192k users, 63k items).

The raw data comes from `din synth` with the same shape (run once, cached under CACHE/raw). Each step
runs as its own subprocess; its wall time and peak resident memory (os.wait4's ru_maxrss of that
child alone) are printed as a table and written to CACHE/results.json.

    python bench/prepare_scale.py [--cache /tmp/din-scale] [--users 192000 --items 63000 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from contracts.vocab import FIRST_ID


def run_measured(cmd: list[str]) -> dict[str, Any]:
    """Run cmd to completion; wall seconds and that child's own peak RSS (MiB)."""
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)  # per-child rusage (RUSAGE_CHILDREN would mix the steps)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"command failed with exit code {proc.returncode}: {' '.join(cmd)}")
    # ru_maxrss is KiB on Linux, bytes on macOS
    rss_mib = usage.ru_maxrss / (1024 * 1024 if sys.platform == "darwin" else 1024)
    return {"cmd": cmd, "seconds": round(wall, 2), "peak_rss_mib": round(rss_mib, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default="/tmp/din-scale", help="work directory (raw data kept between runs)")
    ap.add_argument("--users", type=int, default=192_000)
    ap.add_argument("--items", type=int, default=63_000)
    ap.add_argument("--events-per-user", type=float, default=8.8, help="Electronics 5-core: 1.69M / 192k")
    ap.add_argument("--max-history", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    cache = Path(args.cache)
    raw, data = cache / "raw", cache / "prepared"
    din = [sys.executable, "-m", "cli"]
    synth_args = [
        "--users", str(args.users), "--items", str(args.items),
        "--events-per-user", str(args.events_per_user), "--seed", str(args.seed),
    ]  # fmt: skip
    stamp = cache / "raw.args.json"  # the synth arguments the cached raw dir was made with
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus"
    results: dict[str, Any] = {"machine": machine}
    if stamp.is_file() and json.loads(stamp.read_text()) == synth_args and (raw / "truth.json").is_file():
        print(f"using the cached raw data in {raw}")
        results["synth"] = json.loads((cache / "synth.result.json").read_text())
    else:
        shutil.rmtree(raw, ignore_errors=True)
        cache.mkdir(parents=True, exist_ok=True)
        results["synth"] = run_measured([*din, "synth", "--out", str(raw), *synth_args, "--no-progress"])
        (cache / "synth.result.json").write_text(json.dumps(results["synth"]))
        stamp.write_text(json.dumps(synth_args))

    shutil.rmtree(data, ignore_errors=True)
    results["prepare"] = run_measured(
        [
            *din, "prepare", "--reviews", str(raw / "reviews.json.gz"), "--meta", str(raw / "meta.json.gz"),
            "--out", str(data), "--max-history", str(args.max_history), "--no-progress",
        ]
    )  # fmt: skip
    truth = json.loads((raw / "truth.json").read_text())
    prepared = json.loads((data / "meta.json").read_text())
    results["data"] = {
        "reviews": truth["reviews"],
        "users": prepared["n_users"],
        "items": prepared["n_items"] - FIRST_ID,  # real ids: the vocabularies' reserved rows excluded
        "categories": prepared["n_categories"] - FIRST_ID,
        "samples": prepared["samples"],
        "raw_mib": round(sum(f.stat().st_size for f in raw.iterdir()) / 2**20, 1),
        "prepared_mib": round(sum(f.stat().st_size for f in data.iterdir()) / 2**20, 1),
    }
    (cache / "results.json").write_text(json.dumps(results, indent=2) + "\n")

    d, s = results["data"], results["data"]["samples"]
    print()
    print(f"data: {d['reviews']:,} reviews, {d['users']:,} users, {d['items']:,} items, ", end="")
    print(f"{d['categories']:,} categories")
    print(f"samples: train {s['train']:,} / valid {s['valid']:,} / test {s['test']:,}")
    print(f"files: raw {d['raw_mib']} MiB (gzip), prepared {d['prepared_mib']} MiB; {results['machine']}")
    print(f"{'step':<8}  {'wall s':>7}  {'peak RSS MiB':>12}")
    for step in ("synth", "prepare"):
        r = results[step]
        print(f"{step:<8}  {r['seconds']:>7.1f}  {r['peak_rss_mib']:>12.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
