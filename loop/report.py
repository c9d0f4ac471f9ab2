"""`din report --log DIR`: the A/B arms and the shadow versions, measured on the exported impression log.

It reads what `din log export --out DIR` wrote: the impression rows (`DIR/hour=*/part-*.parquet`, one
per (impression, logged item), labelled with its click) and the shadow rows (`DIR/_shadow/hour=*/...`:
a shadow version's score and rank of the same items). Impressions whose arm was forced by the QA header
(`arm_forced`) are left out of everything: they are not a random sample of users. An impression logged
with no routing in force (`arm` None, or a file exported before arms existed) counts in arm `(none)`.

Per arm:
- CTR = clicked impressions / impressions (an impression is clicked when any of its logged items was
  clicked within the export's window), with its 95% Wilson score interval. The unit is the impression,
  the unit the arms assign (via the user), so the interval does not pretend that the items of one
  answer are independent. Item CTR = clicks / shown items, for reference (no interval: its items are not
  independent draws).
- The difference of CTR against the control arm (`--control`, default the arm named `control`, else
  the arm with the most impressions) with its 95% interval by Newcombe's hybrid score method (method 10
  of Newcombe 1998: the two Wilson intervals combined; good coverage at small rates and counts, where
  the Wald interval is too narrow), and the two-sided p-value of the pooled two-proportion z-test.
  Users are hashed into arms, so impressions of one user are not independent either: with a few heavy
  users the intervals are optimistic.
- Online AUC of the served scores against the labels over all its rows, and GAUC: the per-user AUC
  weighted by the user's rows (shown items, the paper's impressions, as `din train` reports it), over
  users with both a click and a non-click (`model.metrics`).

Per shadow version, on its rows joined with the impression rows on (impression_id, item_id):
- Kendall tau-b between the served and the shadow scores of an impression's items, averaged over the
  impressions with two or more items (and not all tied in either ranking).
- Top-k overlap: |served top k ∩ shadow top k| / k per impression, averaged, where k is the number of
  items the impression logged (or `--top-k`, at most that), served top k the items at served position
  < k and shadow top k the items with shadow position < k (its rank among ALL the request's candidates).
- Would-be AUC: the shadow's scores against the logged clicks on the rows both rankings showed (served
  position < k and shadow position < k), beside the served model's AUC on exactly those rows. Only items
  the served answer showed have labels, so this is what the shadow would have scored on the part of its
  own answer that was actually seen.

Output: a table on stdout, `--json FILE` (every number, NaN as null), `--plot FILE` (CTR per arm with
its interval; per hour CTR per arm when the log spans more than one hour).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from contracts.errors import DataError, InvalidArgument
from contracts.routing import NO_ROUTING  # impressions logged with no routing in force
from loop.export import SHADOW_DIR
from model.metrics import auc, gauc

NAME = "din report"
Z95 = 1.959963984540054  # the standard normal's 97.5% quantile

IMPRESSION_COLUMNS = (
    "impression_id",
    "ts",
    "user_id",
    "item_id",
    "position",
    "score",
    "label",
    "model_version",
    "arm",
    "arm_forced",
)
SHADOW_COLUMNS = ("impression_id", "item_id", "shadow_version", "shadow_score", "shadow_position")

CTR_HELP = (
    "CTR = clicked impressions / impressions: an impression (one /rank answer) is clicked when any of its "
    "logged items was clicked within the export's attribution window. Item CTR = clicks / shown items "
    "(logged items). Impressions whose arm was forced by the QA header are left out; those served with no "
    "routing in force count as arm (none). The difference against control has Newcombe's hybrid score "
    "95% interval and a pooled two-proportion z-test; CTR intervals are Wilson's. GAUC weights each "
    "user's AUC by their shown items, over users with both a click and a non-click."
)


# ---------------------------------------------------------------- statistics


def wilson(clicks: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion clicks / n ((nan, nan) for n = 0)."""
    if n <= 0:
        return math.nan, math.nan
    p = clicks / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # at 0 and n clicks the bound is exactly the rate (the formula leaves a rounding error)
    return (0.0 if clicks == 0 else centre - half), (1.0 if clicks == n else centre + half)


def newcombe(x1: int, n1: int, x2: int, n2: int, z: float = Z95) -> tuple[float, float]:
    """Newcombe's hybrid score interval (1998, method 10) of p1 - p2 = x1/n1 - x2/n2."""
    if n1 <= 0 or n2 <= 0:
        return math.nan, math.nan
    p1, p2 = x1 / n1, x2 / n2
    l1, u1 = wilson(x1, n1, z)
    l2, u2 = wilson(x2, n2, z)
    d = p1 - p2
    return d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2), d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)


def two_proportion_p(x1: int, n1: int, x2: int, n2: int) -> float:
    """Two-sided p-value of the pooled two-proportion z-test of p1 = p2."""
    if n1 <= 0 or n2 <= 0:
        return math.nan
    pooled = (x1 + x2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    d = x1 / n1 - x2 / n2
    if se == 0:  # no clicks at all, or all clicked: the rates are equal
        return 1.0
    return math.erfc(abs(d / se) / math.sqrt(2))


def _nan_to_none(v: float) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else v


# ---------------------------------------------------------------- reading


@dataclass(frozen=True)
class Window:
    """Impressions with since <= ts < until (unix seconds; None: open)."""

    since: float | None = None
    until: float | None = None


def _read_parts(files: list[Path], columns: tuple[str, ...], defaults: dict[str, pa.Array]) -> pa.Table:
    """The files' `columns`; a column a file lacks (exported before it existed) gets `defaults`."""
    tables = []
    for path in files:
        try:
            names = set(pq.read_schema(path).names)
            part = pq.read_table(path, columns=[c for c in columns if c in names])
        except (pa.ArrowException, OSError, ValueError) as e:
            raise DataError(f"{path}: not a file of `din log export` ({e})") from None
        for name in columns:
            if name not in names:
                if name not in defaults:
                    raise DataError(f"{path}: not a file of `din log export` (no column {name!r})")
                part = part.append_column(name, pa.repeat(defaults[name], part.num_rows))
        tables.append(part.select(list(columns)))
    try:
        return pa.concat_tables(tables, promote_options="permissive").combine_chunks()
    except pa.ArrowException as e:
        raise DataError(f"the exported files disagree on their columns ({e})") from None


def read_impressions(log_dir: Path, window: Window) -> pa.Table:
    """Every exported impression row in the window (DataError when there is none)."""
    if not log_dir.is_dir():
        raise DataError(f"{log_dir}: not a directory (write one with `din log export --out {log_dir}`)")
    files = sorted(log_dir.glob("hour=*/part-*.parquet"))
    if not files:
        raise DataError(
            f"{log_dir}: no exported impressions (no hour=*/part-*.parquet; run `din log export --out`)"
        )
    defaults = {"arm": pa.scalar(None, pa.string()), "arm_forced": pa.scalar(False, pa.bool_())}
    table = _read_parts(files, IMPRESSION_COLUMNS, defaults)
    table = _in_window(table, window)
    if table.num_rows == 0:
        raise DataError(f"{log_dir}: no exported impressions between --since and --until")
    return table


def read_shadows(log_dir: Path) -> pa.Table | None:
    """Every exported shadow row, or None when there is none."""
    files = sorted((log_dir / SHADOW_DIR).glob("hour=*/part-*.parquet"))
    return _read_parts(files, SHADOW_COLUMNS, {}) if files else None


def _in_window(table: pa.Table, window: Window) -> pa.Table:
    ts = table.column("ts")
    mask = pc.is_valid(ts)
    if window.since is not None:
        mask = pc.and_(mask, pc.greater_equal(ts, window.since))
    if window.until is not None:
        mask = pc.and_(mask, pc.less(ts, window.until))
    return table.filter(mask)


# ---------------------------------------------------------------- the report


@dataclass
class ArmStats:
    arm: str
    versions: list[str]  # the model versions that served it (more than one across a promotion)
    impressions: int
    clicks: int  # clicked impressions
    ctr: float
    ctr_low: float
    ctr_high: float
    shown: int  # logged items
    item_clicks: int
    item_ctr: float
    auc: float
    gauc: float
    diff: float = math.nan  # ctr - control's ctr
    diff_low: float = math.nan
    diff_high: float = math.nan
    p_value: float = math.nan


@dataclass
class ShadowStats:
    version: str
    impressions: int  # impressions with shadow rows joined
    rows: int  # joined (impression, item) rows
    tau_b: float  # mean over impressions where it is defined
    tau_impressions: int  # how many
    overlap: float  # mean top-k overlap
    both_rows: int  # rows both rankings showed (served and shadow position < k)
    both_clicks: int
    shadow_auc: float  # on those rows
    served_auc: float  # on the same rows


@dataclass
class HourStats:
    hour: str  # YYYY-MM-DDTHH, UTC
    arm: str
    impressions: int
    clicks: int
    ctr: float
    ctr_low: float
    ctr_high: float


@dataclass
class Report:
    log: str
    control: str
    impressions: int  # in the comparison (forced ones out)
    forced_excluded: int  # impressions left out: their arm was forced by the QA header
    first_ts: float
    last_ts: float
    arms: list[ArmStats]
    hours: list[HourStats]
    shadows: list[ShadowStats]
    top_k: int | None
    definitions: str = CTR_HELP

    def to_json(self) -> dict[str, Any]:
        def clean(v: Any) -> Any:
            if isinstance(v, float):
                return _nan_to_none(v)
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items()}
            if isinstance(v, list):
                return [clean(x) for x in v]
            return v

        return {k: clean(v) for k, v in asdict(self).items()}


def _impressions_of(table: pa.Table) -> dict[str, np.ndarray]:
    """Per impression (in id order): its arm, forced flag, ts, and whether any of its items was clicked;
    and each row's impression index (`row_imp`)."""
    ids = table.column("impression_id").to_numpy(zero_copy_only=False).astype(str)
    uniq, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
    labels = table.column("label").to_numpy(zero_copy_only=False).astype(np.int64)
    clicked = np.zeros(len(uniq), dtype=np.int64)
    np.maximum.at(clicked, inverse, (labels > 0).astype(np.int64))
    arms = pc.fill_null(table.column("arm"), NO_ROUTING).to_numpy(zero_copy_only=False).astype(str)
    forced = table.column("arm_forced").fill_null(False).to_numpy(zero_copy_only=False).astype(bool)
    ts = table.column("ts").to_numpy(zero_copy_only=False)
    return {
        "row_imp": inverse,
        "arm": arms[first],
        "forced": forced[first],  # the writer sets it per impression: every row of one agrees
        "ts": ts[first],
        "clicked": clicked,
    }


def _hour(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H")


def build_report(
    log_dir: Path, *, control: str | None = None, top_k: int | None = None, window: Window | None = None
) -> Report:
    """Everything `din report` shows (see the module docstring). DataError: nothing to report;
    InvalidArgument: `control` names no arm."""
    table = read_impressions(log_dir, window or Window())
    imp = _impressions_of(table)
    forced_imp = imp["forced"]
    keep_rows = ~forced_imp[imp["row_imp"]]
    forced_excluded = int(forced_imp.sum())
    if not keep_rows.any():
        raise DataError(f"{log_dir}: every exported impression had its arm forced (QA): nothing to compare")
    rows = table
    if forced_excluded:
        rows = table.filter(pa.array(keep_rows))
        imp = _impressions_of(rows)
    row_imp = imp["row_imp"]
    row_arm = imp["arm"][row_imp]
    labels = rows.column("label").to_numpy(zero_copy_only=False).astype(np.int64) > 0
    scores = rows.column("score").to_numpy(zero_copy_only=False).astype(np.float64)
    users = rows.column("user_id").to_numpy(zero_copy_only=False).astype(str)
    versions = rows.column("model_version").to_numpy(zero_copy_only=False).astype(str)

    arms: list[ArmStats] = []
    for arm in sorted(set(imp["arm"].tolist())):
        in_arm = imp["arm"] == arm
        n, clicks = int(in_arm.sum()), int(imp["clicked"][in_arm].sum())
        r = row_arm == arm
        low, high = wilson(clicks, n)
        shown, item_clicks = int(r.sum()), int(labels[r].sum())
        arms.append(
            ArmStats(
                arm=arm,
                versions=sorted(set(versions[r].tolist())),
                impressions=n,
                clicks=clicks,
                ctr=clicks / n,
                ctr_low=low,
                ctr_high=high,
                shown=shown,
                item_clicks=item_clicks,
                item_ctr=item_clicks / shown,
                auc=auc(labels[r], scores[r]),
                gauc=gauc(users[r], labels[r], scores[r]),
            )
        )
    by_name = {a.arm: a for a in arms}
    if control is None:
        control = "control" if "control" in by_name else max(arms, key=lambda a: (a.impressions, a.arm)).arm
    elif control not in by_name:
        names = ", ".join(by_name)
        raise InvalidArgument(f"--control {control!r} names no arm of the log (its arms: {names})")
    ref = by_name[control]
    for a in arms:
        if a is not ref:
            a.diff = a.ctr - ref.ctr
            a.diff_low, a.diff_high = newcombe(a.clicks, a.impressions, ref.clicks, ref.impressions)
            a.p_value = two_proportion_p(a.clicks, a.impressions, ref.clicks, ref.impressions)
    arms.sort(key=lambda a: (a is not ref, a.arm))

    hours: list[HourStats] = []
    hour_of, hour_code = np.unique(np.floor(imp["ts"] / 3600).astype(np.int64), return_inverse=True)
    arm_names = [a.arm for a in arms]
    seen, seen_code = np.unique(imp["arm"], return_inverse=True)
    arm_code = np.array([arm_names.index(a) for a in seen.tolist()])[seen_code]  # index into `arms`
    cell = hour_code * len(arms) + arm_code
    counts = np.bincount(cell, minlength=len(hour_of) * len(arms))
    clicked_counts = np.bincount(cell, weights=imp["clicked"], minlength=len(counts))
    for c in np.flatnonzero(counts).tolist():
        h, a_index = divmod(c, len(arms))
        n, clicks = int(counts[c]), int(clicked_counts[c])
        low, high = wilson(clicks, n)
        hour = _hour(hour_of[h] * 3600.0)
        hours.append(HourStats(hour, arm_names[a_index], n, clicks, clicks / n, low, high))

    shadow_table = read_shadows(log_dir)
    shadows = _shadow_stats(rows, shadow_table, top_k) if shadow_table is not None else []
    ts = imp["ts"]
    return Report(
        log=str(log_dir),
        control=control,
        impressions=len(ts),
        forced_excluded=forced_excluded,
        first_ts=float(ts.min()),
        last_ts=float(ts.max()),
        arms=arms,
        hours=hours,
        shadows=shadows,
        top_k=top_k,
    )


def _shadow_stats(rows: pa.Table, shadow: pa.Table, top_k: int | None) -> list[ShadowStats]:
    served = rows.select(["impression_id", "item_id", "position", "score", "label"])
    joined = served.join(shadow, keys=["impression_id", "item_id"], join_type="inner")
    if joined.num_rows == 0:
        return []
    out = []
    versions = joined.column("shadow_version").to_numpy(zero_copy_only=False).astype(str)
    for version in sorted(set(versions.tolist())):
        part = joined.filter(pa.array(versions == version))
        ids = part.column("impression_id").to_numpy(zero_copy_only=False).astype(str)
        order = np.argsort(ids, kind="stable")
        ids = ids[order]

        def col(name: str, order: np.ndarray = order, part: pa.Table = part) -> np.ndarray:
            return part.column(name).to_numpy(zero_copy_only=False)[order]

        # a served position of None (scored, not returned) is never in the served top k
        position = col("position").astype(np.float64)
        position[np.isnan(position)] = math.inf
        score, label = col("score").astype(np.float64), col("label").astype(np.int64) > 0
        s_score, s_pos = col("shadow_score").astype(np.float64), col("shadow_position").astype(np.float64)
        starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
        ends = np.r_[starts[1:], len(ids)]
        n_items = ends - starts
        k = n_items if top_k is None else np.minimum(n_items, top_k)
        row_k = np.repeat(k, n_items)
        in_served, in_shadow = position < row_k, s_pos < row_k
        both = in_served & in_shadow
        overlap = np.add.reduceat(both.astype(np.int64), starts) / k
        taus = _taus(score, s_score, starts, n_items)
        defined = taus[~np.isnan(taus)]
        out.append(
            ShadowStats(
                version=version,
                impressions=len(starts),
                rows=len(ids),
                tau_b=float(defined.mean()) if len(defined) else math.nan,
                tau_impressions=len(defined),
                overlap=float(overlap.mean()),
                both_rows=int(both.sum()),
                both_clicks=int(label[both].sum()),
                shadow_auc=auc(label[both], s_score[both]),
                served_auc=auc(label[both], score[both]),
            )
        )
    return out


TAU_CHUNK = 1 << 22  # pair comparisons per vectorised step of `_taus` (bounds its memory)


def _taus(x: np.ndarray, y: np.ndarray, starts: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Kendall tau-b of x vs y within each group (rows starts[g] .. starts[g] + sizes[g]), as
    `kendall_tau_b` per group, vectorised over the groups of each size (impressions mostly log the same
    number of items)."""
    out = np.full(len(starts), np.nan)
    for n in np.unique(sizes).tolist():
        if n < 2:
            continue
        groups = np.flatnonzero(sizes == n)
        i, j = np.triu_indices(n, k=1)
        step = max(1, TAU_CHUNK // len(i))
        for lo in range(0, len(groups), step):
            g = groups[lo : lo + step]
            idx = starts[g][:, None] + np.arange(n)  # (G, n) rows of each group
            xs, ys = x[idx], y[idx]
            sx, sy = np.sign(xs[:, i] - xs[:, j]), np.sign(ys[:, i] - ys[:, j])  # (G, pairs)
            untied = np.count_nonzero(sx, axis=1) * np.count_nonzero(sy, axis=1)
            with np.errstate(invalid="ignore", divide="ignore"):
                tau = (sx * sy).sum(axis=1) / np.sqrt(untied)
            out[g] = np.where(untied > 0, tau, np.nan)
    return out


# ---------------------------------------------------------------- text, JSON, plot


def _f(v: float, spec: str) -> str:
    return "-" if v is None or math.isnan(v) else format(v, spec)


def _grid(header: list[str], rows: list[list[str]]) -> str:
    """A plain text table: the first column left-aligned, the others right-aligned."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(r: list[str]) -> str:
        cells = zip(r, widths, strict=True)
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(cells)).rstrip()

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


def format_report(rep: Report) -> str:
    span = f"{_hour(rep.first_ts)}h .. {_hour(rep.last_ts)}h UTC"
    lines = [
        f"{rep.log}: {rep.impressions:,} impressions, {span}"
        + (f" ({rep.forced_excluded:,} with a forced arm left out)" if rep.forced_excluded else ""),
        "",
    ]
    header = ["arm", "versions", "impressions", "clicked", "CTR", "95% CI", f"diff vs {rep.control}"]
    header += ["95% CI (Newcombe)", "p", "item CTR", "AUC", "GAUC"]
    rows = []
    for a in rep.arms:
        rows.append(
            [
                a.arm,
                ",".join(a.versions),
                f"{a.impressions:,}",
                f"{a.clicks:,}",
                _f(a.ctr, ".2%"),
                f"[{_f(a.ctr_low, '.2%')}, {_f(a.ctr_high, '.2%')}]",
                "control" if math.isnan(a.diff) else _f(a.diff, "+.2%"),
                "" if math.isnan(a.diff) else f"[{_f(a.diff_low, '+.2%')}, {_f(a.diff_high, '+.2%')}]",
                "" if math.isnan(a.p_value) else _f(a.p_value, ".2g"),
                _f(a.item_ctr, ".2%"),
                _f(a.auc, ".4f"),
                _f(a.gauc, ".4f"),
            ]
        )
    lines.append(_grid(header, rows))
    if rep.shadows:
        k = "items logged" if rep.top_k is None else f"min({rep.top_k}, items logged)"
        lines += ["", f"shadow versions (k = {k}; AUCs on the rows both rankings showed)"]
        header = ["shadow", "impressions", "rows", "Kendall tau-b", "top-k overlap", "rows both", "clicks"]
        header += ["shadow AUC", "served AUC"]
        rows = [
            [
                s.version,
                f"{s.impressions:,}",
                f"{s.rows:,}",
                _f(s.tau_b, ".3f"),
                _f(s.overlap, ".3f"),
                f"{s.both_rows:,}",
                f"{s.both_clicks:,}",
                _f(s.shadow_auc, ".4f"),
                _f(s.served_auc, ".4f"),
            ]
            for s in rep.shadows
        ]
        lines.append(_grid(header, rows))
    return "\n".join(lines)


def plot_report(rep: Report, path: Path) -> bool:
    """CTR per arm with its 95% interval; per hour CTR per arm beside it when there is more than one
    hour. False (and a note) without matplotlib (the `dev` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"{NAME}: matplotlib is not installed (the `dev` extra): no plot", file=sys.stderr)
        return False
    hours = sorted({h.hour for h in rep.hours})
    panels = 2 if len(hours) > 1 else 1
    fig, axes = plt.subplots(1, panels, figsize=(5 + 5 * (panels - 1), 4.2), squeeze=False)
    ax = axes[0][0]
    xs = np.arange(len(rep.arms))
    ctr = np.array([a.ctr for a in rep.arms])
    err = np.array([[a.ctr - a.ctr_low for a in rep.arms], [a.ctr_high - a.ctr for a in rep.arms]]).clip(0)
    ax.errorbar(xs, ctr, yerr=err, fmt="o", capsize=6)
    ax.set_xticks(xs, [a.arm for a in rep.arms])
    ax.set_ylabel("CTR (clicked impressions), 95% interval")
    ax.set_title("CTR per arm")
    if panels == 2:
        ax = axes[0][1]
        index = {h: i for i, h in enumerate(hours)}
        for a in rep.arms:
            hs = [h for h in rep.hours if h.arm == a.arm]
            x = [index[h.hour] for h in hs]
            y = [h.ctr for h in hs]
            e = np.array([[h.ctr - h.ctr_low for h in hs], [h.ctr_high - h.ctr for h in hs]]).clip(0)
            ax.errorbar(x, y, yerr=e, marker=".", capsize=3, label=a.arm)
        step = max(1, len(hours) // 8)
        ax.set_xticks(range(0, len(hours), step), [hours[i][5:] for i in range(0, len(hours), step)])
        ax.set_xlabel("hour (UTC)")
        ax.set_title("CTR per hour")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---------------------------------------------------------------- the command


def _time(text: str) -> float:
    """Unix seconds, or an ISO 8601 time (UTC unless it names its zone), e.g. 2026-12-05T21."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = dt.datetime.fromisoformat(text if len(text) != 13 else f"{text}:00")
    except ValueError:
        raise argparse.ArgumentTypeError(f"not unix seconds nor an ISO time: {text!r}") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = CTR_HELP
    parser.add_argument("--log", required=True, type=Path, help="a `din log export --out` directory")
    parser.add_argument(
        "--control",
        help="the arm the others are compared with (default: the arm named `control`, else the one with "
        "the most impressions)",
    )
    parser.add_argument(
        "--top-k",
        type=int,
        help="shadow agreement and would-be AUC on each ranking's top k (default: k = the items each "
        "impression logged)",
    )
    parser.add_argument(
        "--since",
        type=_time,
        help="only impressions at or after this time: unix seconds or ISO 8601, UTC unless it names a zone "
        "(e.g. 2026-12-05T21)",
    )
    parser.add_argument("--until", type=_time, help="only impressions before this time (as --since)")
    parser.add_argument("--json", type=Path, help="also write every number to this JSON file")
    parser.add_argument("--plot", type=Path, help="also draw CTR per arm (and per hour) to this image")


def run(args: argparse.Namespace) -> int:
    if args.top_k is not None and args.top_k < 1:
        print(f"{NAME}: --top-k must be >= 1, got {args.top_k}", file=sys.stderr)
        return 2
    window = Window(args.since, args.until)
    try:
        rep = build_report(args.log, control=args.control, top_k=args.top_k, window=window)
    except InvalidArgument as e:
        print(f"{NAME}: {e}", file=sys.stderr)
        return 2
    except DataError as e:
        print(f"{NAME}: {e}", file=sys.stderr)
        return 1
    print(format_report(rep))
    try:
        if args.json is not None:
            args.json.write_text(json.dumps(rep.to_json(), indent=2) + "\n")
        if args.plot is not None and not plot_report(rep, args.plot):
            return 1
    except OSError as e:
        print(f"{NAME}: {e}", file=sys.stderr)
        return 1
    return 0
