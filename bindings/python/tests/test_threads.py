"""cancel() and close() from another thread; the GIL is released during native calls."""
import itertools
import threading
import time

import pytest

import pyramid
from conftest import FIBONACCI

# About 1500 tokens of code: the first prefill takes seconds on a CPU.
LONG_PROMPT = "def add(a, b):\n    return a + b\n\nresult = add(1, 2)\n" * 60


def test_cancel_stops_a_long_prefill(model):
    # The timer thread can only run while pyr_session_next computes the prefill if the
    # wrapper released the GIL; then no token is produced before CancelledError.
    with pyramid.Session(model, temperature=0, max_tokens=0) as session:
        tokens = []
        timer = threading.Timer(0.1, session.cancel)
        start = time.monotonic()
        timer.start()
        with pytest.raises(pyramid.CancelledError) as info:
            for piece in session.generate_tokens(LONG_PROMPT):
                tokens.append(piece.token)
        elapsed = time.monotonic() - start
        timer.join()
        assert info.value.status == pyramid.Status.CANCELLED
        assert tokens == []
        assert elapsed < 30
        assert session.n_tokens > 1000  # the prompt stays queued
        # cached are only the prefill chunks that completed (512 tokens by default), maybe none
        done = session.memory().layers[0].tokens
        assert done % 512 == 0 and done < session.n_tokens


def test_cancel_after_the_first_piece(model):
    with pyramid.Session(model, temperature=0, max_tokens=0) as session:
        seen = []
        memory = []

        def from_another_thread():
            memory.append(session.memory())
            session.cancel()

        with pytest.raises(pyramid.CancelledError):
            for piece in session.generate_tokens(FIBONACCI):
                seen.append(piece)
                if len(seen) == 1:
                    thread = threading.Thread(target=from_another_thread)
                    thread.start()
                    thread.join()
        assert len(seen) == 1
        assert memory[0].n_tokens > 0
        # The request was used up: the session goes on where it stopped.
        assert len(list(itertools.islice(session.generate_tokens(), 2))) == 2


def test_close_from_another_thread_interrupts_generation(model):
    session = pyramid.Session(model, temperature=0, max_tokens=0)
    timer = threading.Timer(0.1, session.close)
    timer.start()
    with pytest.raises((pyramid.CancelledError, pyramid.StateError)):
        for _ in session.generate(LONG_PROMPT):
            pass
    timer.join()
    assert session.closed


def test_sessions_on_threads_generate_what_they_generate_alone(model):
    # The engine batches steps that arrive together; each session keeps its own tokens.
    prompts = [FIBONACCI, "import os\nimport sys\n\ndef main():", "class Stack:\n    def __init__(self):"]

    def run(prompt):
        with pyramid.Session(model, temperature=0, max_tokens=16) as session:
            return [piece.token for piece in session.generate_tokens(prompt)]

    together = [None] * len(prompts)

    def worker(i):
        together[i] = run(prompts[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == [run(p) for p in prompts]
