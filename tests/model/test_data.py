"""`din prepare`: SNAP parsing (plain / gzip, JSON / Python-literal meta), samples, negatives, errors."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

import model.data
from cli import main as din_main
from contracts.errors import DataError, DinError, InvalidArgument
from contracts.vocab import OOV, Vocab
from model.data import gather_histories, load_prepared, prepare, read_vocab

# A tiny hand-made data set. u1's b and c share a timestamp: file order decides (b first).
# u3 has 2 events: skipped, and its item e (nobody else's) stays out of the vocabulary.
# x has no meta line and d an empty category list: both get "<unknown>".
REVIEWS = [
    ("u2", "b", 5),
    ("u1", "a", 10),
    ("u1", "b", 20),
    ("u1", "c", 20),
    ("u3", "e", 1),
    ("u1", "d", 40),
    ("u2", "c", 6),
    ("u2", "a", 7),
    ("u3", "a", 2),
    ("u2", "f", 8),
    ("u1", "x", 50),
    ("u2", "g", 9),
]
META = [
    {"asin": "a", "title": "Al's phone", "categories": [["Electronics", "Phones"], ["Other"]]},
    {"asin": "b", "categories": [["Electronics", "Phones"]]},
    {"asin": "c", "categories": [["Electronics", "Phones"]]},
    {"asin": "d", "categories": []},
    {"asin": "f", "categories": [["Electronics", "Cables", "USB"]]},
    {"asin": "g", "categories": [["Electronics", "Cables", "USB"]]},
    {"asin": "zz", "categories": [["Electronics", "Unused"]]},  # not in reviews: not in the vocabulary
]
# vocabulary by frequency among kept users, then id: a, b, c (2 users each), then d, f, g, x
ITEMS = ["<pad>", "<oov>", "a", "b", "c", "d", "f", "g", "x"]
CATEGORIES = ["<pad>", "<oov>", "Phones", "<unknown>", "USB"]  # "<unknown>" sorts before "USB"
ITEM_CATE = [0, 1, 2, 2, 2, 3, 4, 4, 3]
U1 = [2, 3, 4, 5, 8]  # a b c d x
U2 = [3, 4, 2, 6, 7]  # b c a f g


def write_lines(path: Path, lines: list[str]) -> Path:
    data = "".join(line + "\n" for line in lines).encode()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def write_dataset(d: Path, gz: bool = False, literal: bool = False) -> tuple[Path, Path]:
    sfx = ".json.gz" if gz else ".json"
    reviews = write_lines(
        d / f"reviews{sfx}",
        [
            json.dumps({"reviewerID": u, "asin": a, "overall": 5.0, "unixReviewTime": t})
            for u, a, t in REVIEWS
        ],
    )
    meta = write_lines(d / f"meta{sfx}", [repr(m) if literal else json.dumps(m) for m in META])
    return reviews, meta


@pytest.mark.parametrize(("gz", "literal"), [(False, False), (True, False), (False, True), (True, True)])
def test_tiny_dataset_exact(tmp_path: Path, gz: bool, literal: bool) -> None:
    reviews, meta = write_dataset(tmp_path, gz, literal)
    info = prepare(reviews, meta, tmp_path / "out", max_history=2, seed=0)
    p = load_prepared(tmp_path / "out")
    assert p.items == ITEMS
    assert p.categories == CATEGORIES
    assert p.users == ["u1", "u2"]
    assert p.item_cate.dtype == np.int64 and p.item_cate.tolist() == ITEM_CATE
    assert p.seq_items.dtype == np.int32 and p.seq_items.tolist() == U1 + U2
    assert p.seq_offsets.dtype == np.int64 and p.seq_offsets.tolist() == [0, 5, 10]
    assert info["users_skipped"] == 1 and info["items_without_meta"] == 1
    assert info["samples"] == {"train": 8, "valid": 4, "test": 4} and p.max_history == 2

    # steps 1, 2 train; 3 valid; 4 test; each a positive then a negative at the same position
    for name, steps in (("train", [1, 2]), ("valid", [3]), ("test", [4])):
        s = p.split(name)
        assert s.user.dtype == np.int32 and s.pos.dtype == np.int32 and s.target.dtype == np.int32
        assert s.label.dtype == np.float32
        exp_user = [u for u in (0, 1) for _ in steps for _ in (0, 1)]
        exp_pos = [k for _ in (0, 1) for k in steps for _ in (0, 1)]
        assert s.user.tolist() == exp_user
        assert s.pos.tolist() == exp_pos
        assert s.label.tolist() == [1.0, 0.0] * (len(exp_user) // 2)
        seqs = (U1, U2)
        assert s.target[0::2].tolist() == [
            seqs[u][k] for u, k in zip(exp_user[0::2], exp_pos[0::2], strict=True)
        ]
        # negatives: never an item of that user, never pad / oov
        for u, t in zip(s.user[1::2], s.target[1::2], strict=True):
            assert t >= 2 and t not in seqs[u]

    hist, hist_len = gather_histories(p.seq_items, p.seq_offsets, p.test.user, p.test.pos, p.max_history)
    assert hist.dtype == np.int64 and hist_len.dtype == np.int64
    assert hist.tolist() == [[5, 4], [5, 4], [6, 2], [6, 2]]  # newest first, cut to max_history = 2
    assert hist_len.tolist() == [2, 2, 2, 2]
    hist, hist_len = gather_histories(p.seq_items, p.seq_offsets, p.train.user, p.train.pos, 100)
    assert hist.tolist()[::2] == [[2, 0], [3, 2], [3, 0], [4, 3]]  # padded with 0 to the batch maximum
    assert hist_len.tolist()[::2] == [1, 2, 1, 2]


def test_gather_histories_edges() -> None:
    seq = np.array([2, 3, 4, 5, 6, 7], dtype=np.int32)
    off = np.array([0, 4, 6], dtype=np.int64)
    hist, hist_len = gather_histories(seq, off, np.array([0, 1]), np.array([0, 0]), 10)
    assert hist.shape == (2, 1) and hist.tolist() == [[0], [0]] and hist_len.tolist() == [0, 0]
    hist, hist_len = gather_histories(seq, off, np.array([0, 1, 0]), np.array([4, 2, 3]), 3)
    assert hist.tolist() == [[5, 4, 3], [7, 6, 0], [4, 3, 2]]
    assert hist_len.tolist() == [3, 2, 3]
    hist, _ = gather_histories(seq, off, np.array([], dtype=np.int64), np.array([], dtype=np.int64), 3)
    assert hist.shape == (0, 1)


def test_item_index_and_vocab(tmp_path: Path) -> None:
    reviews, meta = write_dataset(tmp_path)
    prepare(reviews, meta, tmp_path / "out")
    assert read_vocab(tmp_path / "out" / "items.txt") == ITEMS
    index = Vocab.from_file(tmp_path / "out" / "items.txt")
    got = index.lookup(["a", "x", "nope", "<pad>", "<oov>"])
    assert got.dtype == np.int64 and got.tolist() == [2, 8, OOV, OOV, OOV]
    assert index.lookup([]).shape == (0,)


@pytest.mark.parametrize(
    ("which", "line", "reason"),
    [
        ("reviews", '{"reviewerID": "u9", "asin": "a", "unixReviewTime": 3', "invalid JSON"),
        ("reviews", '{"reviewerID": "u9", "asin": "a"}', "missing field 'unixReviewTime'"),
        ("reviews", '{"reviewerID": "u9", "asin": "a", "unixReviewTime": "3"}', "must be an integer"),
        ("reviews", '["u9", "a", 3]', "expected an object"),
        ("meta", "{'asin': 'f', 'categories': [['X']", "neither JSON nor a Python literal"),
        ("meta", "{'asin': 'g', 'categories': 'Phones'}", "categories must be a list of lists"),
        ("meta", "{'title': 'no asin at all'}", "missing field 'asin'"),
    ],
)
def test_malformed_line_names_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], which: str, line: str, reason: str
) -> None:
    reviews, meta = write_dataset(tmp_path)
    path = reviews if which == "reviews" else meta
    lines = path.read_text().splitlines()
    lines.insert(2, line)  # becomes line 3
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as e:
        prepare(reviews, meta, tmp_path / "out")
    assert f"{path.name}:3:" in str(e.value) and reason in str(e.value)

    code = din_main(
        ["prepare", "--reviews", str(reviews), "--meta", str(meta), "--out", str(tmp_path / "o2")]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert f"{path.name}:3:" in err and "Traceback" not in err


def test_a_bad_max_history_is_a_project_error_and_one_clean_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reviews, meta = write_dataset(tmp_path)
    with pytest.raises(InvalidArgument, match="max_history must be at least 1, got 0"):
        prepare(reviews, meta, tmp_path / "out", max_history=0)
    argv = ["prepare", "--reviews", str(reviews), "--meta", str(meta), "--out", str(tmp_path / "o2")]
    assert din_main([*argv, "--max-history", "0"]) == 2
    assert capsys.readouterr().err == "din prepare: error: max_history must be at least 1, got 0\n"


def test_unwanted_meta_lines_are_not_parsed(tmp_path: Path) -> None:
    reviews, meta = write_dataset(tmp_path, literal=True)
    with meta.open("a") as f:
        f.write(
            "{'asin': 'not-reviewed', 'categories': [[broken\n\n"
        )  # skipped by its asin; blank line ignored
    info = prepare(reviews, meta, tmp_path / "out")
    assert info["n_items"] == len(ITEMS)


def test_missing_file_and_cli_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    reviews, _ = write_dataset(tmp_path)
    code = din_main(
        ["prepare", "--reviews", str(reviews), "--meta", str(tmp_path / "nope.json"), "--out", "x"]
    )
    assert code == 2 and "nope.json" in capsys.readouterr().err


def test_data_error_is_the_trees() -> None:
    """The service imports DataError from model.data: it must be the one in contracts.errors."""
    assert model.data.DataError is DataError and issubclass(DataError, DinError)


def test_all_users_too_short(tmp_path: Path) -> None:
    reviews = write_lines(
        tmp_path / "r.json", [json.dumps({"reviewerID": "u", "asin": "a", "unixReviewTime": 1})] * 2
    )
    meta = write_lines(tmp_path / "m.json", [])
    with pytest.raises(DataError, match="at least 3 events"):
        prepare(reviews, meta, tmp_path / "out")


def test_negatives_never_touched_and_deterministic(
    prepared_data: Path, synth_raw: Path, tmp_path: Path
) -> None:
    p = load_prepared(prepared_data)
    n_items = len(p.items)
    owner = np.repeat(np.arange(len(p.users)), np.diff(p.seq_offsets))
    touched = set((owner * n_items + p.seq_items).tolist())
    for name in ("train", "valid", "test"):
        s = p.split(name)
        neg = s.label == 0
        assert neg.sum() == (~neg).sum()
        assert s.target[neg].min() >= 2 and s.target[neg].max() < n_items
        keys = s.user[neg].astype(np.int64) * n_items + s.target[neg]
        assert not touched.intersection(keys.tolist())
        pos_keys = s.user[~neg].astype(np.int64) * n_items + s.target[~neg]
        assert touched.issuperset(pos_keys.tolist())

    again = tmp_path / "again"
    other = tmp_path / "other"
    raw = (synth_raw / "reviews.json.gz", synth_raw / "meta.json.gz")
    prepare(*raw, again, max_history=p.max_history, seed=0)
    prepare(*raw, other, max_history=p.max_history, seed=1)
    for name in ("train.npz", "valid.npz", "test.npz", "sequences.npz", "item_cate.npy", "items.txt"):
        assert (again / name).read_bytes() == (prepared_data / name).read_bytes(), name
    a, b = load_prepared(again), load_prepared(other)
    assert np.array_equal(a.train.target[0::2], b.train.target[0::2])  # positives do not depend on the seed
    assert not np.array_equal(a.train.target[1::2], b.train.target[1::2])
