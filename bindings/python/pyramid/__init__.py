"""pyramid: LLaMA inference with PyramidInfer KV-cache compression.

    import pyramid
    with pyramid.Model() as model, pyramid.Session(model, temperature=0) as session:
        for piece in session.generate("def fibonacci(n):", max_tokens=64):
            print(piece, end="", flush=True)
        print(session.memory())

A thin layer over the SWIG module pyramid.capi, which wraps include/pyramid.h as it is.
"""
from . import capi
from ._errors import (CancelledError, ContextFullError, Error, FileError, FormatError,
                      InternalError, InvalidArgumentError, OutOfMemoryError, StateError,
                      Status, UnsupportedError)
from ._memory import LayerMemory, Memory
from ._model import Model
from ._session import Piece, Session

# The module was generated from one pyramid.h; the library it loaded must have that ABI.
ABI_VERSION = capi.PYR_ABI_VERSION
if capi.pyr_abi_version() != ABI_VERSION:
    raise ImportError(
        f"pyramid: the binding was generated for ABI {ABI_VERSION} but the loaded library "
        f"has ABI {capi.pyr_abi_version()} (version {capi.pyr_version_string()}); "
        "rebuild the binding against this library")

__version__ = capi.pyr_version_string()
SEED_RANDOM = capi.PYR_SEED_RANDOM


def default_model_dir() -> str:
    """The bundled demo model's directory (tiny-code-llama)."""
    return capi.pyr_default_model_dir()


def set_log_level(level: str) -> None:
    """"debug", "info", "warn" (default), "error" or "none"; process-wide."""
    capi.pyr_log_set_level(getattr(capi, "PYR_LOG_" + level.upper()))


__all__ = [
    "Model", "Session", "Piece", "Memory", "LayerMemory", "Status", "Error",
    "InvalidArgumentError", "FileError", "FormatError", "UnsupportedError",
    "OutOfMemoryError", "ContextFullError", "StateError", "InternalError", "CancelledError",
    "default_model_dir", "set_log_level", "ABI_VERSION", "SEED_RANDOM",
]
