"""Benchmark fleet telemetry on this host, in one run.

(a) Collector ingest rate into SQLite and into PostgreSQL: a backlog of metrics messages
    is queued by a real Mosquitto for the collector's persistent session, then the
    collector drains it; messages stored per second (goal: >= 20,000 with one collector).
    Beside it, the same drain by a bare paho-mqtt subscriber that only counts.
(b) Device outbox drain rate after an outage: events pile up while the broker is down,
    then the broker returns; messages acknowledged per second.
(c) Inference throughput with telemetry on / off (a connected TelemetryClient reporting
    every second vs none), interleaved rounds (goal: >= 0.99).

Writes the ``bench_telemetry`` section of docs/benchmarks.md.
Run from the repository root: ``.venv/bin/python scripts/bench_telemetry.py [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchdoc import host_line, write_section  # noqa: E402

PUBLISHER = r"""
import json, sys, time
import paho.mqtt.client as mqtt
from edge_runtime.telemetry.aggregate import InferenceStats, VitalSigns
from pathlib import Path
stats = InferenceStats()
for _ in range(100):
    stats.record(0.005)
body = stats.snapshot()
body["process"], body["system"] = VitalSigns(Path("/tmp")).snapshot()
body["outbox"] = {"depth": 0, "dropped": 0}
port, count, devices = int(sys.argv[1]), int(sys.argv[2]), 20
client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, "bench-publisher", protocol=mqtt.MQTTv5)
client.max_inflight_messages_set(1000)
client.max_queued_messages_set(0)
client.connect("127.0.0.1", port)
client.loop_start()
for i in range(count):
    payload = {"schema": 1, "ts": time.time(), "boot": 1, "seq": i // devices + 1, **body}
    info = client.publish(f"edgepack/v1/bench/dev{i % devices}/metrics", json.dumps(payload), 1)
    if i % 10000 == 9999:  # paho has 65535 message ids: keep fewer than that outstanding
        info.wait_for_publish(300)
info.wait_for_publish(300)
client.loop_stop()
"""


def wait_until(predicate, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("benchmark step timed out")
        time.sleep(0.01)


def preload(broker, count: int) -> None:
    """Queue ``count`` metrics messages (20 devices) with the broker, from another process."""
    subprocess.run(
        [sys.executable, "-c", PUBLISHER, str(broker.port), str(count)], check=True, cwd=REPO
    )


def collector_drain(broker, db_url: str, count: int) -> float:
    """Messages/s the collector stores while draining a ``count`` backlog."""
    from collector.service import Collector
    from collector.settings import CollectorSettings
    from collector.storage import Storage

    settings = CollectorSettings(
        broker=broker.url, db=db_url, client_id="bench-collector", heartbeat_timeout_s=3600
    )
    collector = Collector(settings, Storage(db_url)).start()  # register the session
    wait_until(collector.subscribed.is_set, 30)
    collector.stop()
    collector.storage.close()
    preload(broker, count)
    collector = Collector(settings, Storage(db_url))
    started = time.perf_counter()
    collector.start()
    wait_until(lambda: collector.ingestor.stats.stored >= count, 600)
    seconds = time.perf_counter() - started
    collector.stop()
    collector.storage.close()
    return count / seconds


def paho_drain(broker, count: int) -> float:
    """Messages/s a bare paho subscriber (auto-ack, counting only) drains the same backlog."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    def client():
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, "bench-paho", protocol=mqtt.MQTTv5)
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = 3600
        properties.ReceiveMaximum = 2000
        c.connect("127.0.0.1", broker.port, clean_start=False, properties=properties)
        return c

    first = client()
    first.subscribe("edgepack/v1/+/+/+", 1)
    first.loop(1)
    first.loop(1)
    first.disconnect()
    preload(broker, count)
    received = [0]
    second = client()
    second.on_message = lambda *args: received.__setitem__(0, received[0] + 1)
    started = time.perf_counter()
    second.loop_start()
    wait_until(lambda: received[0] >= count, 600)
    seconds = time.perf_counter() - started
    second.loop_stop()
    second.disconnect()
    return count / seconds


def paho_publish(broker, count: int) -> float:
    """Messages/s a bare paho client publishes at QoS 1 until every PUBACK is back."""
    import paho.mqtt.client as mqtt

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, "bench-paho-pub", protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    payload = b'{"schema":1,"ts":0,"boot":1,"seq":1,"event":"bench","level":"info","data":{}}'
    started = time.perf_counter()
    for _ in range(count):
        info = client.publish("edgepack/v1/bench/bare/events", payload, 1)
    info.wait_for_publish(300)
    seconds = time.perf_counter() - started
    client.loop_stop()
    client.disconnect()
    return count / seconds


def outbox_drain(broker, folder: Path, count: int) -> float:
    """Messages/s a device's outbox empties once the broker is back after an outage."""
    from edge_runtime.telemetry.client import TelemetryClient, TelemetrySettings

    broker.stop()
    settings = TelemetrySettings(
        broker=broker.url,
        fleet="bench",
        device_id="outage-device",
        state_dir=folder / "device",
        metrics_interval_s=3600,
        window=1000,
    )
    client = TelemetryClient(settings).start()
    for index in range(count):
        client.event("bench", index=index)
    depth = client._outbox.depth()
    broker.start()
    started = time.perf_counter()
    wait_until(lambda: client._outbox.depth() == 0, 600)
    seconds = time.perf_counter() - started
    client.stop()
    return depth / seconds


def throughput_ratio(
    broker, folder: Path, bundle: Path, pub: Path, rounds: int, calls: int
) -> tuple[float, float, float]:
    """Median over interleaved rounds of throughput(telemetry on) / throughput(off)."""
    import numpy as np

    from edge_runtime import Runtime
    from edge_runtime.selftest import load_vectors
    from edge_runtime.telemetry.client import TelemetryClient, TelemetrySettings

    settings = TelemetrySettings(
        broker=broker.url,
        fleet="bench",
        device_id="throughput",
        state_dir=folder / "tp",
        metrics_interval_s=1.0,
    )
    client = TelemetryClient(settings).start()
    wait_until(client.connected.is_set, 30)
    # One runtime, telemetry switched on and off between rounds: the only difference
    # between the contenders is the telemetry itself.
    with Runtime.open(bundle, pub, threads=1) as runtime:
        inputs, _ = load_vectors(runtime.model_dir / runtime.manifest.selftest.path)
        sample = {name: np.ascontiguousarray(value[:1]) for name, value in inputs.items()}
        started = time.perf_counter()
        for _ in range(50):
            runtime.run(sample)
        # Blocks of about 0.3 s whatever the model's speed: a 30 µs model needs thousands
        # of calls per block before scheduler noise averages out.
        calls = max(calls, int(0.3 / ((time.perf_counter() - started) / 50)))
        ratios, rates = [], {"off": [], "on": []}
        for index in range(rounds):
            measured = {}
            for name in ("off", "on") if index % 2 == 0 else ("on", "off"):
                runtime.telemetry = client if name == "on" else None
                started = time.perf_counter()
                for _ in range(calls):
                    runtime.run(sample)
                measured[name] = calls / (time.perf_counter() - started)
                rates[name].append(measured[name])
            ratios.append(measured["on"] / measured["off"])
    client.stop()
    return (
        statistics.median(ratios),
        statistics.median(rates["on"]),
        statistics.median(rates["off"]),
    )


def build_bundles(folder: Path) -> dict[str, tuple[Path, Path]]:
    """The digits CNN and MiniLM, packaged for x86-64-avx2 (the example-model cache)."""
    from packager.examples import build_example_bundle, make_example, source_fingerprint
    from packager.keys import generate_keypair

    key, pub = generate_keypair(folder / "keys")
    cache = REPO / ".cache" / "test-models" / source_fingerprint()
    bundles = {}
    for name, example in (("digits CNN int8", "digits-cnn"), ("MiniLM int8", "minilm")):
        output = folder / f"{example}.edgepkg"
        build_example_bundle(make_example(example, cache), key, output, "x86-64-avx2")
        bundles[name] = (output, pub)
    return bundles


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts: a smoke test")
    parser.add_argument("--no-write", action="store_true", help="do not touch docs/benchmarks.md")
    args = parser.parse_args(argv)
    from rich.console import Console
    from rich.table import Table

    from tests.brokers import Mosquitto, PostgresDatabase, postgres_available

    console = Console()
    backlog = 20_000 if args.quick else 100_000
    rounds, calls = (4, 200) if args.quick else (20, 1000)
    rows: list[list[str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        with console.status("building bundles"):
            bundles = build_bundles(folder)
        targets = [("SQLite", f"sqlite:///{folder / 'fleet.db'}", None)]
        if postgres_available():
            database = PostgresDatabase()
            targets.append(("PostgreSQL", database.url, database))
        for label, url, database in targets:
            broker = Mosquitto(folder / f"broker-{label}").start()
            with console.status(f"collector ingest into {label} ({backlog} messages)"):
                rate = collector_drain(broker, url, backlog)
            broker.stop()
            if database is not None:
                database.drop()
            verdict = "PASS" if rate >= 20_000 else "MISS"
            rows.append(
                [f"collector ingest into {label}", f"{rate:,.0f} msg/s", ">= 20,000", verdict]
            )
        broker = Mosquitto(folder / "broker-paho").start()
        with console.status("bare paho subscriber drain"):
            bare = paho_drain(broker, backlog)
        broker.stop()
        rows.append(
            [
                "bare paho-mqtt subscriber (count only, no storage)",
                f"{bare:,.0f} msg/s",
                "reference",
                "info",
            ]
        )
        broker = Mosquitto(folder / "broker-outbox").start()
        with console.status("device outbox drain after an outage"):
            drain = outbox_drain(broker, folder, backlog // 5)
        rows.append(["device outbox drain after an outage", f"{drain:,.0f} msg/s", "-", "info"])
        with console.status("bare paho publish loop"):
            bare_publish = paho_publish(broker, backlog // 5)
        rows.append(
            [
                "bare paho-mqtt QoS 1 publish loop, no outbox",
                f"{bare_publish:,.0f} msg/s",
                "reference",
                "info",
            ]
        )
        rows.append(
            ["outbox drain / bare paho publish", f"{drain / bare_publish:.2f}", "-", "info"]
        )
        for name, (bundle, pub) in bundles.items():
            with console.status(f"throughput with telemetry on/off: {name}"):
                ratio, on, off = throughput_ratio(broker, folder, bundle, pub, rounds, calls)
            rows.append(
                [
                    f"{name} throughput, telemetry on / off",
                    f"{ratio:.4f}",
                    ">= 0.99",
                    "PASS" if ratio >= 0.99 else "MISS",
                ]
            )
            per_call_us = (1 / on - 1 / off) * 1e6
            rows.append(
                [
                    f"{name} inferences/s (on, off); telemetry cost per call",
                    f"{on:,.0f}, {off:,.0f}; {per_call_us:+.2f} µs",
                    "-",
                    "info",
                ]
            )
        broker.stop()

    table = Table("Figure", "Measured", "Goal", "Result", title="telemetry")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    command = "python scripts/bench_telemetry.py" + (" --quick" if args.quick else "")
    lines = [
        "## Telemetry: collector ingest, outbox drain, inference overhead",
        "",
        f"Written by `scripts/bench_telemetry.py` on {host_line()}.",
        f"Backlog {backlog:,} metrics messages (~0.9 kB each, 20 devices), drained from a "
        "private Mosquitto; the broker, publisher and collector share this machine's cores. "
        f"Throughput: {rounds} interleaved rounds of >= {calls} calls (about 0.3 s per block), "
        "1 thread, one runtime with telemetry attached and detached, median ratio. "
        f"Reproduce: `{command}`.",
        "",
        "| Figure | Measured | Goal | Result |",
        "|---|---|---|---|",
        *["| " + " | ".join(row) + " |" for row in rows],
        "",
        "How to read it:",
        "",
        "- The collector reads MQTT with its own lean subscriber (collector/wire.py): one "
        "read per chunk, one PUBACK write per stored batch. The bare paho-mqtt row drains the "
        "same backlog without parsing or storing anything, for scale.",
        "- On this 2-core machine the broker, the collector and PostgreSQL's server process "
        "share the cores; PostgreSQL's own per-row work (WAL, index, conflict check) is what "
        "separates its figure from SQLite's, in-process.",
        "- The telemetry hook costs two clock reads and a list append per inference. "
        "Against a model that answers in tens of microseconds that is a few percent; against "
        "a model of a millisecond or more it disappears in the noise (MiniLM row).",
    ]
    if not args.no_write:
        write_section("bench_telemetry", "\n".join(lines))
    print(json.dumps({"rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
