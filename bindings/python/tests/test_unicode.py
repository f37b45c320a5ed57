"""Emoji and CJK text cross the binding unchanged, both ways."""
import pytest

import pyramid
from conftest import CJK_PREFIX, EMOJI_CJK

# sentencepiece 0.2's encode of EMOJI_CJK with models/tiny-code-llama/tokenizer.model
# (byte-fallback pieces for the emoji), after BOS.
EMOJI_CJK_IDS = [
    444, 4004, 233, 154, 168, 233, 159, 175, 235, 173, 161, 4004, 243, 162, 145, 140, 448,
    719, 4071, 4010, 4004, 243, 162, 148, 172, 229, 131, 144, 243, 162, 149, 190, 13, 1254,
    621, 231, 192, 163, 232, 168, 192, 738,
]


def test_tokenize_sees_the_exact_text(model):
    assert model.tokenize(EMOJI_CJK) == [model.bos_token] + EMOJI_CJK_IDS
    assert model.tokenize(EMOJI_CJK, add_bos=False) == EMOJI_CJK_IDS


def test_emoji_prompt_generates_like_the_cli(model, cli):
    with pyramid.Session(model, temperature=0, max_tokens=24) as session:
        pieces = list(session.generate_tokens(EMOJI_CJK))
    expected = cli(EMOJI_CJK)
    assert [p.token for p in pieces if p.token >= 0] == expected["tokens"]
    assert "".join(p.text for p in pieces) == expected["text"]


def test_multibyte_output_arrives_whole(model, cli):
    with pyramid.Session(model, temperature=0, max_tokens=24) as session:
        pieces = list(session.generate(CJK_PREFIX))
    text = "".join(pieces)
    assert text == cli(CJK_PREFIX)["text"]
    assert any(ord(c) > 0x7F for c in text)
    text.encode("utf-8", errors="strict")  # no lone surrogates from a split character


def test_error_message_round_trips_4_byte_characters():
    path = "/nonexistent/日本語 🎉 👩\u200d💻"
    with pytest.raises(pyramid.FileError) as info:
        pyramid.Model(path)
    assert path in info.value.message


def test_string_field_round_trips(model):
    with pytest.raises(pyramid.InvalidArgumentError) as info:
        pyramid.Session(model, kv_policy="nöpe 🎉")
    assert "nöpe 🎉" in info.value.message
