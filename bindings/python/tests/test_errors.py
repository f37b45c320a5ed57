"""Failures raise pyramid.Error subclasses with the status and the library's message;
closed objects raise instead of crashing."""
import pytest

import pyramid
from conftest import FIBONACCI


def test_missing_model_directory():
    with pytest.raises(pyramid.FileError) as info:
        pyramid.Model("/nonexistent/pyramid-model")
    assert info.value.status == pyramid.Status.ERR_IO
    assert "/nonexistent/pyramid-model" in info.value.message
    assert isinstance(info.value, pyramid.Error)


def test_bad_device():
    with pytest.raises(pyramid.InvalidArgumentError, match="tpu:7"):
        pyramid.Model(device="tpu:7")


def test_bad_engine_parameter():
    with pytest.raises(pyramid.InvalidArgumentError, match="prefill_chunk"):
        pyramid.Model(device="cpu", prefill_chunk=-1)


@pytest.mark.parametrize("params, needle", [
    ({"top_p": 0.0}, "top_p"),
    ({"kv_policy": "nope"}, "nope"),
    ({"max_tokens": -1}, "max_tokens"),
])
def test_bad_session_parameter(model, params, needle):
    with pytest.raises(pyramid.InvalidArgumentError) as info:
        pyramid.Session(model, **params)
    assert info.value.status == pyramid.Status.ERR_INVALID_ARGUMENT
    assert needle in info.value.message


def test_unknown_or_mistyped_parameter_is_a_type_error(model):
    with pytest.raises(TypeError, match="kv_polciy"):
        pyramid.Session(model, kv_polciy="pyramid")
    with pytest.raises(TypeError):
        pyramid.Session(model, max_tokens="many")
    with pytest.raises(TypeError):
        pyramid.Session(model, struct_size=3)


def test_session_errors_carry_the_session_message(model):
    with pyramid.Session(model, n_ctx=8) as session:
        with pytest.raises(pyramid.StateError, match="feed"):
            list(session.generate())
        with pytest.raises(pyramid.ContextFullError, match="context"):
            session.feed("def f(x):\n    return x + 1\n\nprint(f(41))\n")
        with pytest.raises(pyramid.InvalidArgumentError, match="999999"):
            session.feed_tokens([1, 999999])


def test_closing_the_model_first_keeps_sessions_working():
    model = pyramid.Model(device="cpu")
    session = pyramid.Session(model, temperature=0, max_tokens=3)
    model.close()
    model.close()  # idempotent
    assert model.closed
    assert len(list(session.generate_tokens("import os"))) >= 1
    with pytest.raises(pyramid.StateError, match="model is closed"):
        model.tokenize("x")
    with pytest.raises(pyramid.StateError):
        pyramid.Session(model)
    session.close()


def test_closed_session_raises(model):
    session = pyramid.Session(model, temperature=0, max_tokens=3)
    stream = session.generate(FIBONACCI)
    session.close()
    assert session.closed
    for use in (lambda: session.feed("x"), lambda: list(stream), session.memory,
                lambda: session.n_tokens, lambda: list(session.generate("x"))):
        with pytest.raises(pyramid.StateError, match="session is closed"):
            use()
    session.cancel()  # nothing to cancel: a no-op
    session.close()
    with pyramid.Session(model) as s:
        pass
    with pytest.raises(pyramid.StateError):
        s.feed("x")
