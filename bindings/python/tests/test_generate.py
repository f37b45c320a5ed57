"""Streaming: the same greedy tokens and text as the C library, memory, parameters."""
import pytest

import pyramid
from conftest import FIBONACCI


def test_greedy_tokens_match_reference_and_cli(model, reference_greedy, cli):
    with pyramid.Session(model, temperature=0, max_tokens=24) as session:
        pieces = list(session.generate_tokens(FIBONACCI))
    tokens = [p.token for p in pieces if p.token >= 0]
    assert tokens == reference_greedy
    expected = cli(FIBONACCI)
    assert tokens == expected["tokens"]
    assert "".join(p.text for p in pieces) == expected["text"]


def test_generate_yields_text_pieces(model, cli):
    with pyramid.Session(model) as session:
        pieces = list(session.generate(FIBONACCI, max_tokens=24, temperature=0))
    assert all(isinstance(p, str) and p for p in pieces)
    assert "".join(pieces) == cli(FIBONACCI)["text"]


def test_memory_reports_every_layer(model):
    with pyramid.Session(model, temperature=0, max_tokens=8) as session:
        assert session.memory().kv_bytes == 0
        list(session.generate(FIBONACCI))
        memory = session.memory()
        assert memory.n_tokens == session.n_tokens
        assert memory.n_processed == memory.n_tokens - 1  # the last sampled token is queued
    assert len(memory.layers) == model.n_layers
    assert memory.kv_bytes > 0
    assert memory.kv_bytes == sum(layer.bytes for layer in memory.layers)
    assert memory.kv_bytes_full == memory.kv_bytes  # the default policy keeps everything
    assert memory.retention == 1.0
    assert all(layer.tokens > 0 for layer in memory.layers)


def test_params_are_the_struct_fields(model):
    with pyramid.Session(model, kv_policy="pyramid", kv_retention=0.5, temperature=0,
                         seed=7, max_tokens=4) as session:
        params = session.params
        assert params["kv_policy"] == "pyramid"
        assert params["kv_retention"] == pytest.approx(0.5)
        assert params["seed"] == 7
        assert "struct_size" not in params  # set by pyr_session_params_init only
        list(session.generate("x = 1\n" * 40))
        assert session.kv_param("retention") == pytest.approx(0.5)
        assert session.kv_param("no-such-knob") is None


def test_params_may_change_only_before_history(model):
    with pyramid.Session(model, temperature=0.8) as session:
        first = list(session.generate(FIBONACCI, temperature=0, max_tokens=3))
        assert len(first) >= 1
        list(session.generate("\n", temperature=0, max_tokens=3))  # unchanged: fine
        with pytest.raises(pyramid.StateError, match="temperature"):
            session.generate("\n", temperature=0.5)


def test_feed_tokens_continues_like_text(model):
    ids = model.tokenize(FIBONACCI)
    assert ids[0] == model.bos_token
    with pyramid.Session(model, temperature=0, max_tokens=6) as a, \
            pyramid.Session(model, temperature=0, max_tokens=6) as b:
        a.feed_tokens(ids)
        assert list(a.generate()) == list(b.generate(FIBONACCI))


def test_version_and_abi():
    assert pyramid.ABI_VERSION == pyramid.capi.pyr_abi_version()
    assert pyramid.__version__.count(".") == 2


def test_prefill_chunk_is_an_engine_parameter(reference_greedy):
    # Chunks of 7 tokens: the same greedy tokens as one prefill (default policy: full).
    with pyramid.Model(device="cpu", prefill_chunk=7) as chunked:
        with pyramid.Session(chunked, temperature=0, max_tokens=24) as session:
            tokens = [p.token for p in session.generate_tokens(FIBONACCI) if p.token >= 0]
    assert tokens == reference_greedy
