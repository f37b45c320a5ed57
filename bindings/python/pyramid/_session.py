"""Session: one conversation (pyr_session) with pull-style streaming."""
from __future__ import annotations

import math
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Sequence

from . import capi
from ._errors import Status, StateError, error
from ._handle import Closeable, Handle
from ._memory import LayerMemory, Memory
from ._model import Model
from ._params import as_dict, fill


class Piece(NamedTuple):
    token: int  # the sampled token id; -1 for the text flushed when generation ends
    text: str   # whole UTF-8 characters only (may be "")


class Session(Closeable):
    """A conversation on `model`. Parameters are the fields of pyr_session_params by name
    (max_tokens, temperature, top_k, top_p, min_p, seed, n_ctx, kv_policy, kv_retention, ...);
    an unknown name raises TypeError, a bad value InvalidArgumentError.

    Use a session from one thread at a time; cancel() and memory() work from any thread.
    """

    def __init__(self, model: Model, **params: Any):
        self._model = model
        self._n_layers = model.n_layers
        self._params = self._make_params(params)
        self._handle = self._create(self._params)

    def _make_params(self, values: Dict[str, Any]) -> Any:
        sp = capi.pyr_session_params()
        capi.pyr_session_params_init(sp)
        return fill(sp, values, "session")

    def _create(self, sp: Any) -> Handle:
        with self._model._handle.use() as engine:
            out = capi.pyr_session_out()
            status = capi.pyr_session_create(engine, sp, out.cast())
            if status != Status.OK:
                raise error(status, capi.pyr_engine_errmsg(engine))
        return Handle(out.value(), capi.pyr_session_destroy, "session",
                      interrupt=capi.pyr_session_cancel)

    # ---- lifetime -------------------------------------------------------------------------
    def close(self) -> None:
        """Frees the session (cancelling a call in flight on another thread). Idempotent."""
        self._handle.close()

    @property
    def params(self) -> Dict[str, Any]:
        """The pyr_session_params this session was created with, by field name."""
        return as_dict(self._params)

    # ---- input --------------------------------------------------------------------------------
    def _check(self, status: int, session: Any) -> int:
        if status < 0 or status == Status.CANCELLED:
            raise error(status, capi.pyr_session_errmsg(session))
        return status

    def feed(self, text: str) -> None:
        """Appends UTF-8 text (BOS first when the history is empty); computes nothing yet."""
        with self._handle.use() as s:
            self._check(capi.pyr_session_feed_text(s, text), s)

    def feed_tokens(self, tokens: Sequence[int]) -> None:
        """Appends token ids as given (no BOS)."""
        buf = capi.pyr_int32_array(max(len(tokens), 1))
        for i, token in enumerate(tokens):
            buf[i] = token
        with self._handle.use() as s:
            self._check(capi.pyr_session_feed_tokens(s, buf.cast(), len(tokens)), s)

    def prefill(self) -> None:
        """Runs the model over the fed input now (generate does it implicitly)."""
        with self._handle.use() as s:
            self._check(capi.pyr_session_prefill(s), s)

    def reset(self) -> None:
        """Clears history, KV cache and sampler state."""
        with self._handle.use() as s:
            self._check(capi.pyr_session_reset(s), s)

    def cancel(self) -> None:
        """Stops the running (or the next) prefill/generation step with CancelledError.
        Any thread. A no-op on a closed session."""
        try:
            self._handle.call(capi.pyr_session_cancel)
        except StateError:
            pass

    # ---- generation ---------------------------------------------------------------------
    def generate(self, prompt: Optional[str] = None, **params: Any) -> Iterator[str]:
        """Feeds `prompt` (if given) and yields the generated text piece by piece until
        end-of-sequence, max_tokens or a full context. See generate_tokens for `params`."""
        return (piece.text for piece in self.generate_tokens(prompt, **params) if piece.text)

    def generate_tokens(self, prompt: Optional[str] = None, **params: Any) -> Iterator[Piece]:
        """Like generate, yielding Piece(token, text) for every sampled token, then
        Piece(-1, tail) if text was held back until the end.

        `params` (max_tokens=..., temperature=...) are session parameters: the C ABI fixes
        them when a session is created, so they may differ from the session's only while
        its history is empty (the native session is then re-created with them).
        The prompt is fed at once; errors in it raise here, not on the first piece."""
        self._apply(params)
        if prompt is not None:
            self.feed(prompt)
        return self._stream()

    def _apply(self, overrides: Dict[str, Any]) -> None:
        if not overrides:
            return
        wanted = self._make_params({**as_dict(self._params), **overrides})
        if as_dict(wanted) == as_dict(self._params):
            return
        if self.n_tokens != 0:
            raise StateError(Status.ERR_STATE,
                             "session parameters are fixed once a session has history; "
                             "create a new Session for " + ", ".join(sorted(overrides)))
        fresh = self._create(wanted)
        old, self._handle, self._params = self._handle, fresh, wanted
        old.close()

    def _stream(self) -> Iterator[Piece]:
        while True:
            with self._handle.use() as s:
                status = self._check(capi.pyr_session_next(s), s)
                token, text = capi.pyr_session_token(s), capi.pyr_session_text(s)
            if status == Status.OK:
                yield Piece(token, text)
            else:  # DONE: the tail of the text is flushed
                if text:
                    yield Piece(-1, text)
                return

    # ---- state and memory (any thread) -----------------------------------------------------
    @property
    def n_tokens(self) -> int:
        """Tokens in the history (fed and generated)."""
        return self._handle.call(capi.pyr_session_n_tokens)

    def logit(self, token: int) -> float:
        """The raw logit of `token` after the last processed token (0.0 if none)."""
        return self._handle.call(lambda s: capi.pyr_session_logit(s, token))

    def memory(self) -> Memory:
        """The KV cache's bytes and tokens, in total and per layer."""
        def read(s: Any) -> Memory:
            layers = [LayerMemory(capi.pyr_session_layer_tokens(s, il),
                                  capi.pyr_session_layer_bytes(s, il))
                      for il in range(self._n_layers)]
            kv, full = capi.pyr_session_kv_bytes(s), capi.pyr_session_kv_bytes_full(s)
            return Memory(capi.pyr_session_n_tokens(s), capi.pyr_session_n_processed(s), kv, full,
                          kv / full if full else 1.0, layers)
        return self._handle.call(read)

    def kv_param(self, name: str) -> Optional[float]:
        """A KV policy parameter as used ("rho", "window", "budget", ...); None if unknown
        or not known yet (see pyr_session_kv_param)."""
        value = self._handle.call(lambda s: capi.pyr_session_kv_param(s, name))
        return None if math.isnan(value) else value

    def layer_positions(self, layer: int, after_prefill: bool = False) -> List[int]:
        """Original positions of the tokens cached in `layer`, ascending."""
        when = capi.PYR_KV_AFTER_PREFILL if after_prefill else capi.PYR_KV_NOW

        def read(s: Any) -> List[int]:
            n = capi.pyr_session_layer_positions(s, layer, when, None, 0)
            buf = capi.pyr_int32_array(max(n, 1))
            n = min(n, capi.pyr_session_layer_positions(s, layer, when, buf.cast(), n))
            return [buf[i] for i in range(n)]
        return self._handle.call(read)
