"""User metric plugins: loaded by module:function or entry point name, checked, and every
failure turned into a PackagerError that names the plugin (packager.metrics.plugin)."""

import sys

import numpy as np
import pytest

from packager.errors import PackagerError
from packager.metrics import check_settings, load_plugin, run_plugin

PLUGINS = "tests.packager.metric_plugin"
REFERENCE = {"logits": np.array([[5.0, 1.0], [1.0, 5.0]])}
CANDIDATE = {"logits": np.array([[5.0, 1.0], [5.0, 1.0]])}
DATA = {"x": np.zeros((2, 3))}


def call(function: str):
    spec = f"{PLUGINS}:{function}"
    return run_plugin(spec, load_plugin(spec), REFERENCE, CANDIDATE, DATA)


def test_a_plugin_gets_every_output_and_the_eval_data():
    from tests.packager import metric_plugin

    metric_plugin.CALLS.clear()

    assert call("decision_agreement") == (0.5, {"agreement": 0.5})
    assert metric_plugin.CALLS == [{"outputs": ["logits"], "data": ["x"]}]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("tests.packager.no_such_module:score", "cannot import module 'tests.packager.no_such"),
        (f"{PLUGINS}:missing", "module 'tests.packager.metric_plugin' has no 'missing'"),
        (f"{PLUGINS}:NOT_A_FUNCTION", "is a int, not a function"),
        ("no-such-entry-point", "no entry point of that name in group 'edgepack.metrics'"),
    ],
)
def test_a_plugin_that_cannot_be_loaded_is_refused_before_any_work(spec, message):
    with pytest.raises(PackagerError, match=f"metric plugin '{spec}'.*{message}"):
        check_settings({}, spec)


@pytest.mark.parametrize(
    ("function", "message"),
    [
        ("raises", "raised ValueError: the plugin cannot read this output"),
        ("returns_a_number", "returned float; it must return a dict with 'degradation'"),
        ("out_of_range", "'degradation' is 1.5, outside \\[0, 1\\]"),
        ("bad_figure", "figure 'words' must be a finite number, got 'many'"),
        ("extra_key", "returned unknown keys \\['verdict'\\]"),
    ],
)
def test_a_plugin_that_breaks_the_contract_is_named_in_the_error(function, message):
    with pytest.raises(PackagerError, match=f"metric plugin '{PLUGINS}:{function}'.*{message}"):
        call(function)


def test_a_plugin_is_found_by_its_entry_point_name(tmp_path, monkeypatch):
    """An installed distribution that declares the plugin in group edgepack.metrics."""
    dist = tmp_path / "my_metrics-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-metrics\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        f"[edgepack.metrics]\nagreement = {PLUGINS}:decision_agreement\n"
        f"broken = {PLUGINS}_missing:score\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))

    plugin = load_plugin("agreement")

    assert run_plugin("agreement", plugin, REFERENCE, CANDIDATE, DATA)[0] == 0.5
    with pytest.raises(PackagerError, match="metric plugin 'broken': entry point .* failed"):
        load_plugin("broken")
    with pytest.raises(PackagerError, match="installed: .*agreement, broken"):
        load_plugin("agreemen")
    assert sys.path[0] == str(tmp_path)
