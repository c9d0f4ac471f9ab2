"""Shared model fixtures: one small synthetic raw data set and its prepared data, made once per session.

Small on purpose (300 users, 400 items, ~3.6k reviews; about a second to make) so training, scoring
and export tests can reuse them. Treat both directories as read-only.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from model.data import prepare
from model.synth import SynthParams, generate

SYNTH_PARAMS = SynthParams(users=300, items=400, categories=8, events_per_user=12.0, seed=7)
PREPARED_MAX_HISTORY = 30  # below the longest users' histories, so truncation is exercised


@pytest.fixture(scope="session")
def synth_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A `din synth` raw dir: reviews.json.gz, meta.json.gz, truth.npz, truth.json."""
    out = tmp_path_factory.mktemp("synth") / "raw"
    generate(out, SYNTH_PARAMS)
    return out


@pytest.fixture(scope="session")
def prepared_data(synth_raw: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`din prepare` of synth_raw (max_history 30, seed 0): load it with model.data.load_prepared."""
    out = tmp_path_factory.mktemp("prepared") / "data"
    prepare(
        synth_raw / "reviews.json.gz",
        synth_raw / "meta.json.gz",
        out,
        max_history=PREPARED_MAX_HISTORY,
        seed=0,
    )
    return out
