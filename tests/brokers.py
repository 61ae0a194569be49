"""Real services for telemetry tests: a private Mosquitto per test, fresh PostgreSQL databases.

Tests never touch the shared broker on :1883; each starts its own ``mosquitto`` on a free
port, with the durability settings edgepack ships (collector/mosquitto.conf), and can stop,
kill and restart it.
"""

from __future__ import annotations

import getpass
import os
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout_s: float = 10.0, open_: bool = True) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                if open_:
                    return
        except OSError:
            if not open_:
                return
        time.sleep(0.05)
    raise TimeoutError(f"port {port} did not {'open' if open_ else 'close'} in {timeout_s}s")


SHIPPED_CONFIG = Path(__file__).resolve().parent.parent / "collector" / "mosquitto.conf"
# The broker settings docs/telemetry.md gave before collector/mosquitto.conf: persistence, but
# Mosquitto's default autosave (every 1800 s and at a clean stop).
OLD_CONFIG = (
    "persistence true\nmax_queued_messages 0\nmax_queued_bytes 1073741824\n"
    "max_inflight_messages 0\n"
)


class Mosquitto:
    """A mosquitto process on its own port and data folder; stop/start keep both.

    Its durability settings are collector/mosquitto.conf, as shipped (``config="old"``: the
    settings the docs gave before it, which lose the broker's state on a crash).
    """

    def __init__(
        self,
        folder: Path,
        port: int | None = None,
        extra_config: str = "",
        config: str = "shipped",
    ) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.config = self.folder / "mosquitto.conf"
        durability = SHIPPED_CONFIG.read_text() if config == "shipped" else OLD_CONFIG
        self.config.write_text(
            f"listener {self.port} 127.0.0.1\n"
            # Started as root, mosquitto would drop to user 'mosquitto', which cannot write
            # the persistence file into this test's private folder.
            f"user {getpass.getuser()}\n"
            "allow_anonymous true\n"
            f"persistence_location {self.folder}/\n"
            f"log_dest file {self.folder}/mosquitto.log\n"
            "log_type error\nlog_type warning\nlog_type notice\n" + durability + "\n" + extra_config
        )
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> Mosquitto:
        self.process = subprocess.Popen(
            ["mosquitto", "-c", str(self.config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port)
        return self

    def stop(self) -> None:
        """Graceful stop (SIGTERM): mosquitto saves its persistence file."""
        if self.process is None:
            return
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=10)
        self.process = None
        wait_for_port(self.port, open_=False)

    def kill(self) -> None:
        """kill -9: no goodbye, no final save; only what autosave wrote survives."""
        if self.process is None:
            return
        self.process.kill()
        self.process.wait(timeout=10)
        self.process = None
        wait_for_port(self.port, open_=False)

    def log(self) -> str:
        path = self.folder / "mosquitto.log"
        return path.read_text() if path.exists() else ""


POSTGRES_ADMIN_URL = os.environ.get("EDGEPACK_TEST_POSTGRES", "postgresql://127.0.0.1:5432/test")


def postgres_available() -> bool:
    try:
        import psycopg

        with psycopg.connect(POSTGRES_ADMIN_URL, connect_timeout=3):
            return True
    except Exception:
        return False


class PostgresDatabase:
    """A fresh database on the shared server, dropped afterwards."""

    def __init__(self) -> None:
        import psycopg

        self.name = f"edgepack_test_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{self.name}"')
        base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0]
        self.url = f"{base}/{self.name}"

    def drop(self) -> None:
        import psycopg

        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


class PrivatePostgres:
    """A PostgreSQL server of its own (initdb in a fresh folder), which a test may stop.

    For outages: the shared server on :5432 must never be stopped. initdb refuses to run as
    root, so as root the server runs as the ``postgres`` user, in a folder it owns.
    """

    def __init__(self) -> None:
        import shutil
        import tempfile

        bin_dir = next(
            (Path(p).parent for p in [shutil.which("initdb")] if p),
            None,
        )
        if bin_dir is None:
            raise FileNotFoundError("initdb is not on PATH")
        self.bin = bin_dir
        self.folder = Path(tempfile.mkdtemp(prefix="edgepack-pg-", dir="/tmp"))
        self.data = self.folder / "data"
        self.port = free_port()
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            self.as_user = ["runuser", "-u", "postgres", "--"]
            shutil.chown(self.folder, "postgres")
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str) -> None:
        subprocess.run(
            [*self.as_user, str(self.bin / tool), *args],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            cwd=self.folder,
        )

    def start(self) -> PrivatePostgres:
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.folder} -c fsync=off"
        log = str(self.folder / "postgres.log")
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", log, "-w", "start")
        wait_for_port(self.port)
        return self

    def stop(self) -> None:
        """Stop at once (fast mode: open connections are cut, as in a crash or failover)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def remove(self) -> None:
        import shutil

        subprocess.run(
            [*self.as_user, str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate",
             "stop"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=False,
        )  # fmt: skip
        shutil.rmtree(self.folder, ignore_errors=True)
