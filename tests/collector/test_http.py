"""The collector's HTTP side against a real SQLite database filled through the real Ingestor."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from collector.http import PROMETHEUS_CONTENT_TYPE, make_server, render_prometheus, serve_in_thread
from collector.ingest import Ingestor, IngestStats, RawMessage
from collector.storage import Storage
from edge_runtime.telemetry.protocol import SCHEMA_VERSION, Kind, topic

CHROMIUM = Path("/usr/bin/chromium")
NOW = time.time()
FLEET = "shop"
BUNDLES = {
    "pi-01": {
        "id": "sha256:1111",
        "name": "digits-cnn",
        "version": "1.2.0",
        "profile": "raspberry-pi-4",
        "backend": "onnx",
        "recipe": "int8-static",
    },
    "jetson-02": {
        "id": "sha256:2222",
        "name": "minilm",
        "version": "0.3.1",
        "profile": "jetson-orin-nano",
        "backend": "onnx",
        "recipe": "fp16",
    },
}
# Per device: (inferences, errors, p50, p95, p99) of each 10 s report, oldest first.
REPORTS = {
    "pi-01": [(100, 0, 4.0, 9.0, 12.0), (120, 1, 4.5, 9.5, 13.0), (80, 0, 5.0, 11.0, 15.0)],
    "jetson-02": [(300, 3, 1.5, 2.5, 3.0), (310, 0, 1.6, 2.8, 3.5), (290, 2, 1.4, 2.6, 3.1),
                  (305, 0, 1.5, 2.7, 3.2)],
}  # fmt: skip


# -- payloads, as edge_runtime.telemetry.protocol defines them ------------------------------------
def payload(kind: Kind, ts: float, **body) -> bytes:
    return json.dumps({"schema": SCHEMA_VERSION, "ts": ts, **body}).encode()


def status(state: str, ts: float, boot: int = 1, reason: str | None = None) -> bytes:
    return payload(Kind.STATUS, ts, state=state, boot=boot, reason=reason)


def birth(device: str, ts: float, boot: int = 1) -> bytes:
    facts = {"machine": "aarch64", "os": "Linux", "cpu_count": 4}
    return payload(
        Kind.BIRTH, ts, boot=boot, runtime_version="0.1.0", device=facts, bundle=BUNDLES[device]
    )


def metrics(seq: int, ts: float, report: tuple, boot: int = 1, temperature=None) -> bytes:
    inferences, errors, p50, p95, p99 = report
    return payload(
        Kind.METRICS,
        ts,
        boot=boot,
        seq=seq,
        interval_s=10.0,
        inferences=inferences,
        errors=errors,
        latency={
            "count": inferences,
            "p50_ms": p50,
            "p95_ms": p95,
            "p99_ms": p99,
            "max_ms": p99 + 1,
            "mean_ms": p50 + 0.5,
            "buckets_ms": [1.0, 5.0, 10.0, 50.0],
            "counts": [0, inferences // 2, inferences - inferences // 2, 0, 0],
        },
        process={"cpu_percent": 37.5 + seq, "rss_mb": 80.0 + seq},
        system={
            "mem_total_mb": 3800.0,
            "mem_available_mb": 2100.0,
            "temperature_c": temperature,
            "disk_free_mb": 12000.0,
            "uptime_s": 5000.0 + 10 * seq,
        },
        outbox={"depth": seq, "dropped": 2},
    )


def event(seq: int, ts: float, boot: int = 1) -> bytes:
    return payload(
        Kind.EVENTS, ts, boot=boot, seq=seq, event="inference_error", level="error",
        data={"message": "input shape (1, 3) != (1, 64)", "count": 1},
    )  # fmt: skip


def messages() -> list[RawMessage]:
    """Two devices: births, statuses, metrics at 10 s intervals, one event, one gap in seqs."""
    raw = []

    def add(device: str, kind: Kind, body: bytes, ts: float) -> None:
        raw.append(RawMessage(topic(FLEET, device, kind), body, ts + 0.05))

    for device, reports in REPORTS.items():
        start = NOW - 10 * len(reports) - 5
        add(device, Kind.STATUS, status("online", start - 2), start - 2)
        add(device, Kind.BIRTH, birth(device, start - 1), start - 1)
        for index, report in enumerate(reports):
            temperature = 51.5 if device == "pi-01" else None
            ts = start + 10 * (index + 1)
            add(device, Kind.METRICS, metrics(index + 1, ts, report, temperature=temperature), ts)
    # pi-01's error event is seq 5: seq 4 never arrives, so one message is missing.
    add("pi-01", Kind.EVENTS, event(5, NOW - 3), NOW - 3)
    add("jetson-02", Kind.STATUS, status("offline", NOW - 1, reason="shutdown"), NOW - 1)
    return raw


# -- fixtures -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    storage = Storage(f"sqlite:///{tmp_path_factory.mktemp('db')}/fleet.db")
    ingestor = Ingestor(storage)
    ingestor.ingest(messages())
    ingestor.ingest([RawMessage("edgepack/v1/shop/pi-01/metrics", b"{not json", NOW)])
    server = make_server(storage, ingestor.stats)
    thread = serve_in_thread(server)
    host, port = server.server_address[:2]
    yield storage, ingestor, f"http://{host}:{port}"
    server.shutdown()
    thread.join(timeout=5)
    server.server_close()
    storage.close()


def get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read()


def get_json(url: str) -> tuple[int, object]:
    code, content_type, body = get(url)
    assert content_type == "application/json"
    return code, json.loads(body)


# -- JSON API -------------------------------------------------------------------------------------
def test_devices_lists_every_device_with_bundle_status_and_recent_figures(fleet):
    _, _, base = fleet

    code, devices = get_json(f"{base}/api/devices")

    assert code == 200
    assert [d["device_id"] for d in devices] == ["jetson-02", "pi-01"]
    jetson, pi = devices
    assert pi["fleet"] == FLEET and pi["status"] == "online"
    assert jetson["status"] == "offline" and jetson["status_reason"] == "shutdown"
    assert pi["bundle"] == BUNDLES["pi-01"]
    assert "bundle_name" not in pi and "recipe" not in pi  # folded into "bundle"
    assert pi["p95_ms"] == 11.0 and jetson["p95_ms"] == 2.8
    assert pi["error_rate"] == pytest.approx(1 / 300)
    assert jetson["error_rate"] == pytest.approx(5 / 1205)
    assert pi["last_seen"] == pytest.approx(NOW - 3 + 0.05)
    assert (pi["messages"], pi["missing_messages"]) == (4, 1)
    assert (jetson["messages"], jetson["missing_messages"]) == (4, 0)
    assert pi["runtime_version"] == "0.1.0" and pi["facts"]["machine"] == "aarch64"


def test_device_returns_one_device_with_events_and_status_history(fleet):
    _, _, base = fleet

    code, device = get_json(f"{base}/api/devices/pi-01")

    assert code == 200
    assert device["device_id"] == "pi-01"
    assert device["bundle"]["name"] == "digits-cnn"
    assert [e["event"] for e in device["recent_events"]] == ["inference_error"]
    assert device["recent_events"][0]["data"]["count"] == 1
    assert [s["state"] for s in device["status_history"]] == ["online"]


def test_device_metrics_returns_reports_in_time_order_within_since_and_until(fleet):
    _, _, base = fleet
    start = NOW - 10 * 3 - 5

    code, everything = get_json(f"{base}/api/devices/pi-01/metrics")
    _, window = get_json(f"{base}/api/devices/pi-01/metrics?since={start + 15}&until={start + 25}")

    assert code == 200
    assert [r["seq"] for r in everything] == [1, 2, 3]
    assert [r["inferences"] for r in everything] == [100, 120, 80]
    assert everything[-1]["p95_ms"] == 11.0 and everything[-1]["temperature_c"] == 51.5
    assert everything[0]["interval_s"] == 10.0 and everything[0]["outbox_depth"] == 1
    assert [r["seq"] for r in window] == [2]


@pytest.mark.parametrize(
    "path",
    ["/api/devices/nope", "/api/devices/nope/metrics", "/api/nothing", "/api/devices/pi-01/x"],
)
def test_unknown_device_or_path_is_a_404_json_error(fleet, path):
    _, _, base = fleet

    code, body = get_json(base + path)

    assert code == 404
    assert body["status"] == 404 and body["code"] == "not_found" and body["message"]


@pytest.mark.parametrize("query", ["since=abc", "until=abc", "since=", "since=nan"])
def test_a_time_that_is_not_a_number_is_a_400_json_error(fleet, query):
    _, _, base = fleet

    code, body = get_json(f"{base}/api/devices/pi-01/metrics?{query}")

    assert code == 400
    assert body["code"] == "bad_request" and "Unix seconds" in body["message"]


def test_an_unexpected_exception_is_a_logged_500_and_the_server_keeps_serving(
    fleet, monkeypatch, caplog
):
    storage, _, base = fleet

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(storage, "devices", broken)
    with caplog.at_level(logging.ERROR, logger="collector.http"):
        code, body = get_json(f"{base}/api/devices")
    monkeypatch.undo()

    assert code == 500
    assert body["code"] == "internal" and "disk on fire" not in body["message"]
    assert any(r.exc_info and "disk on fire" in str(r.exc_info[1]) for r in caplog.records)
    assert get_json(f"{base}/api/devices")[0] == 200


def test_an_unsupported_method_is_a_json_error_too(fleet):
    _, _, base = fleet
    request = urllib.request.Request(f"{base}/api/devices", data=b"{}", method="POST")

    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(request, timeout=10)

    assert raised.value.code == 501
    assert json.loads(raised.value.read())["code"] == "not_implemented"


# -- /metrics -------------------------------------------------------------------------------------
def scrape(base: str) -> dict[str, dict]:
    code, content_type, body = get(f"{base}/metrics")
    assert code == 200 and content_type == PROMETHEUS_CONTENT_TYPE
    families = text_string_to_metric_families(body.decode())
    return {family.name: family for family in families}


def value(family, **labels) -> float:
    matches = [s.value for s in family.samples if labels.items() <= s.labels.items()]
    assert len(matches) == 1, (family.name, labels, family.samples)
    return matches[0]


def test_prometheus_metrics_parse_and_hold_each_devices_figures(fleet):
    _, _, base = fleet

    families = scrape(base)

    up = families["edgepack_device_up"]
    assert up.type == "gauge"
    assert value(up, device="pi-01", fleet=FLEET) == 1
    assert value(up, device="jetson-02", fleet=FLEET) == 0
    inferences = families["edgepack_device_inferences"]  # the parser strips _total
    assert inferences.type == "counter"
    assert value(inferences, device="pi-01") == 300
    assert value(inferences, device="jetson-02") == 1205
    assert value(families["edgepack_device_errors"], device="jetson-02") == 5
    assert value(families["edgepack_device_reports"], device="jetson-02") == 4
    latency = families["edgepack_device_latency_seconds"]
    assert value(latency, device="pi-01", quantile="0.95") == pytest.approx(0.011)
    assert value(latency, device="jetson-02", quantile="0.5") == pytest.approx(0.0015)
    assert value(latency, device="pi-01", quantile="0.99", bundle="digits-cnn@1.2.0") > 0
    seen = families["edgepack_device_last_seen_timestamp_seconds"]
    assert value(seen, device="pi-01") == pytest.approx(NOW - 3 + 0.05)
    assert value(families["edgepack_device_outbox_depth"], device="pi-01") == 3
    assert value(families["edgepack_device_outbox_dropped"], device="pi-01") == 2
    assert value(families["edgepack_device_cpu_percent"], device="pi-01") == 40.5
    assert value(families["edgepack_device_rss_bytes"], device="pi-01") == 83 * 2**20
    assert value(families["edgepack_device_temperature_celsius"], device="pi-01") == 51.5
    assert value(families["edgepack_device_missing_messages"], device="pi-01") == 1
    info = families["edgepack_device_info"]
    assert value(info, device="jetson-02", recipe="fp16", profile="jetson-orin-nano") == 1


def test_prometheus_omits_missing_figures_rather_than_writing_nan(fleet):
    _, _, base = fleet

    families = scrape(base)
    text = get(f"{base}/metrics")[2].decode()

    temperature = families["edgepack_device_temperature_celsius"]
    assert [s.labels["device"] for s in temperature.samples] == ["pi-01"]
    assert "NaN" not in text and "None" not in text


def test_prometheus_counts_the_collectors_own_work(fleet):
    _, ingestor, base = fleet

    families = scrape(base)

    assert value(families["edgepack_collector_messages_received"]) == ingestor.stats.received
    assert value(families["edgepack_collector_messages_stored"]) == 8
    assert value(families["edgepack_collector_batches"]) == 2
    rejected = families["edgepack_collector_messages_rejected"]
    assert value(rejected, reason="malformed_json") == 1
    assert "edgepack_collector_connected" not in families  # no Collector given


def test_prometheus_escapes_label_values_and_reports_the_collector_connection():
    class FakeCollector:  # only what /metrics reads from collector.service.Collector
        class connected:  # noqa: N801 (mirrors the threading.Event attribute)
            @staticmethod
            def is_set() -> bool:
                return True

        @staticmethod
        def backlog() -> int:
            return 7

        sessions_lost = 2

    device = {"device_id": 'a"b\\c\nd', "fleet": "f", "status": "online", "last_seen": None}

    text = render_prometheus([device], {}, IngestStats(), FakeCollector())
    families = {f.name: f for f in text_string_to_metric_families(text)}

    assert 'device="a\\"b\\\\c\\nd"' in text
    assert value(families["edgepack_device_up"], device='a"b\\c\nd') == 1
    assert value(families["edgepack_collector_connected"]) == 1
    assert value(families["edgepack_collector_backlog_messages"]) == 7
    assert value(families["edgepack_collector_sessions_lost"]) == 2
    assert families["edgepack_device_last_seen_timestamp_seconds"].samples == []


# -- the fleet page in a real browser -------------------------------------------------------------
def chromium(profile: Path, url: str, *args: str) -> subprocess.CompletedProcess:
    command = [
        str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
        "--virtual-time-budget=5000", *args, url,
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Chromium at /usr/bin/chromium")
def test_fleet_page_shows_every_device_with_latency_and_throughput_charts(fleet, tmp_path):
    _, _, base = fleet

    dump = chromium(tmp_path / "profile-dom", f"{base}/", "--dump-dom")
    shot = tmp_path / "fleet.png"
    chromium(
        tmp_path / "profile-shot", f"{base}/", f"--screenshot={shot}", "--window-size=1280,900"
    )

    assert dump.returncode == 0, dump.stderr[-2000:]
    dom = dump.stdout
    assert 'id="devices"' in dom
    for device in ("pi-01", "jetson-02"):
        assert f'<tr class="device" data-device-id="{device}">' in dom
        for chart in ("latency", "throughput"):
            start = dom.index(f'<svg class="chart {chart}" data-device-id="{device}"')
            svg = dom[start : dom.index("</svg>", start)]
            assert "<polyline" in svg, (device, chart, svg)
    assert "digits-cnn@1.2.0" in dom and "int8-static" in dom
    assert shot.exists() and shot.stat().st_size > 10_000
    shutil.copy(shot, "/tmp/fleet-page.png")  # for a person to look at


# -- the largest valid values never take the fleet's reads down --------------------------------
INT64_MAX = 2**63 - 1


def test_the_largest_valid_numbers_are_read_on_every_backend(db_url):
    storage = Storage(db_url)
    ingestor = Ingestor(storage)
    ts = time.time() - 5
    report = (2**62, 2**62, 1.0, 2.0, 3.0)

    def add(kind: Kind, body: bytes, device: str = "huge-1") -> RawMessage:
        return RawMessage(topic(FLEET, device, kind), body, ts)

    ingestor.ingest(
        [
            add(Kind.BIRTH, birth("pi-01", ts, boot=INT64_MAX)),
            add(Kind.METRICS, metrics(INT64_MAX, ts, report, boot=1)),
            add(Kind.METRICS, metrics(INT64_MAX, ts, report, boot=2)),
            add(Kind.STATUS, status("online", ts, boot=INT64_MAX)),
        ]
    )
    server = make_server(storage, ingestor.stats)
    thread = serve_in_thread(server)
    base = "http://{}:{}".format(*server.server_address[:2])
    try:
        devices_code, devices = get_json(f"{base}/api/devices")
        device_code, device = get_json(f"{base}/api/devices/huge-1")
        metrics_code, content_type, text = get(f"{base}/metrics")
    finally:
        server.shutdown()
        thread.join(timeout=5)
        server.server_close()
        storage.close()

    assert ingestor.stats.rejected == {}
    assert (devices_code, device_code, metrics_code) == (200, 200, 200)
    assert devices[0]["inferences_recent"] == pytest.approx(2**63, rel=1e-12)
    assert device["messages"] == 2
    assert device["missing_messages"] == 2 * (INT64_MAX - 1)  # exact: summed in Python
    assert device["boot"] == INT64_MAX
    families = {f.name: f for f in text_string_to_metric_families(text.decode())}
    assert value(families["edgepack_device_inferences"], device="huge-1") == pytest.approx(2**63)
    assert value(families["edgepack_device_missing_messages"], device="huge-1") == pytest.approx(
        2 * (INT64_MAX - 1)
    )


def test_quarantine_lists_what_was_refused_with_the_start_of_its_payload(fleet):
    _, _, base = fleet

    code, rows = get_json(f"{base}/api/quarantine")

    assert code == 200
    (row,) = rows
    assert (row["topic"], row["reason"]) == ("edgepack/v1/shop/pi-01/metrics", "malformed_json")
    assert row["payload_start"] == "{not json"
    assert row["size"] == len(b"{not json")
    assert row["error"].startswith("edgepack/v1/shop/pi-01/metrics: Invalid JSON: ")


def test_collector_events_are_served_and_the_page_shows_them(tmp_path):
    storage = Storage(f"sqlite:///{tmp_path / 'fleet.db'}")
    storage.add_collector_event("collector-1", "warning", "session_lost", "the broker forgot us")
    server = make_server(storage, IngestStats())
    thread = serve_in_thread(server)
    base = "http://{}:{}".format(*server.server_address[:2])
    try:
        code, events = get_json(f"{base}/api/collector/events")
        _, _, page = get(f"{base}/")
    finally:
        server.shutdown()
        thread.join(timeout=5)
        server.server_close()
        storage.close()

    assert code == 200
    assert [(e["client_id"], e["event"], e["message"]) for e in events] == [
        ("collector-1", "session_lost", "the broker forgot us")
    ]
    assert b'id="collector-events"' in page
    assert b'getJSON("/api/collector/events")' in page
