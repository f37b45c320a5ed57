"""Statuses and the exceptions that carry them.

Every failing C call becomes an `Error` subclass chosen by its status, carrying the status
and the message the library left on the handle (pyr_engine_errmsg / pyr_session_errmsg).
"""
from __future__ import annotations

import enum

from . import capi

# The pyr_status values as the header defines them (PYR_OK -> Status.OK, ...).
Status = enum.IntEnum(
    "Status",
    sorted(
        ((name[len("PYR_"):], getattr(capi, name))
         for name in dir(capi)
         if name in ("PYR_OK", "PYR_DONE", "PYR_CANCELLED") or name.startswith("PYR_ERR_")),
        key=lambda item: -item[1],
    ),
)
Status.__doc__ = "A pyr_status: OK, DONE, CANCELLED or ERR_* (negative)."
Status.__module__ = "pyramid"


class Error(Exception):
    """A call into the library failed. `status` is the Status, `message` the library's text."""

    def __init__(self, status: int, message: str):
        self.status = Status(status)
        self.message = message
        super().__init__(f"{message} [{capi.pyr_status_str(int(status))}]")


class InvalidArgumentError(Error, ValueError):
    """A NULL handle, a bad parameter value or a wrong struct_size."""


class FileError(Error, OSError):
    """A file of the model is missing or cannot be read (PYR_ERR_IO)."""


class FormatError(Error):
    """A model file is malformed (config, safetensors, tokenizer)."""


class UnsupportedError(Error):
    """Valid input that this build cannot run (device, dtype)."""


class OutOfMemoryError(Error, MemoryError):
    """An allocation or the device memory budget failed."""


class ContextFullError(Error):
    """The tokens would not fit in the session's context (n_ctx)."""


class StateError(Error):
    """The call is not valid in the object's state; also: the object is closed."""


class InternalError(Error):
    """A bug in the library: please report the message."""


class CancelledError(Error):
    """Session.cancel() stopped the call: no token came of it, the history and queued input
    are as before it (the finished chunks of a long prompt stay processed)."""


_CLASSES = {
    Status.ERR_INVALID_ARGUMENT: InvalidArgumentError,
    Status.ERR_IO: FileError,
    Status.ERR_FORMAT: FormatError,
    Status.ERR_UNSUPPORTED: UnsupportedError,
    Status.ERR_OUT_OF_MEMORY: OutOfMemoryError,
    Status.ERR_CONTEXT_FULL: ContextFullError,
    Status.ERR_STATE: StateError,
    Status.ERR_INTERNAL: InternalError,
    Status.CANCELLED: CancelledError,
}

for _cls in {Error, *_CLASSES.values()}:
    _cls.__module__ = "pyramid"


def error(status: int, message: str) -> Error:
    """The exception for a failing status (an unknown status becomes InternalError)."""
    try:
        cls = _CLASSES.get(Status(status), Error)
    except ValueError:
        cls, status = InternalError, Status.ERR_INTERNAL
    return cls(status, message)


def closed(what: str) -> StateError:
    return StateError(Status.ERR_STATE, f"the {what} is closed")
