"""A native handle shared by Python threads and closed exactly once.

The C handles are not NULL-safe after they are freed, so the Python objects must never
pass a freed pointer down: every call takes the pointer from here, which raises StateError
once the object is closed. close() from one thread while another is inside a native call
waits for that call to return (a session first cancels it) before the handle is freed.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, Iterator, Optional

from ._errors import closed


class Handle:
    def __init__(self, ptr: Any, destroy: Callable[[Any], None], what: str,
                 interrupt: Optional[Callable[[Any], None]] = None):
        self._ptr = ptr
        self._destroy = destroy
        self._interrupt = interrupt  # stops a call in flight (pyr_session_cancel)
        self._what = what
        self._cond = threading.Condition()
        self._busy = 0

    @property
    def is_closed(self) -> bool:
        return self._ptr is None

    @contextlib.contextmanager
    def use(self) -> Iterator[Any]:
        """The pointer for one call that may take long (the GIL is released meanwhile)."""
        with self._cond:
            if self._ptr is None:
                raise closed(self._what)
            self._busy += 1
            ptr = self._ptr
        try:
            yield ptr
        finally:
            with self._cond:
                self._busy -= 1
                self._cond.notify_all()

    def call(self, fn: Callable[[Any], Any]) -> Any:
        """Runs a short call (getters, cancel) under the lock, so close() cannot race it."""
        with self._cond:
            if self._ptr is None:
                raise closed(self._what)
            return fn(self._ptr)

    def close(self) -> None:
        with self._cond:
            ptr, self._ptr = self._ptr, None  # from here on, new calls raise
            if ptr is None:
                return
            if self._busy and self._interrupt is not None:
                self._interrupt(ptr)
            self._cond.wait_for(lambda: self._busy == 0)
        self._destroy(ptr)


class Closeable:
    """The lifetime protocol of Model and Session over their `_handle`: `closed`, use as a
    context manager, and release on garbage collection. Subclasses define close()."""

    _handle: Handle

    def close(self) -> None:
        self._handle.close()

    @property
    def closed(self) -> bool:
        return self._handle.is_closed

    def __enter__(self):
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        handle = getattr(self, "_handle", None)
        if handle is not None:
            handle.close()
