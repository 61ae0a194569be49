"""Tests for edge_runtime/telemetry/protocol.py (topics and payload schemas)."""

from __future__ import annotations

import copy
import json

import pytest
from pydantic import ValidationError

from edge_runtime.telemetry.protocol import (
    PAYLOAD_MODELS,
    SCHEMA_VERSION,
    TOPIC_ROOT,
    BirthPayload,
    Command,
    CommandPayload,
    EventPayload,
    Kind,
    MetricsPayload,
    StatusPayload,
    check_name,
    fleet_filter,
    parse_topic,
    topic,
)

VALID = {
    Kind.STATUS: {
        "schema": 1,
        "ts": 1700000000.5,
        "state": "online",
        "boot": 3,
        "reason": "connected",
    },
    Kind.BIRTH: {
        "schema": 1,
        "ts": 1700000000.5,
        "boot": 3,
        "runtime_version": "0.1.0",
        "device": {"arch": "aarch64", "cores": 4, "ram_mb": 3906.1},
        "bundle": {
            "id": "sha256:abc",
            "name": "digits",
            "version": "1.0.0",
            "profile": "raspberry-pi-4",
            "backend": "onnxruntime",
            "recipe": "int8-static",
        },
    },
    Kind.METRICS: {
        "schema": 1,
        "ts": 1700000000.5,
        "boot": 3,
        "seq": 17,
        "interval_s": 10.0,
        "inferences": 120,
        "errors": 1,
        "latency": {
            "count": 120,
            "p50_ms": 4.2,
            "p95_ms": 9.5,
            "p99_ms": 12.0,
            "max_ms": 13.1,
            "mean_ms": 5.0,
            "buckets_ms": [1.0, 10.0],
            "counts": [0, 110, 10],
        },
        "tokens_per_s": None,
        "process": {"cpu_percent": 35.0, "rss_mb": 80.5},
        "system": {"mem_available_mb": 1200.0, "temperature_c": None},
        "outbox": {"depth": 0, "dropped": 0},
    },
    Kind.EVENTS: {
        "schema": 1,
        "ts": 1700000000.5,
        "boot": 3,
        "seq": 18,
        "event": "selftest",
        "level": "info",
        "data": {"passed": True},
    },
}

# (kind, path to a field, a value of the wrong type) -- strict: no coercion from strings.
WRONG_TYPES = [
    (Kind.STATUS, ("boot",), "3"),
    (Kind.STATUS, ("ts",), "1700000000"),
    (Kind.STATUS, ("state",), True),
    (Kind.BIRTH, ("runtime_version",), 1),
    (Kind.BIRTH, ("device",), ["arch"]),
    (Kind.BIRTH, ("bundle", "version"), 1.0),
    (Kind.METRICS, ("seq",), "17"),
    (Kind.METRICS, ("inferences",), "10"),
    (Kind.METRICS, ("inferences",), 10.0),
    (Kind.METRICS, ("latency", "count"), "120"),
    (Kind.METRICS, ("latency", "counts"), ["0", "110", "10"]),
    (Kind.METRICS, ("process", "cpu_percent"), "35"),
    (Kind.METRICS, ("outbox", "depth"), 0.5),
    (Kind.EVENTS, ("event",), 5),
    (Kind.EVENTS, ("data",), "passed"),
]


def changed(kind: Kind, path: tuple[str, ...], value) -> dict:
    data = copy.deepcopy(VALID[kind])
    target = data
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return data


@pytest.mark.parametrize("kind", list(Kind))
def test_topic_round_trips_through_parse_topic(kind):
    name = topic("plant-7", "pi4.line_2", kind)

    assert name == f"{TOPIC_ROOT}/plant-7/pi4.line_2/{kind.value}"
    assert parse_topic(name) == ("plant-7", "pi4.line_2", kind)


def test_fleet_filter_matches_every_device_and_kind_of_a_fleet():
    assert fleet_filter("plant-7") == "edgepack/v1/plant-7/+/+"
    assert fleet_filter("+") == "edgepack/v1/+/+/+"


@pytest.mark.parametrize(
    "name",
    [
        "edgepack/v2/fleet/device/metrics",
        "other/v1/fleet/device/metrics",
        "edgepack/v1/fleet/device",
        "edgepack/v1/fleet/device/metrics/extra",
        "edgepack/v1/fleet/device/telemetry",
        "edgepack/v1/fleet/device/METRICS",
        "edgepack/v1",
        "",
    ],
)
def test_parse_topic_rejects_other_topics(name):
    assert parse_topic(name) is None


@pytest.mark.parametrize("name", ["a", "A9", "pi-4", "line_2.cam", "0" + "x" * 127])
def test_check_name_accepts_topic_safe_names(name):
    assert check_name(name, "device id") == name


@pytest.mark.parametrize(
    "name",
    ["", "a+b", "+", "#", "fleet/7", "with space", " lead", "-dash-first", ".dot", "x" * 129, None],
)
def test_check_name_rejects_names_that_break_topics(name):
    with pytest.raises(ValueError, match="device id .* is not a valid name"):
        check_name(name, "device id")


def test_payload_models_cover_every_published_kind():
    assert set(PAYLOAD_MODELS) == {Kind.STATUS, Kind.BIRTH, Kind.METRICS, Kind.EVENTS}
    assert SCHEMA_VERSION == 1


@pytest.mark.parametrize("kind", list(PAYLOAD_MODELS))
def test_a_valid_payload_is_accepted(kind):
    model = PAYLOAD_MODELS[kind].model_validate(VALID[kind])

    assert model.model_dump(by_alias=True, exclude_unset=True) == VALID[kind]


@pytest.mark.parametrize(
    ("kind", "path", "value"),
    WRONG_TYPES,
    ids=[f"{kind.value}-{'.'.join(path)}-{value!r}" for kind, path, value in WRONG_TYPES],
)
def test_a_wrong_typed_field_is_rejected(kind, path, value):
    with pytest.raises(ValidationError) as error:
        PAYLOAD_MODELS[kind].model_validate(changed(kind, path, value))

    assert tuple(str(part) for part in error.value.errors()[0]["loc"][: len(path)]) == path


@pytest.mark.parametrize(
    ("kind", "path"),
    [
        (Kind.STATUS, ("colour",)),
        (Kind.BIRTH, ("bundle", "signed_by")),
        (Kind.METRICS, ("gpu_percent",)),
        (Kind.METRICS, ("latency", "p90_ms")),
        (Kind.EVENTS, ("severity",)),
    ],
)
def test_an_extra_key_is_rejected(kind, path):
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        PAYLOAD_MODELS[kind].model_validate(changed(kind, path, "x"))


@pytest.mark.parametrize("kind", list(PAYLOAD_MODELS))
@pytest.mark.parametrize("schema", [2, 0, "1", None])
def test_a_wrong_schema_value_is_rejected(kind, schema):
    with pytest.raises(ValidationError):
        PAYLOAD_MODELS[kind].model_validate(changed(kind, ("schema",), schema))


@pytest.mark.parametrize(
    ("model", "field", "value"),
    [
        (StatusPayload, "state", "rebooting"),
        (StatusPayload, "boot", -1),
        (MetricsPayload, "seq", 0),
        (MetricsPayload, "errors", -1),
        (EventPayload, "level", "debug"),
    ],
)
def test_values_outside_the_protocol_are_rejected(model, field, value):
    kind = next(kind for kind, cls in PAYLOAD_MODELS.items() if cls is model)

    with pytest.raises(ValidationError):
        model.model_validate(changed(kind, (field,), value))


def test_a_birth_without_a_bundle_is_accepted():
    data = {key: value for key, value in VALID[Kind.BIRTH].items() if key != "bundle"}

    parsed = BirthPayload.model_validate(data)

    assert parsed.bundle is None


def test_an_event_defaults_to_level_info_and_no_data():
    data = {key: value for key, value in VALID[Kind.EVENTS].items() if key not in ("level", "data")}

    parsed = EventPayload.model_validate(data)

    assert (parsed.level, parsed.data) == ("info", {})


# -- bounds: every number a collector stores fits a 64-bit column; every float is finite ------
INT64_MAX = 2**63 - 1


def as_json(kind: Kind, path: tuple[str, ...], token: str) -> str:
    """VALID[kind] as JSON text with the field at ``path`` replaced by a raw JSON ``token``."""
    return json.dumps(changed(kind, path, "@@")).replace('"@@"', token)


@pytest.mark.parametrize(
    ("kind", "path"),
    [
        (Kind.STATUS, ("boot",)),
        (Kind.BIRTH, ("boot",)),
        (Kind.METRICS, ("seq",)),
        (Kind.METRICS, ("boot",)),
        (Kind.METRICS, ("inferences",)),
        (Kind.METRICS, ("errors",)),
        (Kind.METRICS, ("latency", "count")),
        (Kind.METRICS, ("outbox", "dropped")),
        (Kind.EVENTS, ("seq",)),
    ],
)
def test_integers_are_64_bit_signed_at_most(kind, path):
    model = PAYLOAD_MODELS[kind]

    model.model_validate_json(as_json(kind, path, str(INT64_MAX)))  # the largest is fine
    for token in (str(INT64_MAX + 1), str(2**64), "1" + "0" * 4000):
        with pytest.raises(ValidationError, match="less than or equal to 9223372036854775807"):
            model.model_validate_json(as_json(kind, path, token))


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity", "1e999"])
@pytest.mark.parametrize(
    ("kind", "path"),
    [
        (Kind.STATUS, ("ts",)),
        (Kind.METRICS, ("interval_s",)),
        (Kind.METRICS, ("latency", "p95_ms")),
        (Kind.METRICS, ("latency", "buckets_ms")),
        (Kind.METRICS, ("process", "cpu_percent")),
        (Kind.METRICS, ("tokens_per_s",)),
    ],
)
def test_nan_and_infinity_are_refused(kind, path, token):
    token = f"[{token}]" if path[-1] == "buckets_ms" else token

    with pytest.raises(ValidationError, match="finite number"):
        PAYLOAD_MODELS[kind].model_validate_json(as_json(kind, path, token))


@pytest.mark.parametrize(
    ("kind", "path", "token", "message"),
    [
        (Kind.EVENTS, ("data",), '{"x": [1, NaN]}', "NaN and Infinity are not JSON numbers"),
        (Kind.EVENTS, ("data",), '{"x": {"y": Infinity}}', "NaN and Infinity"),
        (Kind.EVENTS, ("data",), '{"x": 18446744073709551616}', "an integer beyond 64 bits"),
        (Kind.BIRTH, ("device",), '{"ram_mb": -Infinity}', "NaN and Infinity"),
    ],
)
def test_open_objects_hold_only_plain_json(kind, path, token, message):
    with pytest.raises(ValidationError, match=message):
        PAYLOAD_MODELS[kind].model_validate_json(as_json(kind, path, token))


@pytest.mark.parametrize(
    ("kind", "path"),
    [
        (Kind.EVENTS, ("event",)),
        (Kind.STATUS, ("reason",)),
        (Kind.BIRTH, ("runtime_version",)),
        (Kind.BIRTH, ("bundle", "name")),
    ],
)
@pytest.mark.parametrize("text", ["a\u0000b", "evil\u202etxt.exe", "two\nlines", "x" * 257])
def test_labels_refuse_control_and_bidi_characters_and_length(kind, path, text):
    with pytest.raises(ValidationError, match="control or bidirectional|at most 256"):
        PAYLOAD_MODELS[kind].model_validate(changed(kind, path, text))


def test_labels_take_any_printable_unicode():
    parsed = EventPayload.model_validate(changed(Kind.EVENTS, ("event",), "café_门"))

    assert parsed.event == "café_门"


@pytest.mark.parametrize("name", ["pi-1\n", "pi\u202e1", "x" * 20_000, "pi\u00001", "пи-1"])
def test_check_name_refuses_newlines_bidi_nul_and_non_ascii(name):
    with pytest.raises(ValueError, match="is not a valid name"):
        check_name(name, "device id")


def test_the_tail_fields_are_optional_counts():
    birth = BirthPayload.model_validate({**VALID[Kind.BIRTH], "previous_boot_last_seq": 41})
    status = StatusPayload.model_validate({**VALID[Kind.STATUS], "last_seq": 7})

    assert (birth.previous_boot_last_seq, status.last_seq) == (41, 7)
    assert BirthPayload.model_validate(VALID[Kind.BIRTH]).previous_boot_last_seq is None
    with pytest.raises(ValidationError):
        StatusPayload.model_validate({**VALID[Kind.STATUS], "last_seq": -1})


def test_a_command_names_a_known_request():
    text = '{"schema": 1, "ts": 1.0, "id": "r-1", "command": "report_counts"}'

    assert CommandPayload.model_validate_json(text).command is Command.REPORT_COUNTS
    with pytest.raises(ValidationError, match="command"):
        CommandPayload.model_validate_json(text.replace("report_counts", "reboot"))
