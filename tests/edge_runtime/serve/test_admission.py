"""The bounded queue in front of each text model (edge_runtime/serve/text_models.py)."""

from __future__ import annotations

import threading
import time

import pytest

from edge_runtime.serve.protocol import Overloaded
from edge_runtime.serve.text_models import RETRY_AFTER_S, Admission


def test_beyond_the_bound_a_request_is_refused_at_once():
    admission = Admission("minilm", queue=2)
    held = [admission.enter() for _ in range(3)]  # one runs, two wait

    started = time.perf_counter()
    with pytest.raises(Overloaded) as caught:
        admission.enter()

    assert time.perf_counter() - started < 0.05
    assert str(caught.value) == (
        "model 'minilm' is busy: 1 request(s) running and 2 waiting, the most it queues; "
        "retry shortly"
    )
    assert (caught.value.status, caught.value.retry_after_s) == (503, RETRY_AFTER_S)
    assert admission.depth == 3
    held[0].release()
    held[0].release()  # idempotent: the place is given back once
    assert admission.depth == 2
    admission.enter().release()


def test_one_runs_at_a_time_and_a_long_wait_is_refused():
    admission = Admission("smollm2", queue=1, wait_s=0.2)
    first = admission.enter()
    first.run()
    second = admission.enter()

    started = time.perf_counter()
    with pytest.raises(Overloaded) as caught:
        second.run()

    assert 0.2 <= time.perf_counter() - started < 1.0
    assert str(caught.value) == "model 'smollm2' stayed busy for 0.2 s; retry shortly"
    assert admission.depth == 1  # the refused request left the queue
    first.release()
    assert admission.depth == 0


def test_a_waiting_request_runs_when_the_running_one_ends():
    admission = Admission("smollm2", queue=1, wait_s=5)
    order = []
    first = admission.enter()
    first.run()

    def later():
        with admission.enter() as ticket:
            ticket.run()
            order.append("second")

    thread = threading.Thread(target=later)
    thread.start()
    time.sleep(0.1)
    order.append("first done")
    first.release()
    thread.join(5)

    assert not thread.is_alive()
    assert order == ["first done", "second"]
    assert admission.depth == 0
