"""`din models`: the model versions a fleet serves and their routing, from the command line.

The same verbs as the service's admin API (`service.api.admin`), over real HTTP to any one replica:
the routing lives in Redis, so a change made through one replica reaches every replica.

    din models show     --url URL                     versions live, routing in force, traffic per arm
    din models route    --url URL --arm control=/models/v1:0.9 --arm treatment=/models/v2:0.1 \\
                        [--shadow /models/v3:1.0] [--salt exp-7] [--expected-revision N] [--note TEXT]
    din models promote  ARM --url URL                 that arm's version for everyone
    din models rollback --url URL                     back to the routing before the current one
    din models clear    --url URL                     no routing: each replica's own bundle for everyone

An arm is NAME=VERSION_OR_BUNDLE[:WEIGHT] (weight 1 by default): a path (it holds a `/`) names a bundle
directory as the replicas see it; anything else a model version already live. A shadow is
VERSION_OR_BUNDLE[:RATE] (rate 1 by default). Exit 0 done, 1 refused or failed (the service's reason),
2 bad arguments.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from loop.promote import DEFAULT_TIMEOUT_S, BadArgument, Service, outcome


def _version_or_bundle(text: str) -> dict[str, str]:
    if not text:
        raise BadArgument("an empty version or bundle")
    return {"bundle": text} if "/" in text else {"model_version": text}


def _split_number(text: str) -> tuple[str, float | None]:
    """'x:0.5' -> ('x', 0.5); 'x' -> ('x', None) (a path may hold ':' too: only a number counts)."""
    head, sep, tail = text.rpartition(":")
    if sep:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return text, None


def parse_arm(text: str) -> dict[str, Any]:
    name, sep, rest = text.partition("=")
    if not sep or not name:
        raise BadArgument(f"--arm {text!r}: expected NAME=VERSION_OR_BUNDLE[:WEIGHT]")
    target, weight = _split_number(rest)
    return {"name": name, **_version_or_bundle(target), "weight": 1.0 if weight is None else weight}


def parse_shadow(text: str) -> dict[str, Any]:
    target, rate = _split_number(text)
    return {**_version_or_bundle(target), "sample_rate": 1.0 if rate is None else rate}


def show(models: dict[str, Any]) -> str:
    """/admin/models as a few lines for a terminal."""
    lines = []
    routing = models.get("routing")
    if routing is None:
        lines.append(
            f"routing: none in force (revision {models['revision']}): each replica's bundle serves all"
        )
    else:
        lines.append(f"routing revision {routing['revision']} (salt {routing['salt']}, {routing['note']})")
        lines.append(f"  {'arm':<16} {'version':<40} {'share':>7}")
        for a in routing["arms"]:
            lines.append(f"  {a['name']:<16} {a['model_version']:<40} {a['share']:>7.2%}")
        for s in routing["shadows"]:
            lines.append(f"  {'(shadow)':<16} {s['model_version']:<40} {s['sample_rate']:>7.0%} of requests")
    if models.get("refused"):
        r = models["refused"]
        lines.append(f"refused here: revision {r['revision']}: {r['reason']}")
    lines.append(f"versions live on this replica (at most {models['max_models']}):")
    for v in models["versions"]:
        mem = f"{v['memory_bytes'] / 2**20:.1f} MiB" if v.get("memory_bytes") is not None else "-"
        role = ", ".join(v["arms"]) or ("shadow" if v.get("shadow_sample_rate") is not None else "idle")
        lines.append(f"  {v['model_version']:<40} {mem:>10}  {role}  ({v['bundle']})")
    if models.get("traffic"):
        lines.append("answers served by this replica:")
        for t in models["traffic"]:
            lines.append(f"  {t['arm']:<16} {t['model_version']:<40} {t['answers']:>9}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "verb", choices=["show", "route", "promote", "rollback", "clear"], help="what to do (see below)"
    )
    parser.add_argument("arm_name", nargs="?", help="promote: the arm whose version everyone gets")
    parser.add_argument("--url", required=True, help="any replica, e.g. http://127.0.0.1:8000")
    parser.add_argument("--api-key", help="a key of the service's DIN_API_KEYS, when it has any")
    parser.add_argument(
        "--arm", action="append", default=[], help="route: NAME=VERSION_OR_BUNDLE[:WEIGHT] (repeat per arm)"
    )
    parser.add_argument(
        "--shadow", action="append", default=[], help="route: VERSION_OR_BUNDLE[:RATE] (repeat per shadow)"
    )
    parser.add_argument("--salt", help="route: the assignment's salt (default: the one in force)")
    parser.add_argument("--note", default="", help="route: why (shown in /admin/models)")
    parser.add_argument(
        "--expected-revision", type=int, help="refuse unless the routing is still at this revision"
    )
    parser.add_argument("--timeout-s", type=float, default=DEFAULT_TIMEOUT_S, help="per HTTP call")
    parser.epilog = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter


def _request(args: argparse.Namespace) -> tuple[str, str, Any]:
    expected = {"expected_revision": args.expected_revision} if args.expected_revision is not None else {}
    if args.verb == "show":
        return "GET", "/admin/models", None
    if args.verb == "route":
        if not args.arm:
            raise BadArgument("route needs at least one --arm NAME=VERSION_OR_BUNDLE[:WEIGHT]")
        body = {
            "arms": [parse_arm(a) for a in args.arm],
            "shadows": [parse_shadow(s) for s in args.shadow],
            **({"salt": args.salt} if args.salt else {}),
            **({"note": args.note} if args.note else {}),
            **expected,
        }
        return "PUT", "/admin/routing", body
    if args.verb == "promote":
        if not args.arm_name:
            raise BadArgument("promote needs the ARM whose version everyone gets")
        return "POST", "/admin/routing/promote", {"arm": args.arm_name, **expected}
    if args.verb == "rollback":
        return "POST", "/admin/routing/rollback", expected
    query = f"?expected_revision={args.expected_revision}" if args.expected_revision is not None else ""
    return "DELETE", f"/admin/routing{query}", None


def run(args: argparse.Namespace) -> int:
    name = f"din models {args.verb}"
    if not args.url.startswith(("http://", "https://")):
        print(f"{name}: --url must start with http:// or https://, got {args.url!r}", file=sys.stderr)
        return 2
    service = Service(args.url, args.api_key, args.timeout_s)

    def work() -> str:
        method, path, body = _request(args)
        service.call(method, path, body)
        return show(service.call("GET", "/admin/models"))

    return outcome(name, args.url, work)
