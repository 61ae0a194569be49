import os
import signal
import threading

import pytest

from edge_runtime.cli_support import stop_on_signals


@pytest.fixture
def restore_handlers():
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


@pytest.mark.timeout(20)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_the_main_thread_holds_the_events_lock_does_not_deadlock(
    restore_handlers, signum
):
    stop = threading.Event()
    stop_on_signals(stop)

    # Inside stop.wait() the main thread holds the event's lock; a handler that called
    # stop.set() right there would wait for that lock forever.
    with stop._cond:
        os.kill(os.getpid(), signum)
        for _ in range(1000):  # give the handler bytecode boundaries to run at
            pass

    assert stop.wait(5)
