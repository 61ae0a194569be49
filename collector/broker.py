"""An in-process MQTT broker (amqtt), so one machine needs nothing else for a demo fleet.

amqtt speaks MQTT 3.1.1 only: with it, agents and the collector use ``--mqtt-version
3.1.1``, and shared subscriptions (an MQTT 5 feature) are not available. For a real fleet
use Mosquitto (or any MQTT 5 broker) with persistence on; see docs/telemetry.md.

Clients log in with a password file (amqtt's: ``user:argon2-hash`` lines, made with
``edge-collector passwd``), or, only when told so, anonymously; either way each device may
write only its own topics (collector/broker_acl.py).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path

from .errors import CollectorError

log = logging.getLogger(__name__)


class EmbeddedBroker:
    """amqtt running on its own event loop in a daemon thread."""

    def __init__(
        self,
        host: str,
        port: int,
        password_file: Path | None = None,
        allow_anonymous: bool = False,
        readers: tuple[str, ...] = (),
    ) -> None:
        """Args:
        host, port: where to listen.
        password_file: amqtt password file (``user:argon2-hash`` lines); the user name is
            the device id.
        allow_anonymous: let clients in without a password; a client is then who its
            client id says it is (demos on a trusted network only).
        readers: the users (client ids, when anonymous) that read every topic: the
            collector.
        """
        if password_file is None and not allow_anonymous:
            raise CollectorError(
                "the embedded broker refuses anonymous clients: give it a password file "
                "(edge-collector passwd FILE USER), or allow anonymous clients"
            )
        self.host, self.port = host, port
        self.password_file, self.allow_anonymous = password_file, allow_anonymous
        self.readers = tuple(readers)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._broker = None
        self._thread: threading.Thread | None = None

    def start(self, timeout_s: float = 10.0) -> EmbeddedBroker:
        try:
            from amqtt.broker import Broker
        except ImportError:
            raise CollectorError(
                "--embedded-broker needs amqtt: pip install 'edgepack[collector-broker]'"
            ) from None
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            "plugins": self._plugins(),
        }
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self._loop)
            try:
                self._broker = Broker(config, loop=self._loop)
                self._loop.run_until_complete(self._broker.start())
            except BaseException as exc:  # report to the starting thread
                failure.append(exc)
                ready.set()
                return
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="embedded-broker", daemon=True)
        self._thread.start()
        if not ready.wait(timeout_s) or failure:
            raise CollectorError(
                f"the embedded broker could not listen on {self.host}:{self.port}: "
                f"{failure[0] if failure else 'timed out'}"
            )
        log.info("embedded MQTT 3.1.1 broker listening on %s:%d", self.host, self.port)
        return self

    def _plugins(self) -> dict[str, dict]:
        """amqtt's plugins: who may log in, and the fleet ACL (no $SYS, no packet logging)."""
        rules = {"readers": list(self.readers), "by_client_id": self.allow_anonymous}
        plugins: dict[str, dict] = {}
        if self.password_file is not None:
            if not Path(self.password_file).is_file():
                raise CollectorError(
                    f"password file {self.password_file} does not exist: make it with "
                    f"edge-collector passwd {self.password_file} USER"
                )
            plugins["amqtt.plugins.authentication.FileAuthPlugin"] = {
                "password_file": str(self.password_file)
            }
        if self.allow_anonymous:
            plugins["amqtt.plugins.authentication.AnonymousAuthPlugin"] = {"allow_anonymous": True}
        plugins["collector.broker_acl.FleetWillPlugin"] = rules
        plugins["collector.broker_acl.FleetTopicPlugin"] = rules
        return plugins

    def stop(self) -> None:
        if self._loop is None or self._broker is None:
            return
        future = asyncio.run_coroutine_threadsafe(self._broker.shutdown(), self._loop)
        try:
            future.result(timeout=10)
        except Exception:  # shutting down anyway
            log.debug("embedded broker shutdown raised", exc_info=True)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=5)


def set_password(path: Path, user: str, password: str) -> None:
    """Add or replace ``user`` in an amqtt password file (argon2), readable by its owner only.

    Raises:
        CollectorError: the user name cannot be a login (it must be a device id, or the
            collector's name), or the password is empty.
    """
    from edge_runtime.telemetry.protocol import check_name

    try:
        check_name(user, "user")
    except ValueError as exc:
        raise CollectorError(f"{exc} (a device logs in with its device id)") from None
    if not password:
        raise CollectorError("the password is empty: give one")
    try:
        from pwdlib import PasswordHash
        from pwdlib.hashers.argon2 import Argon2Hasher
    except ImportError:
        raise CollectorError(
            "edge-collector passwd needs amqtt: pip install 'edgepack[collector-broker]'"
        ) from None
    line = f"{user}:{PasswordHash((Argon2Hasher(),)).hash(password)}"
    path = Path(path)
    kept = []
    if path.exists():
        kept = [
            entry
            for entry in path.read_text(encoding="utf-8").splitlines()
            if entry.split(":", 1)[0] != user
        ]
    path.touch(mode=0o600, exist_ok=True)
    path.chmod(0o600)
    path.write_text("\n".join([*kept, line]) + "\n", encoding="utf-8")
