"""What one constant-rate load-test step measured, and how it is shown: the per-step table rows of
find-max, the summary of a step, report.json and the latency plot (latency over time + CDF)."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

PERCENTILES = (50, 90, 95, 99)


@dataclass
class StepResult:
    """One constant-rate run."""

    offered_rate: float
    duration_s: float
    requests: int
    completed: int = 0
    ok: int = 0
    achieved_rate: float = 0.0  # successful responses per second over the whole step
    errors: dict[str, int] = field(default_factory=dict)
    latency_ms: dict[str, float] = field(default_factory=dict)
    send_lag_ms: dict[str, float] = field(default_factory=dict)  # actual - scheduled send (client health)
    server: dict[str, Any] | None = None
    # per request, for plots: scheduled offset (s), latency (ms), status ("200", "503", "timeout", ...)
    samples: list[tuple[float, float, str]] = field(default_factory=list, repr=False)

    @property
    def error_rate(self) -> float:
        return 1.0 - self.ok / self.requests if self.requests else 0.0

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("samples")  # per-request samples go to the plot, not into report.json
        d["error_rate"] = self.error_rate
        return d


def percentiles(values: list[float]) -> dict[str, float]:
    """p50 / p90 / p95 / p99, min, mean and max ({} for no values)."""
    if not values:
        return {}
    a = np.asarray(values, dtype=np.float64)
    out = {f"p{p}": float(np.percentile(a, p)) for p in PERCENTILES}
    out.update(min=float(a.min()), mean=float(a.mean()), max=float(a.max()))
    return out


# ---------------------------------------------------------------------------------------- text


def fmt(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def step_header() -> str:
    """The column titles of find-max's one-row-per-step table."""
    return f"{'offered/s':>10} {'achieved/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'errors':>7}  ok"


def step_row(s: StepResult, ok: bool) -> str:
    lat = s.latency_ms
    return (
        f"{s.offered_rate:>10,.1f} {s.achieved_rate:>10,.1f} {fmt(lat.get('p50')):>8} "
        f"{fmt(lat.get('p99')):>8} {fmt(lat.get('max')):>8} {s.requests - s.ok:>7}  {'yes' if ok else 'NO'}"
    )


def format_step(s: StepResult) -> str:
    """A step's summary: throughput, client latencies, errors, the server's phase means."""
    lat = s.latency_ms
    lines = [
        f"requests   {s.requests:,} in {s.duration_s:.1f}s: offered {s.offered_rate:,.1f}/s, "
        f"achieved {s.achieved_rate:,.1f}/s ({s.ok:,} ok)",
        "latency ms (from the scheduled send time)",
        "  " + "  ".join(f"{k} {fmt(lat.get(k))}" for k in ("p50", "p90", "p95", "p99", "max")),
    ]
    # A late sender means the client, not the server, limited the step: say so next to the numbers.
    if s.send_lag_ms.get("p99", 0.0) > 5.0:
        lines.append(
            f"  note: the generator itself sent late (p99 lag {s.send_lag_ms['p99']:.1f} ms): "
            "client-bound, latencies include that"
        )
    if s.errors:
        lines.append("errors     " + ", ".join(f"{k}: {v:,}" for k, v in sorted(s.errors.items())))
    else:
        lines.append("errors     none")
    if s.server is None:
        lines.append("server     /metrics not available")
    else:
        lines.append(f"{'server phase':<28} {'count':>8} {'mean':>10}")
        for p in s.server["phases"]:
            unit = " ms" if p["unit"] == "ms" else ""
            lines.append(f"{p['phase']:<28} {p['count']:>8,} {fmt(p['mean'], 2) + unit:>10}")
        extra = {k: v for k, v in s.server["counters"].items() if v}
        if extra:
            lines.append("counters   " + ", ".join(f"{k} +{v:,.0f}" for k, v in extra.items()))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- files


def write_report(report: dict[str, Any], out: Path) -> Path:
    """report.json under `out` (created if needed); returns its path."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "report.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def write_plot(step: StepResult, path: Path, title: str) -> bool:
    """Latency over time + CDF as a PNG. False (with a message) when matplotlib is not installed."""
    try:
        # Imported here: matplotlib is in the `dev` extra only, and is slow to import.
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(
            "din loadtest: matplotlib is not installed (pip install 'din-rank[dev]'): no plot written",
            file=sys.stderr,
        )
        return False
    t = np.array([s[0] for s in step.samples])
    lat = np.array([s[1] for s in step.samples])
    ok = np.array([s[2] == "200" for s in step.samples], dtype=bool)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    ax1.scatter(t[ok], lat[ok], s=4, alpha=0.5, label="200")
    if (~ok).any():
        ax1.scatter(t[~ok], lat[~ok], s=6, color="red", label="error")
    for p, style in ((50, ":"), (99, "--")):
        v = step.latency_ms.get(f"p{p}")
        if v is not None:
            ax1.axhline(v, linestyle=style, color="gray", linewidth=1, label=f"p{p} {v:.1f} ms")
    ax1.set_xlabel("scheduled send time (s)")
    ax1.set_ylabel("latency (ms)")
    ax1.set_yscale("log")
    ax1.legend(loc="upper right", fontsize=8)
    ax1.set_title("latency over time")
    xs = np.sort(lat)
    ys = np.arange(1, len(xs) + 1) / max(1, len(xs))
    ax2.plot(xs, ys)
    ax2.set_xscale("log")
    ax2.set_xlabel("latency (ms)")
    ax2.set_ylabel("fraction of requests")
    ax2.set_title("CDF")
    ax2.grid(True, which="both", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
