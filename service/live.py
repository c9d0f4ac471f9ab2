"""The one holder of the live model, and hot reload: every reader of "the model being served" goes
through here.

Readers take `current` once per unit of work (a request, a batch) and keep that object until the
work is done, so replacing the live model never changes a model under a batch that is running:
in-flight batches finish on the model they started with, and each answer names the version that
scored it. A reload loads, verifies and warms the new bundle beside the live one (the live one keeps
serving meanwhile), then swaps one reference; on any failure the live one simply stays.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from contracts.bundle import load_bundle
from contracts.errors import BundleError, NotReady, ReloadFailed, ReloadInProgress, ReloadRejected
from service.config import Settings
from service.metrics import Metrics
from service.ranker import Ranker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Reloaded:
    model_version: str
    previous_version: str | None
    bundle: Path
    seconds: float


class LiveModel:
    def __init__(self, ranker: Ranker | None = None) -> None:
        self._ranker = ranker
        self._reloading = False  # the event loop is single-threaded: a flag is the lock

    @property
    def loaded(self) -> bool:
        return self._ranker is not None

    @property
    def current(self) -> Ranker:
        """The model serving now. Raises NotReady before the first one is loaded."""
        if self._ranker is None:
            raise NotReady("the model is not loaded yet", reason="starting")
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
                new = await asyncio.to_thread(load_ranker, settings, path)
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
        finally:
            self._reloading = False
        metrics.reloads.labels(outcome="ok").inc()
        describe(metrics, new)
        seconds = time.perf_counter() - t0
        log.info("reloaded %s in %.2fs: %s -> %s", path, seconds, old, new.model_version)
        return Reloaded(new.model_version, old, path, seconds)


def load_ranker(settings: Settings, bundle: Path | None = None) -> Ranker:
    """Load and verify a bundle (default: the configured one) into an ONNX Runtime session, not
    warmed up yet. Raises BundleError naming the file on anything missing, corrupt or refused."""
    return Ranker(
        load_bundle(bundle or settings.bundle),
        providers=settings.provider_list,
        intra_op_threads=settings.threads_per_call,
    )


def describe(metrics: Metrics, ranker: Ranker) -> None:
    """Publish the live model in the metrics and the log."""
    metrics.model_info.info(
        {
            "model_version": ranker.model_version,
            "format_version": str(ranker.bundle.manifest.get("format_version", "")),
            "max_history": str(ranker.max_history),
            "providers": ",".join(ranker.providers),
        }
    )
    log.info(
        "serving bundle %s model_version=%s providers=%s",
        ranker.bundle.path,
        ranker.model_version,
        ",".join(ranker.providers),
    )
