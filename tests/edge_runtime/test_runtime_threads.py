"""The runtime caps every engine's threads at the CPUs the process may use (issue 13).

Real bundles, real engines, in processes pinned with ``os.sched_setaffinity``: a subprocess
for the end-to-end cases (the library, and the ``edge-runtime`` command line), and the test
process itself, pinned for the duration of one test, where only the engine's settings are
read.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from edge_runtime.cpus import usable_cpus
from edge_runtime.runtime import Runtime
from tests.conftest import REPO, build_example

SPINNING = "session.intra_op.allow_spinning"
VNNI = "x86-64-avx512-vnni"  # 8 intra-op threads, spinning on

pytestmark = pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity"), reason="needs os.sched_setaffinity (Linux)"
)


def first_cpus(count: int) -> set[int]:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < count:
        pytest.skip(f"needs {count} CPUs to pin to; this process has {len(cpus)}")
    return set(cpus[:count])


@contextmanager
def pinned(cpus: set[int]):
    """This process on ``cpus`` only, until the block ends."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def spinning_entry(session) -> str:
    try:
        return session.get_session_options().get_session_config_entry(SPINNING)
    except RuntimeError:  # never set: ONNX Runtime's default, which spins
        return ""


@pytest.fixture(scope="module")
def vnni_bundle(digits_example, keypair, tmp_path_factory) -> Path:
    """The digits CNN built for x86-64-avx512-vnni: its profile says 8 threads, spinning on."""
    output = tmp_path_factory.mktemp("bundles") / "digits-vnni.edgepkg"
    build_example(digits_example, keypair[0], output, VNNI)
    return output


OPEN_AND_RUN = """
import json, logging, sys
import numpy as np
from edge_runtime.runtime import Runtime

logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s %(message)s")
with Runtime.open(sys.argv[1], sys.argv[2]) as runtime:
    outputs = runtime.run({"image": np.zeros((1, 1, 8, 8), dtype=np.float32)})
    options = runtime.backend.engine.get_session_options()
    try:
        spinning = options.get_session_config_entry("session.intra_op.allow_spinning")
    except RuntimeError:
        spinning = ""
    print(json.dumps({
        "intra_op_num_threads": options.intra_op_num_threads,
        "spinning_entry": spinning,
        "info": runtime.info(),
        "logits": list(outputs["logits"].shape),
    }))
"""


def test_a_process_pinned_to_two_cpus_runs_an_eight_thread_profile_with_two(vnni_bundle, keypair):
    cpus = first_cpus(2)
    expected = usable_cpus(affinity=cpus)  # 2, or fewer under a tighter cgroup quota

    done = subprocess.run(
        [sys.executable, "-c", OPEN_AND_RUN, str(vnni_bundle), str(keypair[1])],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        preexec_fn=lambda: os.sched_setaffinity(0, cpus),
        timeout=300,
    )

    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["intra_op_num_threads"] == expected.count
    assert result["spinning_entry"] == ""  # as many threads as CPUs: the profile's spinning
    assert result["logits"] == [1, 10]
    info = result["info"]
    assert info["threads"] == expected.count and info["allow_spinning"] is True
    assert info["profile_threads"] == 8 and info["explicit_threads"] is None
    assert info["usable_cpus"] == expected.count
    assert info["usable_cpus_reason"] == expected.reason
    line = (
        f"edge_runtime.backends INFO threads: profile asks for 8, this process may use "
        f"{expected.describe()}; using {expected.count}"
    )
    assert done.stderr.count(line) == 1, done.stderr[-3000:]


def test_the_command_line_notes_the_lowered_thread_count(vnni_bundle, keypair, tmp_path):
    cpus = first_cpus(1)
    expected = usable_cpus(affinity=cpus)
    inputs, output = tmp_path / "in.npz", tmp_path / "out.npz"
    np.savez(inputs, image=np.zeros((3, 1, 8, 8), dtype=np.float32))
    command = [sys.executable, "-m", "edge_runtime.cli", "run", str(vnni_bundle)]
    command += ["--pubkey", str(keypair[1]), "--input", str(inputs), "--output", str(output)]

    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        preexec_fn=lambda: os.sched_setaffinity(0, cpus),
        timeout=300,
    )

    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.splitlines() == [
        f"note: threads: profile asks for 8, this process may use {expected.describe()}; "
        f"using {expected.count}"
    ]
    assert done.stdout == f"wrote {output}: logits[3, 10]\n"


@pytest.mark.parametrize(
    ("explicit", "threads", "spinning", "warned"),
    [
        pytest.param(None, 1, "", False, id="profile-capped-keeps-spinning"),
        pytest.param(1, 1, "", False, id="explicit-fits-keeps-spinning"),
        pytest.param(3, 3, "0", True, id="explicit-wins-spinning-off"),
    ],
)
def test_explicit_threads_win_and_spinning_stops_when_they_outnumber_the_cpus(
    vnni_bundle, keypair, caplog, explicit, threads, spinning, warned
):
    cpus = first_cpus(1)
    if usable_cpus(affinity=cpus).count != 1:
        pytest.skip("a cgroup quota below one CPU leaves nothing to pin")
    caplog.set_level(logging.INFO, logger="edge_runtime")

    with pinned(cpus), Runtime.open(vnni_bundle, keypair[1], threads=explicit) as runtime:
        session = runtime.backend.engine
        got_threads = session.get_session_options().intra_op_num_threads
        got_spinning = spinning_entry(session)
        info = runtime.info()
        choice = runtime.threads_used

    assert (got_threads, got_spinning) == (threads, spinning)
    assert info["threads"] == threads and info["allow_spinning"] is (spinning == "")
    assert choice.explicit == explicit and choice.cpus.count == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    expected_warning = (
        f"threads: 3 asked for explicitly, but this process may use {choice.cpus.describe()}; "
        "using 3, which oversubscribes them"
    )
    assert warnings == ([expected_warning] if warned else [])


@pytest.mark.parametrize(
    ("explicit", "threads"),
    [pytest.param(None, 2, id="profile-capped"), pytest.param(3, 3, id="explicit-wins")],
)
def test_llama_cpp_gets_the_capped_count_for_generation_and_batches(
    smollm2_pi5_bundle, keypair, explicit, threads
):
    cpus = first_cpus(2)
    if usable_cpus(affinity=cpus).count != 2:
        pytest.skip("a cgroup quota below two CPUs changes the cap")

    with pinned(cpus), Runtime.open(smollm2_pi5_bundle, keypair[1], threads=explicit) as runtime:
        params = runtime.backend.engine.context_params
        info = runtime.info()
        text = runtime.generate("The sky is", max_tokens=3, temperature=0).read()

    assert (params.n_threads, params.n_threads_batch) == (threads, threads)
    assert info["threads"] == threads
    assert info["profile_threads"] == 4  # raspberry-pi-5
    assert text
