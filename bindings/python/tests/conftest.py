"""Shared fixtures: the bundled model, and pyramid-cli as the C library's reference output.

ctest sets PYTHONPATH to the built package, PYRAMID_CLI to build/bin/pyramid-cli and
PYRAMID_TEST_DATA to tests/data.
"""
import json
import os
import subprocess

import pytest

import pyramid

FIBONACCI = "def fibonacci(n):"
# Text with 2-, 3- and 4-byte UTF-8 characters and a ZWJ sequence.
EMOJI_CJK = "# 日本語 🎉 emoji 👩\u200d💻\nprint('你好')"
# Greedy generation after this prompt produces CJK characters assembled from byte tokens.
CJK_PREFIX = "s = '日本語"


@pytest.fixture(scope="session")
def model():
    with pyramid.Model(device="cpu") as m:
        yield m


@pytest.fixture(scope="session")
def reference_greedy():
    """tests/data/fixtures/bundled_reference.json: HF transformers' greedy ids for
    "def fibonacci(n):" on the bundled model, first 24."""
    path = os.path.join(os.environ.get("PYRAMID_TEST_DATA", ""), "fixtures",
                        "bundled_reference.json")
    if not os.path.exists(path):
        pytest.skip("PYRAMID_TEST_DATA does not point at tests/data")
    with open(path, encoding="utf-8") as f:
        prompt = json.load(f)["prompts"][0]
    assert prompt["text"] == FIBONACCI
    return prompt["greedy"][:24]


@pytest.fixture(scope="session")
def cli():
    """Runs pyramid-cli --json greedily; its "tokens" and "text" come straight from C."""
    exe = os.environ.get("PYRAMID_CLI")
    if not exe or not os.path.exists(exe):
        pytest.skip("PYRAMID_CLI is not set (pyramid-cli not built)")

    def run(prompt, max_tokens=24):
        out = subprocess.run(
            [exe, "--prompt", prompt, "--temperature", "0", "--max-tokens", str(max_tokens),
             "--device", "cpu", "--json"],
            check=True, capture_output=True)
        return json.loads(out.stdout.decode("utf-8"))
    return run
