"""systemd's service notifications (sd_notify), with no dependency.

Under a ``Type=notify`` unit systemd passes ``$NOTIFY_SOCKET``, a Unix datagram socket
(``@name`` for one in the abstract namespace). The service sends ``READY=1`` once it can
serve, ``WATCHDOG=1`` more often than ``$WATCHDOG_USEC`` while it is healthy (systemd
restarts it when the pings stop), and ``STOPPING=1`` when it begins to shut down.
Outside systemd there is no socket and every call here does nothing.

Usage, in the serving command::

    watchdog = Watchdog(healthy=lambda: host.healthy())
    ... load and self-test the models ...
    notify_ready(status="serving 2 models on 127.0.0.1:8000")
    watchdog.start()
    ... on SIGTERM ...
    notify_stopping()
    watchdog.stop()
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)


def notify(*assignments: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``assignments`` (e.g. ``"READY=1"``, ``"STATUS=..."``) to systemd.

    Returns:
        True when sent; False outside systemd (no ``$NOTIFY_SOCKET``) or when sending
        failed, which is logged: a notification never stops the service.
    """
    target = (os.environ if environ is None else environ).get("NOTIFY_SOCKET", "")
    if not target:
        return False
    if target.startswith("@"):  # the abstract namespace: a leading NUL byte
        address = "\0" + target[1:]
    elif target.startswith("/"):
        address = target
    else:  # e.g. vsock:CID:PORT, which a VM's systemd may give; not for a device service
        log.warning("NOTIFY_SOCKET=%s is not a Unix socket; not notifying systemd", target)
        return False
    message = "\n".join(assignments).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message, address)
    except OSError as exc:
        log.warning("could not notify systemd at %s: %s", target, exc)
        return False
    return True


def notify_ready(status: str | None = None, environ: Mapping[str, str] | None = None) -> bool:
    """Tell systemd the service is ready: a ``Type=notify`` unit counts as started now."""
    return notify("READY=1", *_status(status), environ=environ)


def notify_stopping(status: str | None = None, environ: Mapping[str, str] | None = None) -> bool:
    """Tell systemd the service is shutting down (draining requests)."""
    return notify("STOPPING=1", *_status(status), environ=environ)


def _status(status: str | None) -> list[str]:
    # One line: a newline would start another assignment.
    return [] if status is None else [f"STATUS={' '.join(status.splitlines())}"]


def watchdog_interval_s(environ: Mapping[str, str] | None = None) -> float | None:
    """Half of systemd's watchdog timeout, in seconds; None when systemd set none for
    this process (no ``$WATCHDOG_USEC``, or ``$WATCHDOG_PID`` names another process)."""
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None  # meant for a parent that started us
    try:
        timeout = int(usec)
    except ValueError:
        timeout = 0
    if timeout <= 0:
        log.warning("WATCHDOG_USEC=%r is not a positive number of microseconds; ignored", usec)
        return None
    return timeout / 2 / 1e6


class Watchdog:
    """Sends ``WATCHDOG=1`` every half of ``$WATCHDOG_USEC`` while ``healthy()`` is true.

    When ``healthy()`` returns false (or raises), the pings stop, so systemd restarts the
    service after ``WatchdogSec``; they resume if it recovers first.

    Args:
        healthy: called from the watchdog thread before each ping; must be quick.
        interval_s: seconds between pings instead of half of ``$WATCHDOG_USEC``.
        environ: the environment to read (``os.environ`` when None).
    """

    def __init__(
        self,
        healthy: Callable[[], bool],
        interval_s: float | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self._healthy = healthy
        self._environ = environ
        self.interval_s = watchdog_interval_s(environ) if interval_s is None else interval_s
        self.pings = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> bool:
        """Start pinging; False (and nothing started) when systemd asked for no watchdog."""
        if self.interval_s is None or self._thread is not None:
            return self._thread is not None
        self._thread = threading.Thread(target=self._run, name="systemd-watchdog", daemon=True)
        self._thread.start()
        log.info("systemd watchdog: a ping every %.3g s while healthy", self.interval_s)
        return True

    def stop(self) -> None:
        """Stop pinging. Call it at shutdown, after ``notify_stopping``: systemd no longer
        watches a stopping service, and the unit's TimeoutStopSec bounds the drain."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        was_healthy = True
        while True:
            try:
                healthy = bool(self._healthy())
            except Exception:
                log.exception("the health check raised; counting the service as unhealthy")
                healthy = False
            if healthy:
                if not was_healthy:
                    log.warning("healthy again: resuming systemd watchdog pings")
                if notify("WATCHDOG=1", environ=self._environ):
                    self.pings += 1
            elif was_healthy:
                log.error(
                    "unhealthy: no more systemd watchdog pings, so systemd restarts the "
                    "service after WatchdogSec unless it recovers first"
                )
            was_healthy = healthy
            if self._stop.wait(self.interval_s):
                return


# The unit `edge-runtime systemd-unit` prints (docs/serve-systemd.md explains installing it).
UNIT_TEMPLATE = """\
[Unit]
Description=edge-runtime serve: on-device inference over HTTP and gRPC
After=network-online.target
Wants=network-online.target
# Give up after {start_limit_burst} failed starts in {start_limit_interval_s} s
# (`systemctl reset-failed` re-arms it).
StartLimitIntervalSec={start_limit_interval_s}
StartLimitBurst={start_limit_burst}

[Service]
Type=notify
NotifyAccess=main
ExecStart={exec_start}
User={user}
Group={user}
Restart=on-failure
RestartSec=5
WatchdogSec={watchdog_s}
# Verifying, loading and self-testing a model can take a while on a small device.
TimeoutStartSec={start_timeout_s}
# SIGTERM: stop accepting, drain in-flight requests, flush telemetry.
TimeoutStopSec={stop_timeout_s}
# EDGEPACK_HOME holds the telemetry outbox and boot counter: with /tmp, the only places
# the service may write.
Environment=PYTHONUNBUFFERED=1 EDGEPACK_HOME=/var/lib/edgepack
StateDirectory=edgepack
UMask=0077
NoNewPrivileges=yes
CapabilityBoundingSet=
ProtectSystem=strict
ProtectHome=read-only
PrivateTmp=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
SystemCallArchitectures=native

[Install]
WantedBy=multi-user.target
"""


def unit_file(
    command: list[str],
    *,
    user: str = "edgepack",
    watchdog_s: int = 30,
    start_timeout_s: int = 300,
    stop_timeout_s: int = 30,
    start_limit_burst: int = 5,
    start_limit_interval_s: int = 600,
) -> str:
    """A ``Type=notify`` systemd unit that runs ``command`` (absolute program path first)
    as ``user``, restarted on failure and by the watchdog, within a start limit."""
    return UNIT_TEMPLATE.format(
        exec_start=" ".join(_systemd_quote(word) for word in command),
        user=user,
        watchdog_s=watchdog_s,
        start_timeout_s=start_timeout_s,
        stop_timeout_s=stop_timeout_s,
        start_limit_burst=start_limit_burst,
        start_limit_interval_s=start_limit_interval_s,
    )


def _systemd_quote(word: str) -> str:
    """One ExecStart word: systemd expands %specifiers and $VARIABLES even inside quotes,
    so both are doubled; whitespace, quotes and backslashes need double quotes."""
    word = word.replace("%", "%%").replace("$", "$$")
    if word and not any(c.isspace() or c in "\"'\\;" for c in word):
        return word
    escaped = word.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'
