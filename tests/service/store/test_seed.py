"""`din seed` against a real redis-server: exact lists, truncation, idempotence, gz, bad input."""

from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
import redis

import cli
from contracts.errors import DataError
from service.store.seed import seed_reviews

# (user, item, time) in file order. u1 has a time tie (i2, i3 at 20): file order decides.
REVIEWS = [
    ("u1", "i1", 10),
    ("u2", "j1", 5),
    ("u1", "i4", 40),
    ("u1", "i2", 20),
    ("u1", "i3", 20),
    ("u1", "i5", 30),
    ("u3", "k1", 1),
]
EXPECTED = {
    "u1": ["i4", "i5", "i3", "i2", "i1"],
    "u2": ["j1"],
    "u3": ["k1"],
}


def _write(path: Path, rows=REVIEWS, extra: bytes = b"") -> Path:
    lines = [
        orjson.dumps({"reviewerID": u, "asin": i, "unixReviewTime": t, "overall": 5.0, "reviewText": "ok"})
        for u, i, t in rows
    ]
    data = b"\n".join(lines) + b"\n" + extra
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as fh:
            fh.write(data)
    else:
        path.write_bytes(data)
    return path


def _lists(url: str, prefix: str = "din:") -> dict[str, list[str]]:
    client = redis.Redis.from_url(url, decode_responses=True)
    try:
        keys = sorted(client.keys(f"{prefix}hist:*"))
        return {k.removeprefix(f"{prefix}hist:"): client.lrange(k, 0, -1) for k in keys}
    finally:
        client.close()


def test_seed_exact_lists_newest_first(redis_url: str, tmp_path: Path) -> None:
    stats = seed_reviews(_write(tmp_path / "reviews.json"), redis_url, max_history=100)
    assert _lists(redis_url) == EXPECTED
    assert (stats.users, stats.items, stats.reviews) == (3, 7, 7)


def test_seed_truncates_to_max_history(redis_url: str, tmp_path: Path) -> None:
    stats = seed_reviews(_write(tmp_path / "reviews.json"), redis_url, max_history=2, prefix="p:")
    assert _lists(redis_url, "p:") == {"u1": ["i4", "i5"], "u2": ["j1"], "u3": ["k1"]}
    assert stats.items == 4


def test_seed_twice_is_identical(redis_url: str, tmp_path: Path) -> None:
    path = _write(tmp_path / "reviews.json")
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        seed_reviews(path, client, max_history=3, batch_users=2)
        first = _lists(redis_url)
        seed_reviews(path, client, max_history=3, batch_users=2)
    finally:
        client.close()
    assert _lists(redis_url) == first == {"u1": ["i4", "i5", "i3"], "u2": ["j1"], "u3": ["k1"]}


def test_seed_replaces_stale_list(redis_url: str, tmp_path: Path) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        client.rpush("din:hist:u2", "old1", "old2", "old3")
    finally:
        client.close()
    seed_reviews(_write(tmp_path / "reviews.json"), redis_url)
    assert _lists(redis_url)["u2"] == ["j1"]


def test_seed_gz(redis_url: str, tmp_path: Path) -> None:
    seed_reviews(_write(tmp_path / "reviews.json.gz"), redis_url)
    assert _lists(redis_url) == EXPECTED


def test_malformed_line_raises_with_line_number(redis_url: str, tmp_path: Path) -> None:
    path = _write(tmp_path / "reviews.json", extra=b'{"reviewerID": "u9", "asin": \n')
    with pytest.raises(DataError, match=r"reviews\.json:8:"):
        seed_reviews(path, redis_url)
    assert _lists(redis_url) == {}  # nothing written from a bad file


def test_cli_seed(redis_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path / "reviews.json.gz")
    rc = cli.main(["seed", "--reviews", str(path), "--redis-url", redis_url, "--max-history", "4"])
    assert rc == 0
    assert _lists(redis_url)["u1"] == ["i4", "i5", "i3", "i2"]
    out = capsys.readouterr().out
    assert "3 users" in out and "users/s" in out


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        (b"not json\n", "invalid JSON"),
        (b'{"reviewerID": "u", "asin": "a"}\n', "unixReviewTime"),
        (b'{"asin": "a", "unixReviewTime": 3}\n', "reviewerID"),
        (b'{"reviewerID": "u", "asin": "a", "unixReviewTime": "x"}\n', "unixReviewTime"),
        (b"[1, 2]\n", "expected an object"),
    ],
)
def test_cli_bad_file_exit_2(
    redis_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], bad: bytes, why: str
) -> None:
    path = _write(tmp_path / "reviews.json", extra=bad)
    rc = cli.main(["seed", "--reviews", str(path), "--redis-url", redis_url])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"{path.name}:8:" in err and why in err


def test_cli_missing_file_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli.main(["seed", "--reviews", str(tmp_path / "nope.json"), "--redis-url", "redis://127.0.0.1:1/0"])
    assert rc == 2
    assert "no such file" in capsys.readouterr().err


def test_cli_embedded_data_dir_persists(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Without --redis-url, seed starts an embedded server on --redis-data; the data survives a restart."""
    from service.store.embedded import EmbeddedRedis

    data = tmp_path / "redis"
    path = _write(tmp_path / "reviews.json")
    assert cli.main(["seed", "--reviews", str(path), "--redis-data", str(data), "--no-progress"]) == 0
    with EmbeddedRedis(data) as server:
        assert _lists(server.url) == EXPECTED
        # a server already running on the data dir (as under `din serve`) is seeded in place
        assert (
            cli.main(["seed", "--reviews", str(path), "--redis-data", str(data), "--max-history", "1"]) == 0
        )
        assert _lists(server.url)["u1"] == ["i4"]
    capsys.readouterr()


def test_seed_does_not_import_torch() -> None:
    modules = "service.store.seed, service.store.history"
    code = f"import sys, {modules}; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
