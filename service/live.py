"""The one holder of the live models, and hot reload: every reader of "the model being served" goes
through here. `ModelSet` holds named members (`LiveModel`), each a slot with its ranker, its reload,
its metrics and its cost estimate; today there is one, `default`, and "the model" means it.

Readers take `current` once per unit of work (a request, a batch) and keep that object until the
work is done, so replacing the live model never changes a model under a batch that is running:
in-flight batches finish on the model they started with, and each answer names the version that
scored it. A reload loads, verifies and warms the new bundle beside the live one (the live one keeps
serving meanwhile), then swaps one reference; on any failure the live one simply stays.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from contracts.bundle import load_bundle
from contracts.errors import BundleError, NotReady, ReloadFailed, ReloadInProgress, ReloadRejected
from service.config import Settings
from service.costs import Costs
from service.metrics import Metrics
from service.ranker import Ranker

log = logging.getLogger(__name__)

DEFAULT_MODEL = "default"  # the member "the model" means (today the only one)


@dataclass(frozen=True)
class Reloaded:
    model_version: str
    previous_version: str | None
    bundle: Path
    seconds: float


class LiveModel:
    """One member of the model set: a named slot whose ranker a reload replaces, and what its work
    recently cost (admission's estimate: versions differ in what a candidate costs)."""

    def __init__(self, ranker: Ranker | None = None, name: str = DEFAULT_MODEL) -> None:
        self.name = name
        self._ranker = ranker
        self._reloading = False  # the event loop is single-threaded: a flag is the lock
        self.costs = Costs()
        self.memory_bytes: int | None = None  # resident memory its load took (None: not measured)

    @property
    def loaded(self) -> bool:
        return self._ranker is not None

    @property
    def current(self) -> Ranker:
        """The model serving now. Raises NotReady before the first one is loaded."""
        if self._ranker is None:
            raise NotReady(f"the model {self.name!r} is not loaded yet", reason="starting")
        return self._ranker

    def swap(self, ranker: Ranker) -> Ranker | None:
        """Make `ranker` the live model; returns the one it replaces."""
        old, self._ranker = self._ranker, ranker
        return old

    async def reload(self, settings: Settings, metrics: Metrics, bundle: Path | None = None) -> Reloaded:
        """Load, verify and warm `bundle` (default: the configured one) beside the live model, then swap.

        Raises ReloadInProgress (another reload runs), ReloadRejected (the bundle failed verification or
        cannot be loaded) or ReloadFailed (its warm-up failed); the live model serves on in every case.
        """
        path = Path(bundle or settings.bundle)
        old = self.current.model_version if self.loaded else None
        if self._reloading:
            metrics.reloads.labels(outcome="busy").inc()
            raise ReloadInProgress(f"a reload is already running; still serving {old}")
        self._reloading = True
        t0 = time.perf_counter()
        try:
            try:
                new, memory = await asyncio.to_thread(load_measured, settings, path)
            except BundleError as e:
                metrics.reloads.labels(outcome="rejected").inc()
                raise ReloadRejected(f"{e}; still serving {old}", still_serving=old) from None
            try:
                await asyncio.to_thread(new.warmup, max(1, settings.warmup_rounds))
            except Exception as e:
                metrics.reloads.labels(outcome="failed").inc()
                log.exception("reload of %s: warm-up failed", path)
                raise ReloadFailed(
                    f"bundle {path}: the model failed its warm-up; still serving {old}", still_serving=old
                ) from e
            self.swap(new)
            self.memory_bytes = memory
        finally:
            self._reloading = False
        metrics.reloads.labels(outcome="ok").inc()
        describe(metrics, new, self.name)
        seconds = time.perf_counter() - t0
        log.info("reloaded %s in %.2fs: %s -> %s", path, seconds, old, new.model_version)
        return Reloaded(new.model_version, old, path, seconds)


class ModelSet:
    """The models being served, by name. A unit of work (a batch) takes one member's `current` once
    and keeps it to the end. `current`, `loaded`, `swap` and `reload` speak of the default member."""

    def __init__(self, *members: LiveModel) -> None:
        self._members = {m.name: m for m in members} or {DEFAULT_MODEL: LiveModel()}
        if DEFAULT_MODEL not in self._members:
            raise ValueError(f"a model set needs a {DEFAULT_MODEL!r} member")

    @classmethod
    def single(cls, ranker: Ranker | None = None) -> ModelSet:
        """A set of one member, `default`, serving `ranker`."""
        return cls(LiveModel(ranker))

    def __iter__(self) -> Iterator[LiveModel]:
        return iter(self._members.values())

    def get(self, name: str) -> LiveModel:
        return self._members[name]

    def find(self, name: str) -> LiveModel | None:
        return self._members.get(name)

    def add(self, member: LiveModel) -> None:
        """A new member (a version a routing needs: `service.routing`); its name must be new."""
        if member.name in self._members:
            raise ValueError(f"the model set already has a member {member.name!r}")
        self._members[member.name] = member

    def remove(self, name: str) -> LiveModel:
        """Take member `name` out (never the default one); batches that hold its model finish on it."""
        if name == DEFAULT_MODEL:
            raise ValueError("the default member stays")
        return self._members.pop(name)

    def __len__(self) -> int:
        return len(self._members)

    @property
    def default(self) -> LiveModel:
        return self._members[DEFAULT_MODEL]

    @property
    def loaded(self) -> bool:
        """Every member has a model."""
        return all(m.loaded for m in self)

    @property
    def current(self) -> Ranker:
        """The default member's model. Raises NotReady before it is loaded."""
        return self.default.current

    def versions(self) -> dict[str, str]:
        """Each loaded member's model version, by name."""
        return {m.name: m.current.model_version for m in self if m.loaded}

    def swap(self, ranker: Ranker) -> Ranker | None:
        """Make `ranker` the default member's model; returns the one it replaces."""
        return self.default.swap(ranker)

    async def reload(
        self, settings: Settings, metrics: Metrics, bundle: Path | None = None, name: str = DEFAULT_MODEL
    ) -> Reloaded:
        """`LiveModel.reload` of the member `name`."""
        return await self.get(name).reload(settings, metrics, bundle)


def load_ranker(
    settings: Settings, bundle: Path | None = None, *, intra_op_threads: int | None = None
) -> Ranker:
    """Load and verify a bundle (default: the configured one) into an ONNX Runtime session, not
    warmed up yet (`intra_op_threads`: default DIN_INTRA_OP_THREADS, resolved). Raises BundleError
    naming the file on anything missing, corrupt or refused."""
    return Ranker(
        load_bundle(bundle or settings.bundle),
        providers=settings.provider_list,
        intra_op_threads=intra_op_threads or settings.threads_per_call,
        precision=settings.precision,
    )


def resident_bytes() -> int | None:
    """This process's resident memory (Linux /proc/self/statm), or None where it cannot be read."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


def load_measured(
    settings: Settings, bundle: Path | None = None, *, intra_op_threads: int | None = None
) -> tuple[Ranker, int | None]:
    """`load_ranker`, and the resident memory the load took (None where it cannot be read): what
    /admin/models reports per version (one load at a time, or the figures mix)."""
    before = resident_bytes()
    ranker = load_ranker(settings, bundle, intra_op_threads=intra_op_threads)
    after = resident_bytes()
    return ranker, (max(0, after - before) if before is not None and after is not None else None)


def load_member(settings: Settings, name: str, bundle: Path, *, shadow: bool = False) -> LiveModel:
    """Load, verify and warm `bundle` as a new member `name`, measuring the resident memory it took
    (one load at a time: the caller serializes them). Raises BundleError; a failed warm-up raises too.
    `shadow`: one ONNX Runtime thread, the caller's (service.shadow runs it at the idle scheduling
    class; an intra-op pool's own threads would run at normal priority beside the served requests)."""
    ranker, memory = load_measured(settings, bundle, intra_op_threads=1 if shadow else None)
    ranker.warmup(max(1, settings.warmup_rounds))
    member = LiveModel(ranker, name)
    member.memory_bytes = memory
    return member


def describe(metrics: Metrics, ranker: Ranker, name: str = DEFAULT_MODEL) -> None:
    """Publish member `name`'s model in the metrics (din_models_info{model=name}, and din_model_info
    for the default member) and the log."""
    info = {
        "model_version": ranker.model_version,
        "format_version": str(ranker.bundle.manifest.get("format_version", "")),
        "max_history": str(ranker.max_history),
        "providers": ",".join(ranker.providers),
        "precision": ranker.precision,
    }
    metrics.models_info.labels(model=name).info(info)
    if name == DEFAULT_MODEL:
        metrics.model_info.info(info)
    log.info(
        "serving %s: bundle %s model_version=%s providers=%s precision=%s",
        name,
        ranker.bundle.path,
        ranker.model_version,
        ",".join(ranker.providers),
        ranker.precision,
    )
