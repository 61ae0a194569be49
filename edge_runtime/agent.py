"""``edge-runtime agent``: load a bundle, self-test it, and report to the fleet over MQTT."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import Field

from .errors import EdgeRuntimeError
from .telemetry.client import TelemetryClient, TelemetrySettings

if TYPE_CHECKING:
    from .runtime import Runtime

log = logging.getLogger(__name__)
ENV_PREFIX = "EDGE_RUNTIME_"


class AgentSettings(TelemetrySettings):
    """Everything ``edge-runtime agent`` needs: flags, EDGE_RUNTIME_* variables or --config."""

    bundle: Path = Field(description="the .edgepkg to load")
    pubkey: Path | None = Field(None, description="public key; else $EDGEPACK_TRUSTED_KEYS")
    demo_load: float | None = Field(
        None,
        ge=0,
        description="requests/s made from the self-test vectors (or prompt)",
    )
    threads: int | None = Field(
        None,
        ge=0,
        description="thread count to use as given; unset, the profile's is capped at the "
        "CPUs this process may use",
    )


DEMO_COMPLETION_TOKENS = 16


def demo_requests(runtime, rate: float, stop: threading.Event) -> int:
    """Run the self-test inputs round-robin at ``rate`` per second until ``stop``."""
    from .selftest import load_vectors

    spec = runtime.manifest.selftest
    if spec.kind == "greedy-tokens":
        # A language model's request: a short completion of the self-test prompt.

        def request(index: int) -> None:
            runtime.generate(spec.prompt, max_tokens=DEMO_COMPLETION_TOKENS, seed=index).read()

    else:
        inputs, _ = load_vectors(runtime.model_dir / spec.path)
        count = spec.count
        samples = [{k: v[i : i + 1] for k, v in inputs.items()} for i in range(count)]

        def request(index: int) -> None:
            runtime.run(samples[index % count])

    interval = 1.0 / rate
    next_at = time.monotonic()
    done = 0
    while not stop.is_set():
        request(done)
        done += 1
        next_at += interval
        delay = next_at - time.monotonic()
        if delay > 0:
            stop.wait(delay)
        elif delay < -1.0:  # fell far behind (slow model): do not try to catch up in a burst
            next_at = time.monotonic()
    return done


def open_reported(
    bundle: Path, pubkey: Path | None, threads: int | None, client: TelemetryClient | None
) -> Runtime:
    """``Runtime.open`` reporting to ``client``; a bundle that fails to verify or load is
    reported as a ``bundle_error`` event before the error is raised. ``agent`` and
    ``serve`` both open their bundles through here.

    Raises:
        EdgeRuntimeError: as ``Runtime.open``.
    """
    from .runtime import Runtime

    try:
        return Runtime.open(bundle, pubkey, threads=threads, telemetry=client)
    except EdgeRuntimeError as exc:
        if client is not None:
            # An event has a size limit (TelemetryError beyond it): a long message is cut.
            message = str(exc) if len(str(exc)) <= 2000 else str(exc)[:2000] + "…"
            client.event("bundle_error", "error", message=message, bundle=str(bundle))
        raise


def run_agent(settings: AgentSettings, stop: threading.Event | None = None) -> int:
    """Run until ``stop`` is set (or SIGTERM/SIGINT when run from the CLI).

    Returns the process exit code: 0, or 1 when the bundle's self-test failed.

    Raises:
        EdgeRuntimeError: the bundle cannot be verified or loaded (reported as an event first).
    """
    stop = stop or threading.Event()
    client = TelemetryClient(settings).start()
    try:
        runtime = open_reported(settings.bundle, settings.pubkey, settings.threads, client)
        with runtime:
            report = runtime.selftest()
            log.info(
                "agent %s/%s: boot %d, bundle %s %s, self-test %s",
                settings.fleet,
                settings.device_id,
                client.boot,
                runtime.manifest.name,
                runtime.manifest.version,
                "passed" if report.passed else "FAILED",
            )
            if settings.demo_load:
                demo_requests(runtime, settings.demo_load, stop)
            else:
                stop.wait()
        return 0 if report.passed else 1
    finally:
        client.stop()
