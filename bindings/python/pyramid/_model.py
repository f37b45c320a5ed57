"""Model: a loaded checkpoint (pyr_engine)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, List, Optional

from . import capi
from ._errors import Status, error
from ._handle import Closeable, Handle
from ._params import fill

if TYPE_CHECKING:
    from ._session import Session


class Model(Closeable):
    """Loads the HF LLaMA checkpoint in directory `path` (default: the bundled model).

    Engine parameters are the fields of pyr_engine_params by name: `device` ("auto", "cpu",
    "cuda", "cuda:N"), `n_threads` (0 = all), `max_device_bytes`, `prefill_chunk` (prefill
    tokens per forward, default 512; 0 = no limit). Thread-safe. Sessions keep the native
    engine alive, so closing a Model before its Sessions is fine.
    """

    def __init__(self, path: Optional[str] = None, device: str = "auto", n_threads: int = 0,
                 **params: Any):
        self.path = path if path is not None else capi.pyr_default_model_dir()
        ep = capi.pyr_engine_params()
        capi.pyr_engine_params_init(ep)
        fill(ep, dict(device=device, n_threads=n_threads, **params), "engine")
        out = capi.pyr_engine_out()
        status = capi.pyr_engine_open(self.path, ep, out.cast())
        engine = out.value()
        if status != Status.OK:
            # sqlite3_open style: even a failed open returns a handle carrying the message.
            message = capi.pyr_engine_errmsg(engine)
            capi.pyr_engine_close(engine)
            raise error(status, message)
        self._handle = Handle(engine, capi.pyr_engine_close, "model")

    # ---- lifetime -------------------------------------------------------------------------
    def close(self) -> None:
        """Releases this reference; open Sessions keep working. Idempotent."""
        self._handle.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else self.device
        return f"<pyramid.Model {self.path!r} {state}>"

    # ---- facts ------------------------------------------------------------------------------
    def _get(self, fn: Any) -> Any:
        return self._handle.call(fn)

    @property
    def n_layers(self) -> int:
        return self._get(capi.pyr_engine_n_layers)

    @property
    def n_vocab(self) -> int:
        return self._get(capi.pyr_engine_n_vocab)

    @property
    def n_ctx_train(self) -> int:
        return self._get(capi.pyr_engine_n_ctx_train)

    @property
    def bos_token(self) -> int:
        return self._get(capi.pyr_engine_bos_token)

    @property
    def eos_token(self) -> int:
        return self._get(capi.pyr_engine_eos_token)

    @property
    def device(self) -> str:
        return self._get(capi.pyr_engine_device)

    @property
    def weights_bytes(self) -> int:
        return self._get(capi.pyr_engine_weights_bytes)

    # ---- work -------------------------------------------------------------------------------
    def tokenize(self, text: str, add_bos: bool = True) -> List[int]:
        """The token ids of UTF-8 `text`, with BOS first if add_bos."""
        with self._handle.use() as engine:
            n = capi.pyr_engine_tokenize(engine, text, int(add_bos), None, 0)
            if n < 0:
                raise error(n, capi.pyr_engine_errmsg(engine))
            buf = capi.pyr_int32_array(max(n, 1))
            n = capi.pyr_engine_tokenize(engine, text, int(add_bos), buf.cast(), n)
            if n < 0:
                raise error(n, capi.pyr_engine_errmsg(engine))
            return [buf[i] for i in range(n)]

    def session(self, **params: Any) -> "Session":
        """A new Session on this model: Session(self, **params)."""
        from ._session import Session
        return Session(self, **params)

    def session_bytes_estimate(self, **params: Any) -> int:
        """KV bytes a session with these params needs at its full context (uncompressed)."""
        sp = capi.pyr_session_params()
        capi.pyr_session_params_init(sp)
        fill(sp, params, "session")
        return self._get(lambda engine: capi.pyr_engine_session_bytes_estimate(engine, sp))
