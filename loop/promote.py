"""`din promote`: put a retrained bundle live only if it is no worse than its parent, or roll back.

The decision is read from the bundle's `lineage` (written by `din train --from-log`): the AUC of the
new model and of its parent on the same held-out rows (the log's newest hour, or its last
--valid-seconds). The new model goes live only when `new >= parent + --min-gain`; without a parent (a
fresh model) the baseline is the AUC of the scores the service logged on those rows. The live service
must serve the parent (or, without one, anything): otherwise the comparison says nothing about what
would be replaced, and the promotion is refused.

Promoting is the service's own atomic hot reload (POST /admin/reload with the bundle's absolute path,
so the service must see the same path), then a check that GET /model reports the new version.
`--rollback` reloads the parent that the live model's lineage names. Every refusal or failure is one
line and a non-zero exit: 1 when refused or the service failed, 2 for bad arguments or a bad bundle.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from contracts.bundle import load_bundle
from contracts.errors import BundleError

DEFAULT_TIMEOUT_S = 120.0  # a reload loads, verifies and warms the bundle before it answers


class Refused(Exception):
    """The promotion (or rollback) was not made; the message says why. Exit 1."""


class BadArgument(Exception):
    """Unusable arguments or bundle. Exit 2."""


@dataclass
class Service:
    """The few calls promotion needs, over real HTTP."""

    url: str
    api_key: str | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S

    def _client(self) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return httpx.Client(base_url=self.url.rstrip("/"), headers=headers, timeout=self.timeout_s)

    def call(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        """One call; Refused (with the service's error and message) unless it answers 200."""
        with self._client() as c:
            resp = c.request(method, path, json=body)
        _check(resp, f"{method} {path}")
        answer: dict[str, Any] = resp.json()
        return answer

    def manifest(self) -> dict[str, Any]:
        """GET /model: the live bundle's manifest."""
        return self.call("GET", "/model")

    def reload(self, bundle: Path) -> dict[str, Any]:
        """POST /admin/reload: the service loads, verifies and warms `bundle`, then switches."""
        return self.call("POST", "/admin/reload", {"bundle": str(bundle)})


def _check(resp: httpx.Response, what: str) -> None:
    if resp.status_code == 200:
        return
    try:
        body = resp.json()
        why = f"{body.get('error')}: {body.get('message')}"
        fields = [d for d in body.get("detail") or [] if isinstance(d, dict)]
        why += "".join(
            f"; {d.get('field')}: {d.get('message')}"
            for d in fields
            if d.get("message") != body.get("message")
        )
        if len(fields) == 1 and fields[0].get("message") == body.get("message"):
            why += f" ({fields[0].get('field')})"
    except ValueError:
        why = resp.text[:200]
    raise Refused(f"{what} answered {resp.status_code} ({why})")


def _auc(metrics: Any, who: str, where: Path) -> float:
    value = metrics.get("auc") if isinstance(metrics, dict) else None
    if not isinstance(value, int | float) or not math.isfinite(value):
        raise BadArgument(f"{where}: the lineage holds no AUC for the {who} model")
    return float(value)


def promote(bundle: str | Path, service: Service, *, min_gain: float = 0.0) -> str:
    """Reload `service` with `bundle` if it is no worse than its parent; returns what was done.
    Raises Refused (with the reason) and leaves the service as it was otherwise."""
    path = Path(bundle).resolve()
    try:
        manifest = load_bundle(path).manifest
    except BundleError as e:
        raise BadArgument(str(e)) from None
    lineage = manifest.get("lineage")
    if not isinstance(lineage, dict):
        raise BadArgument(f"{path}: no lineage in its manifest (not made by `din train --from-log`)")
    version = str(manifest["model_version"])
    parent = lineage.get("parent") or {}
    valid = lineage.get("valid") or {}
    new_auc = _auc(valid.get("new"), "new", path)
    if lineage.get("parent"):
        base_name = f"parent {parent.get('model_version') or parent.get('run_dir')}"
        base_auc = _auc(valid.get("parent"), "parent", path)
    else:
        base_name = "served scores"
        base_auc = _auc(valid.get("served"), "served", path)
    hour = (lineage.get("data") or {}).get("valid_from", "?")

    live = str(service.manifest().get("model_version"))
    if live == version:
        return f"{version} is already live at {service.url}"
    if parent.get("model_version") and live != parent["model_version"]:
        raise Refused(
            f"refused: the live model is {live}, but {version} was compared with its parent "
            f"{parent['model_version']}; retrain with --init on the live bundle"
        )
    if not new_auc >= base_auc + min_gain:
        raise Refused(
            f"refused: {version} has AUC {new_auc:.4f} on the rows from {hour}, {base_name} has "
            f"{base_auc:.4f}, and min gain is {min_gain:g}; {live} keeps serving"
        )
    service.reload(path)
    now = str(service.manifest().get("model_version"))
    if now != version:
        raise Refused(f"after the reload GET /model reports {now}, not {version}")
    return (
        f"promoted {version} (AUC {new_auc:.4f} vs {base_name} {base_auc:.4f} on the rows from {hour}): "
        f"{service.url} now serves it, replacing {live}"
    )


def rollback(service: Service) -> str:
    """Reload the parent that the live model's lineage names."""
    manifest = service.manifest()
    live = str(manifest.get("model_version"))
    parent = (manifest.get("lineage") or {}).get("parent") or {}
    if not parent.get("bundle"):
        raise Refused(f"the live model {live} names no parent bundle in its lineage: nothing to roll back to")
    service.reload(Path(parent["bundle"]))
    now = str(service.manifest().get("model_version"))
    want = parent.get("model_version")
    if want and now != want:
        raise Refused(f"after the reload GET /model reports {now}, not the parent {want}")
    return f"rolled back {service.url} from {live} to its parent {now} ({parent['bundle']})"


# ---------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "bundle",
        nargs="?",
        type=Path,
        help="a bundle written by `din train --from-log` (the service must see the same path)",
    )
    parser.add_argument("--url", required=True, help="the service, e.g. http://127.0.0.1:8000")
    parser.add_argument("--api-key", help="a key of the service's DIN_API_KEYS, when it has any")
    parser.add_argument(
        "--min-gain",
        type=float,
        default=0.0,
        help="promote only if the new AUC >= the parent's + this, on the held-out rows (default 0: no worse)",
    )
    parser.add_argument(
        "--rollback",
        action="store_true",
        help="instead: reload the parent named by the live model's lineage",
    )
    parser.add_argument(
        "--timeout-s", type=float, default=DEFAULT_TIMEOUT_S, help="per HTTP call, the reload included"
    )


def run(args: argparse.Namespace) -> int:
    name = "din promote"
    if args.rollback == (args.bundle is not None):
        print(f"{name}: give a BUNDLE to promote, or --rollback (not both)", file=sys.stderr)
        return 2
    if not math.isfinite(args.min_gain):
        print(f"{name}: --min-gain must be a finite number, got {args.min_gain}", file=sys.stderr)
        return 2
    if not args.url.startswith(("http://", "https://")):
        print(f"{name}: --url must start with http:// or https://, got {args.url!r}", file=sys.stderr)
        return 2
    if not args.timeout_s > 0:
        print(f"{name}: --timeout-s must be > 0, got {args.timeout_s}", file=sys.stderr)
        return 2
    service = Service(args.url, args.api_key, args.timeout_s)
    return outcome(
        name,
        args.url,
        lambda: rollback(service) if args.rollback else promote(args.bundle, service, min_gain=args.min_gain),
    )


def outcome(name: str, url: str, work: Callable[[], str]) -> int:
    """Run a command's `work` against the service and print what it did: exit 0; BadArgument: 2;
    Refused or an HTTP failure: 1, one line on stderr."""
    try:
        done = work()
    except BadArgument as e:
        print(f"{name}: {e}", file=sys.stderr)
        return 2
    except Refused as e:
        print(f"{name}: {e}", file=sys.stderr)
        return 1
    except httpx.HTTPError as e:
        print(f"{name}: {url}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(done)
    return 0
