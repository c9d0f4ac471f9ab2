"""The lock (requirements/, `make lock`): exact versions with hashes, one resolution across the sets,
torch's CPU build, every pin inside pyproject.toml's ranges, and this environment installed from it."""

from __future__ import annotations

import os
import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
REQ = ROOT / "requirements"
SETS = ("dev", "serve", "train", "gpu", "torch")
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==(\S+)")


def read_lock(name: str) -> dict[str, tuple[str, list[str]]]:
    """{canonical name: (version, [sha256 hashes])} of one requirements file."""
    pins: dict[str, tuple[str, list[str]]] = {}
    current = ""
    for line in (REQ / f"{name}.txt").read_text().splitlines():
        m = _PIN.match(line)
        if m:
            current = canonicalize_name(m.group(1))
            assert current not in pins, f"{name}.txt pins {current} twice"
            pins[current] = (m.group(2), [])
        for h in re.findall(r"--hash=sha256:([0-9a-f]{64})", line):
            pins[current][1].append(h)
    return pins


@pytest.fixture(scope="module")
def locks() -> dict[str, dict[str, tuple[str, list[str]]]]:
    return {name: read_lock(name) for name in SETS}


def _declared() -> dict[str, list[Requirement]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    out = {"": [Requirement(r) for r in project["dependencies"]]}
    for extra, reqs in project["optional-dependencies"].items():
        out[extra] = [Requirement(r) for r in reqs]
    return out


def test_every_pin_is_exact_and_hashed(locks: dict[str, dict[str, tuple[str, list[str]]]]) -> None:
    for name, pins in locks.items():
        assert pins, f"{name}.txt pins nothing"
        for pkg, (version, hashes) in pins.items():
            assert hashes, f"{name}.txt: {pkg}=={version} has no hash (pip --require-hashes would refuse it)"
        text = (REQ / f"{name}.txt").read_text()
        assert "--find-links" not in text and "--index-url" not in text, f"{name}.txt names a machine's index"


def test_the_sets_are_one_resolution(locks: dict[str, dict[str, tuple[str, list[str]]]]) -> None:
    dev = locks["dev"]
    for name in ("serve", "train", "torch"):
        for pkg, (version, hashes) in locks[name].items():
            assert pkg in dev, f"{name}.txt pins {pkg}, which dev.txt (the whole resolution) lacks"
            assert dev[pkg] == (version, hashes), f"{name}.txt and dev.txt disagree on {pkg}"
    for pkg, (version, _) in locks["gpu"].items():  # resolved for the CUDA base's Python
        if pkg in dev:
            assert dev[pkg][0] == version, f"gpu.txt and dev.txt disagree on {pkg}"


def test_torch_is_the_cpu_build_and_stays_out_of_the_service(
    locks: dict[str, dict[str, tuple[str, list[str]]]],
) -> None:
    for name in ("dev", "train", "torch"):
        assert locks[name]["torch"][0] == "2.13.0+cpu", f"{name}.txt: {locks[name]['torch'][0]}"
        assert not [p for p in locks[name] if p.startswith("nvidia-") or p == "triton"], name
    assert list(locks["torch"]) == ["torch"]
    for name in ("serve", "gpu"):
        assert "torch" not in locks[name] and "onnx" not in locks[name], f"{name}.txt would ship torch"
    assert "onnxruntime" in locks["serve"] and "onnxruntime-gpu" not in locks["serve"]
    assert "onnxruntime-gpu" in locks["gpu"] and "onnxruntime" not in locks["gpu"]  # one module, one build


def test_every_declared_dependency_is_pinned_inside_its_range(
    locks: dict[str, dict[str, tuple[str, list[str]]]],
) -> None:
    declared = _declared()
    where = {"": ("dev", "serve", "train", "gpu"), "train": ("dev", "train"), "dev": ("dev",)}
    where |= {"serve-common": ("dev", "serve", "train", "gpu"), "serve": ("dev", "serve", "train")}
    where |= {"gpu": ("gpu",)}
    for extra, reqs in declared.items():
        for req in reqs:
            name = canonicalize_name(req.name)
            if name == "din-rank":
                continue  # the project's own extras, expanded above
            for lock in where[extra]:
                assert name in locks[lock], f"{lock}.txt lacks {req} (extra {extra or 'core'}): make lock"
                version = Version(locks[lock][name][0])
                assert req.specifier.contains(version, prereleases=True), (
                    f"{lock}.txt pins {name}=={version}, outside pyproject's {req}: make lock"
                )


@pytest.mark.skipif(os.environ.get("DIN_TEST_LATEST") == "1", reason="make test-latest: not the lock")
def test_this_environment_was_installed_from_the_lock(
    locks: dict[str, dict[str, tuple[str, list[str]]]],
) -> None:
    wrong = []
    for pkg, (version, _) in locks["dev"].items():
        try:
            installed = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            wrong.append(f"{pkg}: not installed (lock {version})")
            continue
        if Version(installed) != Version(version):
            wrong.append(f"{pkg}: {installed} installed, lock {version}")
    assert not wrong, "the environment is not the lock's (make install):\n" + "\n".join(wrong)
