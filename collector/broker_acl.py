"""Least privilege on the embedded broker: each device writes only its own topics.

amqtt plugins, loaded by dotted path from ``collector.broker``; this module imports amqtt,
so only ``--embedded-broker`` loads it. A client is known by its user name (with a password
file) or, where anonymous clients are allowed, by its client id, which for a device is its
device id. The same rules as Mosquitto's ``pattern`` ACL in docs/telemetry.md:

- a device publishes ``status``, ``birth``, ``metrics`` and ``events`` under its own id only,
  and reads only its own ``cmd`` topic;
- a reader (the collector) reads every edgepack topic and may publish ``cmd`` requests;
- anything else is refused. A refused publish is dropped (MQTT 3.1.1 cannot say no to one);
  a refused subscription gets the failure code; a Will on someone else's topic is refused at
  connect, since amqtt sends Wills without asking the topic plugins.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from amqtt.contexts import Action
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session

from edge_runtime.telemetry.protocol import TOPIC_ROOT, Kind, parse_topic

DEVICE_WRITES = {Kind.STATUS, Kind.BIRTH, Kind.METRICS, Kind.EVENTS}


def _identity(session: Session | None, by_client_id: bool) -> str | None:
    if session is None:
        return None
    if session.username:
        return session.username
    return session.client_id if by_client_id else None


def device_may(identity: str, topic: str, action: Action) -> bool:
    """What a device (``identity``: its id) may do with ``topic`` (a name or a filter)."""
    parts = topic.split("/")
    if len(parts) != 5 or "/".join(parts[:2]) != TOPIC_ROOT or parts[3] != identity:
        return False
    if action is Action.PUBLISH:
        place = parse_topic(topic)
        return place is not None and place[2] in DEVICE_WRITES and "+" not in parts[2]
    return parts[4] == Kind.CMD.value  # subscribe to, or receive, its own requests


def reader_may(topic: str, action: Action) -> bool:
    """What a reader (the collector) may do: read everything, publish requests."""
    if action is Action.PUBLISH:
        place = parse_topic(topic)
        return place is not None and place[2] is Kind.CMD
    if topic.startswith("$share/"):
        topic = topic.split("/", 2)[2] if topic.count("/") >= 2 else ""
    return topic == "#" or topic.split("/")[:2] == TOPIC_ROOT.split("/")


class FleetTopicPlugin(BaseTopicPlugin):
    """Publish, subscribe and receive checks on fleet topics."""

    @dataclass
    class Config:
        readers: list[str] = field(default_factory=list)
        by_client_id: bool = False

    async def topic_filtering(
        self,
        *,
        session: Session | None = None,
        topic: str | None = None,
        action: Action | None = None,
    ) -> bool:
        identity = _identity(session, self.config.by_client_id)
        if identity is None or not topic or action is None:
            return False
        if identity in self.config.readers:
            return reader_may(topic, action)
        return device_may(identity, topic, action)


class FleetWillPlugin(BaseAuthPlugin):
    """Refuses a client whose Will would publish where it may not; otherwise abstains."""

    @dataclass
    class Config:
        readers: list[str] = field(default_factory=list)
        by_client_id: bool = False

    async def authenticate(self, *, session: Session) -> bool | None:
        if not session.will_flag:
            return None
        identity = _identity(session, self.config.by_client_id)
        topic = session.will_topic or ""
        if identity is not None and identity in self.config.readers:
            allowed = reader_may(topic, Action.PUBLISH)
        else:
            allowed = identity is not None and device_may(identity, topic, Action.PUBLISH)
        if not allowed:
            self.context.logger.warning(
                "refused %s: its Will is on %r, which it may not publish", identity, topic
            )
        return None if allowed else False
