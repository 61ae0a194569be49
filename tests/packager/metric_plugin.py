"""Metric plugins for the tests (tests/packager/test_metrics*.py), loaded by name through
the real plugin path: ``--metric-plugin tests.packager.metric_plugin:FUNCTION``."""

CALLS: list[dict] = []


def decision_agreement(reference, candidate, data):
    """The share of samples whose first output's argmax differs from the reference's."""
    CALLS.append({"outputs": sorted(reference), "data": sorted(data)})
    first = next(iter(reference))
    expected = reference[first].reshape(len(reference[first]), -1).argmax(axis=1)
    predicted = candidate[first].reshape(len(candidate[first]), -1).argmax(axis=1)
    agreement = float((expected == predicted).mean())
    return {"degradation": 1.0 - agreement, "figures": {"agreement": agreement}}


def always_half(reference, candidate, data):
    return {"degradation": 0.5}


def raises(reference, candidate, data):
    raise ValueError("the plugin cannot read this output")


def returns_a_number(reference, candidate, data):
    return 0.1


def out_of_range(reference, candidate, data):
    return {"degradation": 1.5}


def bad_figure(reference, candidate, data):
    return {"degradation": 0.0, "figures": {"words": "many"}}


def extra_key(reference, candidate, data):
    return {"degradation": 0.0, "verdict": "fine"}


NOT_A_FUNCTION = 3
