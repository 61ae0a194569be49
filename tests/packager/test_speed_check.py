"""Speed counts: a quantized candidate slower than fp32 on a host of the profile's
instruction-set class is refused; elsewhere its speed is recorded as not representative.

The model is a small MLP (16 MatMul + Relu layers, 32 wide): at that size dynamic int8's
quantize/dequantize work costs more than the int8 MatMuls save, so on an x86 host it runs
at about 0.7x the speed of fp32 (0.67-0.69x measured side by side here), far below the
0.95 refusal line, so the test does not depend on noise.
"""

import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from onnx import TensorProto, helper, numpy_helper

from edge_runtime.manifest import SpeedCheck
from edge_runtime.summary import summary_rows
from packager.build import BuildConfig, build_bundle
from packager.errors import GateError
from packager.profiles import load_profile
from packager.speed import (
    SLOWER_THAN_FLOAT,
    arch_class,
    is_representative,
    slower_reason,
    time_side_by_side,
)
from tests.packager.test_cli import edgepack

WIDTH, LAYERS = 32, 16

x86_only = pytest.mark.skipif(
    arch_class(platform.machine()) != "x86_64", reason="the refusal needs an x86-64 host"
)


@pytest.fixture(scope="module")
def mlp(tmp_path_factory) -> tuple[Path, Path]:
    """The MLP and an eval file (its calibration is not needed: dynamic int8)."""
    folder = tmp_path_factory.mktemp("mlp")
    rng = np.random.default_rng(0)
    weights, nodes, current = [], [], "x"
    for index in range(LAYERS):
        weight = rng.normal(0, 1.4 / np.sqrt(WIDTH), (WIDTH, WIDTH)).astype(np.float32)
        weights.append(numpy_helper.from_array(weight, f"w{index}"))
        output = "y" if index == LAYERS - 1 else f"t{index}"
        nodes += [
            helper.make_node("MatMul", [current, f"w{index}"], [f"m{index}"], name=f"mm{index}"),
            helper.make_node("Relu", [f"m{index}"], [output], name=f"relu{index}"),
        ]
        current = output
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", WIDTH])],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(folder / "mlp.onnx"))
    np.savez(folder / "eval.npz", x=rng.normal(0, 1, (24, WIDTH)).astype(np.float32))
    return folder / "mlp.onnx", folder / "eval.npz"


def _build(mlp, keypair, output: Path, profile, **options):
    model, evaluation = mlp
    config = BuildConfig(
        model=model,
        profile=profile,
        key=keypair[0],
        output=output,
        eval=evaluation,
        measure=options.pop("measure", True),
        # The test is about speed: a threshold the int8 MLP clears with room (it scores
        # about 0.005-0.015 on the cosine gate, depending on the draw).
        max_degradation=0.05,
        **options,
    )
    return build_bundle(config)


@x86_only
def test_slower_int8_is_refused_on_a_host_of_the_profiles_arch(mlp, keypair, tmp_path):
    with pytest.raises(GateError) as error:
        _build(
            mlp,
            keypair,
            tmp_path / "x86.edgepkg",
            load_profile("x86-64-avx2"),
            recipe="int8-dynamic-per-channel",
        )

    [attempt] = error.value.attempts
    assert attempt.status == "failed"
    assert attempt.reason.startswith("slower than fp32 on this host (0.")
    assert attempt.metrics["degradation"] <= 0.05  # the gate itself passed it
    assert attempt.speed.representative
    assert attempt.speed.ratio < SLOWER_THAN_FLOAT
    assert attempt.speed.ratio == pytest.approx(
        attempt.speed.reference_ms / attempt.speed.candidate_ms, rel=0.01
    )


@x86_only
def test_the_chain_goes_on_to_fp32_when_int8_is_slower(mlp, keypair, tmp_path):
    data = load_profile("x86-64-avx2").model_dump(mode="json")
    data["onnx"]["recipes"] = ["int8-dynamic-per-channel", "fp32"]
    profile_file = tmp_path / "x86-dynamic.yaml"
    profile_file.write_text(yaml.safe_dump(data))

    result = _build(mlp, keypair, tmp_path / "b.edgepkg", load_profile(path=profile_file))

    dynamic, fp32 = result.manifest.quantization.attempts
    assert dynamic.status == "failed" and "slower than fp32" in dynamic.reason
    assert (fp32.status, fp32.speed) == ("passed", None)  # float is not timed against itself
    assert result.manifest.quantization.chosen == "fp32"
    assert result.manifest.model.precision == "fp32"


@x86_only
def test_the_build_table_shows_the_speed_and_why_a_passing_candidate_was_refused(
    mlp, keypair, tmp_path
):
    data = load_profile("x86-64-avx2").model_dump(mode="json")
    data["onnx"]["recipes"] = ["int8-dynamic-per-channel", "fp32"]
    profile_file = tmp_path / "x86-dynamic.yaml"
    profile_file.write_text(yaml.safe_dump(data))
    model, evaluation = mlp
    command = ["build", str(model), "--profile-file", str(profile_file), "--key", str(keypair[0])]
    command += ["-o", str(tmp_path / "b.edgepkg"), "--eval", str(evaluation)]

    built = edgepack(*command, "--max-degradation", "0.05")

    assert built.returncode == 0, built.stderr
    table = built.stderr[built.stderr.index("quantization attempts") :]
    assert "x fp32" in table  # the speed column
    # The status cell says why the gate's pass was refused (rich wraps it over lines).
    assert "failed:" in table and "slower than" in table and "host (0." in table


@x86_only
def test_an_arm_profile_built_on_x86_records_the_speed_as_not_representative(
    mlp, keypair, tmp_path
):
    result = _build(
        mlp,
        keypair,
        tmp_path / "pi4.edgepkg",
        load_profile("raspberry-pi-4"),
        recipe="int8-dynamic-per-channel",
    )

    [attempt] = result.manifest.quantization.attempts
    assert attempt.status == "passed" and attempt.reason is None
    assert attempt.speed.representative is False
    assert attempt.speed.ratio < 1  # slower here, but this host says nothing about a Pi
    assert result.manifest.quantization.chosen == "int8-dynamic-per-channel"
    # inspect and info show it, with the caveat
    [speed] = [value for label, value in summary_rows(result.manifest) if label == "speed"]
    assert speed.startswith(f"{attempt.speed.ratio:.2f}x fp32 on the build host")
    assert "host not representative of the target" in speed


def test_no_measure_builds_time_nothing(mlp, keypair, tmp_path):
    result = _build(
        mlp,
        keypair,
        tmp_path / "b.edgepkg",
        load_profile("x86-64-avx2"),
        recipe="int8-dynamic-per-channel",
        measure=False,
    )

    [attempt] = result.manifest.quantization.attempts
    assert (attempt.status, attempt.speed) == ("passed", None)


@x86_only
def test_the_speed_check_can_be_turned_off(mlp, keypair, tmp_path):
    result = _build(
        mlp,
        keypair,
        tmp_path / "b.edgepkg",
        load_profile("x86-64-avx2"),
        recipe="int8-dynamic-per-channel",
        speed_check=False,
    )

    [attempt] = result.manifest.quantization.attempts
    assert (attempt.status, attempt.speed) == ("passed", None)
    assert result.manifest.measurements is not None  # the chosen model is still measured


@pytest.mark.parametrize(
    "profile_arch, host, expected",
    [
        ("x86_64", "x86_64", True),
        ("x86_64", "AMD64", True),
        ("arm64", "aarch64", True),
        ("arm64", "arm64", True),
        ("arm64", "x86_64", False),
        ("x86_64", "aarch64", False),
    ],
)
def test_instruction_set_classes(profile_arch, host, expected):
    assert is_representative(profile_arch, host) is expected


def test_profile_arch_enum_is_understood():
    assert is_representative(load_profile("raspberry-pi-4").arch, "aarch64")
    assert not is_representative(load_profile("raspberry-pi-4").arch, "x86_64")


@pytest.mark.parametrize(
    "ratio, representative, refused",
    [(0.8, True, True), (0.94, True, True), (0.96, True, False), (0.5, False, False)],
)
def test_the_refusal_line(ratio, representative, refused):
    speed = SpeedCheck(
        candidate_ms=1.0, reference_ms=ratio, ratio=ratio, representative=representative
    )

    reason = slower_reason(speed)

    assert (reason is not None) is refused
    if refused:
        assert reason == f"slower than fp32 on this host ({ratio:.2g}x)"


def test_side_by_side_timing_tells_the_faster_one():
    reference_ms, candidate_ms = time_side_by_side(
        lambda: time.sleep(0.004), lambda: time.sleep(0.001), min_pairs=5, budget_s=0.0
    )

    assert reference_ms > candidate_ms * 2


# A process pinned to one CPU, as `taskset -c 0` or a container's cpuset pins a build: what
# the build host times with, and says it timed with.
PINNED = """
import json, os, sys
from packager.speed import host_threads
before = [host_threads(8), host_threads(0)]
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
from packager.formats.onnx import host_session
from packager.passes.measure import host_description
session = host_session(sys.argv[1]).session
print(json.dumps({
    "before": before,
    "after": [host_threads(8), host_threads(0)],
    "onnx": session.get_session_options().intra_op_num_threads,
    "host": host_description(),
}))
"""


@pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="pinning needs sched_setaffinity and at least 2 CPUs to pin from",
)
def test_a_build_pinned_to_one_cpu_times_with_one_thread(digits_example):
    from edge_runtime.cpus import usable_cpus

    completed = subprocess.run(
        [sys.executable, "-c", PINNED, str(digits_example.model)],
        capture_output=True,
        text=True,
        check=False,
    )

    assert completed.returncode == 0, completed.stderr
    facts = json.loads(completed.stdout.splitlines()[-1])
    usable = usable_cpus().count
    assert facts["before"] == [min(8, usable), usable]
    assert facts["after"] == [1, 1]
    assert facts["onnx"] == 1
    # a cgroup quota of one CPU would name itself first; otherwise the affinity does
    assert re.search(r" \d+ cores, 1 usable \((affinity|cgroup .*)\)$", facts["host"])
