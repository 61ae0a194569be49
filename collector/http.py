"""The collector's HTTP side: a JSON read API, Prometheus ``/metrics`` and the fleet page.

Standard library only (``http.server``), so an on-prem collector needs nothing beyond the
``collector`` extra. Every error is JSON built from the exception's type through ``ERRORS``;
an unexpected exception is a logged 500, never a dead server.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from .errors import BadRequestError, NotFoundError, StorageError
from .ingest import IngestStats
from .storage import Storage

log = logging.getLogger(__name__)

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Exception type -> (HTTP status, error code). Looked up along the MRO, so a subclass of a
# listed error answers like its parent; never decided from message text.
ERRORS: dict[type[Exception], tuple[HTTPStatus, str]] = {
    NotFoundError: (HTTPStatus.NOT_FOUND, "not_found"),
    BadRequestError: (HTTPStatus.BAD_REQUEST, "bad_request"),
    StorageError: (HTTPStatus.SERVICE_UNAVAILABLE, "storage_unavailable"),
}

BUNDLE_FIELDS = {
    "bundle_id": "id",
    "bundle_name": "name",
    "bundle_version": "version",
    "profile": "profile",
    "backend": "backend",
    "recipe": "recipe",
}


class CollectorHTTPServer(ThreadingHTTPServer):
    """A threading HTTP server that carries what the handlers read."""

    daemon_threads = True

    def __init__(self, address, storage: Storage, ingest_stats: IngestStats, collector=None):
        self.storage = storage
        self.ingest_stats = ingest_stats
        self.collector = collector
        self.page = resources.files(__package__).joinpath("page.html").read_bytes()
        super().__init__(address, _Handler)

    def handle_error(self, request, client_address) -> None:
        # socketserver prints these to stderr; route them to logging like everything else.
        log.debug("connection from %s failed", client_address, exc_info=True)


def make_server(
    storage: Storage,
    ingest_stats: IngestStats,
    host: str = "127.0.0.1",
    port: int = 0,
    collector=None,
) -> ThreadingHTTPServer:
    """Bind the collector's HTTP server (API, ``/metrics``, fleet page); do not start it.

    Args:
        storage: The telemetry database to read from.
        ingest_stats: The ingest counters exposed on ``/metrics``.
        host: Address to bind.
        port: Port to bind; 0 picks a free one (read it back from ``server.server_address``).
        collector: The running ``collector.service.Collector``, if any, for its connection
            state and backlog on ``/metrics``.

    Returns:
        The bound server; call ``serve_forever`` (or ``serve_in_thread``) and ``shutdown``.
    """
    return CollectorHTTPServer((host, port), storage, ingest_stats, collector)


def serve_in_thread(server: ThreadingHTTPServer) -> threading.Thread:
    """Run ``server.serve_forever`` in a daemon thread; stop it with ``server.shutdown()``."""
    thread = threading.Thread(target=server.serve_forever, name="collector-http", daemon=True)
    thread.start()
    return thread


# -- JSON API ---------------------------------------------------------------------------------
def _finite(value: Any) -> Any:
    """JSON without NaN or Infinity (browsers reject them): non-finite floats become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


def _with_bundle(device: dict[str, Any]) -> dict[str, Any]:
    """Fold the flat bundle columns into one ``bundle`` object (null before any birth)."""
    bundle = {name: device.pop(column, None) for column, name in BUNDLE_FIELDS.items()}
    device["bundle"] = bundle if any(value is not None for value in bundle.values()) else None
    return device


def _seconds(query: dict[str, list[str]], name: str) -> float | None:
    values = query.get(name)
    if not values:
        return None
    try:
        seconds = float(values[-1])
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds):
        raise BadRequestError(
            f"{name}={values[-1]!r} is not a time: give Unix seconds, e.g. {name}=1700000000.5"
        )
    return seconds


# -- Prometheus text format (0.0.4) ------------------------------------------------------------
def _escape_label(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _format_value(value: float) -> str:
    return str(int(value)) if isinstance(value, int) else repr(float(value))


@dataclass
class _Family:
    name: str
    kind: str  # gauge | counter
    help: str
    samples: list[tuple[dict[str, object], float]]

    def add(self, labels: dict[str, object], value: float | None) -> None:
        # A missing figure is no sample, never NaN: absence is what PromQL can reason about.
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            return
        self.samples.append((labels, value))

    def render(self) -> Iterable[str]:
        help_text = self.help.replace("\\", "\\\\").replace("\n", "\\n")
        yield f"# HELP {self.name} {help_text}"
        yield f"# TYPE {self.name} {self.kind}"
        for labels, value in self.samples:
            pairs = ",".join(f'{key}="{_escape_label(item)}"' for key, item in labels.items())
            selector = f"{self.name}{{{pairs}}}" if pairs else self.name
            yield f"{selector} {_format_value(value)}"


def _scaled(factor: float) -> Callable[[Any], float | None]:
    return lambda value: None if value is None else value * factor


# (metric name, type, help, column of the latest report, conversion to the metric's unit)
LATEST_REPORT_SERIES: list[tuple[str, str, str, str, Callable[[Any], float | None]]] = [
    ("edgepack_device_outbox_depth", "gauge", "Messages waiting in the device's outbox.",
     "outbox_depth", _scaled(1)),
    ("edgepack_device_outbox_dropped_total", "counter",
     "Messages the device's outbox dropped (full or too old) since its disk was set up.",
     "outbox_dropped", _scaled(1)),
    ("edgepack_device_cpu_percent", "gauge", "Runtime process CPU use in the latest report.",
     "cpu_percent", _scaled(1)),
    ("edgepack_device_rss_bytes", "gauge", "Runtime process resident memory.",
     "rss_mb", _scaled(2**20)),
    ("edgepack_device_memory_available_bytes", "gauge", "Memory available on the device.",
     "mem_available_mb", _scaled(2**20)),
    ("edgepack_device_disk_free_bytes", "gauge", "Free disk space on the device.",
     "disk_free_mb", _scaled(2**20)),
    ("edgepack_device_temperature_celsius", "gauge", "Device temperature (first thermal zone).",
     "temperature_c", _scaled(1)),
    ("edgepack_device_tokens_per_second", "gauge", "Generation speed in the latest report.",
     "tokens_per_s", _scaled(1)),
]  # fmt: skip


def render_prometheus(
    devices: list[dict[str, Any]],
    totals: dict[str, dict[str, Any]],
    stats: IngestStats,
    collector=None,
) -> str:
    """The Prometheus text exposition (format 0.0.4) of the fleet and the collector."""

    def family(name: str, kind: str, help_text: str) -> _Family:
        made = _Family(name, kind, help_text, [])
        families.append(made)
        return made

    families: list[_Family] = []
    info = family(
        "edgepack_device_info",
        "gauge",
        "Always 1; the labels say what the device runs (join on device).",
    )
    up = family("edgepack_device_up", "gauge", "1 if the device is online, 0 otherwise.")
    seen = family(
        "edgepack_device_last_seen_timestamp_seconds",
        "gauge",
        "When the collector last heard from the device (Unix seconds).",
    )
    latency = family(
        "edgepack_device_latency_seconds",
        "gauge",
        "Inference latency quantiles over the latest report's interval.",
    )
    inferences = family(
        "edgepack_device_inferences_total", "counter", "Inferences over all stored reports."
    )
    errors = family(
        "edgepack_device_errors_total", "counter", "Failed inferences over all stored reports."
    )
    reports = family("edgepack_device_reports_total", "counter", "Metrics reports stored.")
    missing = family(
        "edgepack_device_missing_messages",
        "gauge",
        "Telemetry messages the device numbered but the collector never stored.",
    )
    latest_families = [
        (family(name, kind, help_text), column, convert)
        for name, kind, help_text, column, convert in LATEST_REPORT_SERIES
    ]
    for device in devices:
        device_id = device["device_id"]
        labels = {"device": device_id, "fleet": device["fleet"]}
        info.add(
            {
                **labels,
                "bundle": device.get("bundle_name") or "",
                "bundle_version": device.get("bundle_version") or "",
                "profile": device.get("profile") or "",
                "backend": device.get("backend") or "",
                "recipe": device.get("recipe") or "",
                "runtime_version": device.get("runtime_version") or "",
            },
            1,
        )
        up.add(labels, 1 if device.get("status") == "online" else 0)
        seen.add(labels, device.get("last_seen"))
        missing.add(labels, device.get("missing_messages"))
        total = totals.get(device_id)
        if total is None:
            continue
        inferences.add(labels, total["inferences"])
        errors.add(labels, total["errors"])
        reports.add(labels, total["reports"])
        latest = total["latest"] or {}
        # Latency is what bundles are compared on, so it carries them; counters do not, as a
        # bundle upgrade would otherwise restart them under new labels with the old history.
        bundle = device.get("bundle_name")
        if bundle and device.get("bundle_version"):
            bundle = f"{bundle}@{device['bundle_version']}"
        tagged = {**labels, "profile": device.get("profile") or "", "bundle": bundle or ""}
        for quantile, column in (("0.5", "p50_ms"), ("0.95", "p95_ms"), ("0.99", "p99_ms")):
            value = latest.get(column)
            latency.add({**tagged, "quantile": quantile}, None if value is None else value / 1e3)
        for metric, column, convert in latest_families:
            metric.add(labels, convert(latest.get(column)))

    with stats.lock:
        counts = {
            "received": stats.received,
            "stored": stats.stored,
            "duplicate": stats.duplicates,
            "status": stats.statuses,
            "birth": stats.births,
        }
        rejected = dict(stats.rejected)
        batches = stats.batches
        quarantined, quarantine_failed = stats.quarantined, stats.quarantine_failed
    for name, value in counts.items():
        family(
            f"edgepack_collector_messages_{name}_total",
            "counter",
            f"Telemetry messages {_COUNT_HELP[name]} since the collector started.",
        ).add({}, value)
    rejections = family(
        "edgepack_collector_messages_rejected_total",
        "counter",
        "Telemetry messages refused since the collector started, by reason.",
    )
    for reason, value in sorted(rejected.items()):
        rejections.add({"reason": reason}, value)
    family("edgepack_collector_batches_total", "counter", "Storage transactions since start.").add(
        {}, batches
    )
    family(
        "edgepack_collector_messages_quarantined_total",
        "counter",
        "Refused messages written raw, with their error, to the quarantine table.",
    ).add({}, quarantined)
    family(
        "edgepack_collector_quarantine_failures_total",
        "counter",
        "Refused messages that could not even be quarantined (counted and acknowledged).",
    ).add({}, quarantine_failed)
    if collector is not None:
        family(
            "edgepack_collector_connected", "gauge", "1 while connected to the MQTT broker."
        ).add({}, 1 if collector.connected.is_set() else 0)
        family(
            "edgepack_collector_backlog_messages",
            "gauge",
            "Messages received but not yet stored.",
        ).add({}, collector.backlog())
        family(
            "edgepack_collector_sessions_lost_total",
            "counter",
            "New broker sessions given while ours should have lived: the broker lost its "
            "state, and messages with it.",
        ).add({}, collector.sessions_lost)
    lines = [line for metric in families for line in metric.render()]
    return "\n".join(lines) + "\n"


_COUNT_HELP = {
    "received": "received (valid or not)",
    "stored": "stored (metrics and events, duplicates excluded)",
    "duplicate": "dropped as already stored (redelivered or replayed)",
    "status": "of kind status processed",
    "birth": "of kind birth processed",
}


# -- request handling ------------------------------------------------------------------------
@dataclass(frozen=True)
class _Response:
    status: int
    content_type: str
    body: bytes


def _json_response(value: Any, status: int = HTTPStatus.OK) -> _Response:
    body = json.dumps(_finite(value), separators=(",", ":")).encode()
    return _Response(status, "application/json", body)


def _error_body(status: HTTPStatus, code: str, message: str) -> _Response:
    return _json_response({"status": int(status), "code": code, "message": message}, status)


def _route_page(server: CollectorHTTPServer, query) -> _Response:
    return _Response(HTTPStatus.OK, "text/html; charset=utf-8", server.page)


def _route_prometheus(server: CollectorHTTPServer, query) -> _Response:
    text = render_prometheus(
        server.storage.devices(),
        server.storage.metric_totals(),
        server.ingest_stats,
        server.collector,
    )
    return _Response(HTTPStatus.OK, PROMETHEUS_CONTENT_TYPE, text.encode())


def _route_devices(server: CollectorHTTPServer, query) -> _Response:
    return _json_response([_with_bundle(device) for device in server.storage.devices()])


def _route_device(server: CollectorHTTPServer, query, device_id: str) -> _Response:
    device = server.storage.device(device_id)
    if device is None:
        raise NotFoundError(f"no device {device_id!r} has reported to this collector")
    return _json_response(_with_bundle(device))


def _route_device_metrics(server: CollectorHTTPServer, query, device_id: str) -> _Response:
    since, until = _seconds(query, "since"), _seconds(query, "until")
    rows = server.storage.metrics(device_id, since=since, until=until)
    # Only an empty answer needs the (costlier) existence check.
    if not rows and server.storage.device(device_id) is None:
        raise NotFoundError(f"no device {device_id!r} has reported to this collector")
    return _json_response(rows)


def _route_quarantine(server: CollectorHTTPServer, query) -> _Response:
    rows = server.storage.quarantined(limit=100)
    for row in rows:
        payload = row.pop("payload")
        # The raw bytes as text, undecodable bytes escaped: enough to see what it was.
        row["payload_start"] = payload[:512].decode("utf-8", errors="backslashreplace")
    return _json_response(rows)


def _route_collector_events(server: CollectorHTTPServer, query) -> _Response:
    return _json_response(server.storage.collector_events(limit=20))


ROUTES: list[tuple[re.Pattern[str], Callable[..., _Response]]] = [
    (re.compile(r"/api/quarantine"), _route_quarantine),
    (re.compile(r"/api/collector/events"), _route_collector_events),
    (re.compile(r"/"), _route_page),
    (re.compile(r"/metrics"), _route_prometheus),
    (re.compile(r"/api/devices"), _route_devices),
    (re.compile(r"/api/devices/([^/]+)"), _route_device),
    (re.compile(r"/api/devices/([^/]+)/metrics"), _route_device_metrics),
]


def _error_for(exc: Exception) -> tuple[HTTPStatus, str] | None:
    for cls in type(exc).__mro__:
        if cls in ERRORS:
            return ERRORS[cls]
    return None


class _Handler(BaseHTTPRequestHandler):
    server: CollectorHTTPServer
    server_version = "edge-collector"

    def do_GET(self) -> None:
        self._answer(self._respond(), with_body=True)

    def do_HEAD(self) -> None:
        self._answer(self._respond(), with_body=False)

    def _respond(self) -> _Response:
        url = urlsplit(self.path)
        query = parse_qs(url.query, keep_blank_values=True)
        try:
            for pattern, route in ROUTES:
                match = pattern.fullmatch(url.path)
                if match:
                    return route(self.server, query, *(unquote(g) for g in match.groups()))
            raise NotFoundError(
                f"no such path {url.path!r}: try /, /metrics, /api/devices, "
                "/api/devices/<id>, /api/devices/<id>/metrics, /api/quarantine or "
                "/api/collector/events"
            )
        except Exception as exc:
            mapped = _error_for(exc)
            if mapped is None:
                log.exception("GET %s failed", self.path)
                return _error_body(
                    HTTPStatus.INTERNAL_SERVER_ERROR,
                    "internal",
                    f"the collector failed to answer ({type(exc).__name__}); see its log",
                )
            status, code = mapped
            return _error_body(status, code, str(exc))

    def _answer(self, response: _Response, with_body: bool) -> None:
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        self.send_header("Cache-Control", "no-store")  # live data: never serve it stale
        self.end_headers()
        if with_body:
            self.wfile.write(response.body)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None):
        """Protocol-level errors (bad request line, unsupported method) as JSON too."""
        status = HTTPStatus(code)
        self.close_connection = True
        response = _error_body(status, status.phrase.lower().replace(" ", "_"), message or "")
        self._answer(response, with_body=self.command != "HEAD")

    def log_message(self, format: str, *args: object) -> None:
        log.debug("%s %s", self.address_string(), format % args)
