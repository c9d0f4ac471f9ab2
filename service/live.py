"""The one holder of the live model: every reader of "the model being served" goes through here.

Readers take `current` once per unit of work (a request, a batch) and keep that object until the
work is done, so replacing the live model (a hot reload swaps one reference) never changes a model
under a batch that is running: in-flight batches finish on the model they started with, and each
answer names the version that scored it.
"""

from __future__ import annotations

from model.bundle import load_bundle
from model.errors import NotReady
from service.config import Settings
from service.ranker import Ranker


class LiveModel:
    def __init__(self, ranker: Ranker | None = None) -> None:
        self._ranker = ranker

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


def load_ranker(settings: Settings) -> Ranker:
    """Load and verify the configured bundle into an ONNX Runtime session (not warmed up yet).
    Raises BundleError naming the file on anything missing or corrupt."""
    return Ranker(
        load_bundle(settings.bundle),
        providers=settings.provider_list,
        intra_op_threads=settings.intra_op_threads,
    )
