"""A served language model (GGUF) in `edge-runtime serve`: loading, the self-test,
readiness and shutdown. The requests themselves go to ``text_models.LanguageModelHost``
(the OpenAI-shaped answers, one request at a time behind a bounded queue), built on the
runtime once it has loaded and passed its self-test.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .models import BundleRef
from .protocol import NotReady

log = logging.getLogger(__name__)


class GgufModelHost:
    """``protocol.LanguageModel`` over a GGUF bundle's llama-cpp-python engine."""

    def __init__(
        self,
        ref: BundleRef,
        pubkey: Path | None = None,
        *,
        threads: int | None = None,
        queue_size: int = 16,
        telemetry: Any = None,
    ) -> None:
        if ref.manifest.llm is None:
            raise ValueError(f"bundle {ref.path} holds no language model")
        self.name = ref.name
        self.ref = ref
        self.context_length = ref.manifest.llm.context_length
        self.queue_size = queue_size
        self._pubkey = pubkey
        self._threads = threads
        self._telemetry = telemetry
        self.runtime = None
        self.problem: str | None = "loading"
        self._closing = False
        self._requests = None  # text_models.LanguageModelHost, once loaded

    def load(self) -> bool:
        """Open the bundle and check its greedy tokens; returns whether it is ready.

        Raises:
            EdgeRuntimeError: the bundle cannot be verified or loaded.
        """
        from ..agent import open_reported

        self.runtime = open_reported(self.ref.path, self._pubkey, self._threads, self._telemetry)
        report = self.runtime.selftest()
        if not report.passed:
            self.problem = (
                f"model {self.name!r} failed its self-test: {report.matched_tokens} of "
                f"{report.expected_tokens} greedy tokens match the build host's"
            )
            log.error("%s; it is not served", self.problem)
            return False
        from .text_models import LanguageModelHost as Requests

        self._requests = Requests(self.runtime, self.name, queue=self.queue_size)
        self.problem = None
        return True

    @property
    def ready(self) -> bool:
        return self.problem is None and not self._closing

    @property
    def depth(self) -> int:
        return self._requests.admission.depth if self._requests is not None else 0

    def close(self, timeout_s: float = 10.0) -> None:
        """Refuse new requests, wait up to ``timeout_s`` for the running one, release."""
        self._closing = True
        if self._requests is not None:
            self._requests.admission.drain(timeout_s)
        if self.runtime is not None:
            self.runtime.close()

    def complete(self, request: dict[str, Any]) -> Any:
        """``text_models.LanguageModelHost.complete`` once the model is ready.

        Raises:
            NotReady: loading, failed its self-test, or shutting down.
            BadRequest, Overloaded: as ``text_models.LanguageModelHost.complete``.
        """
        if not self.ready or self._requests is None:
            raise NotReady(f"model {self.name!r} is not ready: {self.problem or 'stopping'}")
        return self._requests.complete(request)
