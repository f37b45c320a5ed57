#!/usr/bin/env python3
"""Streams a completion from the bundled model token by token, as a chat UI would, then a
second turn in the same session, and prints what the KV cache holds.

    cmake --build build --target example-python          # after tools/test.sh
    PYTHONPATH=build/bindings/python python3 examples/python/stream.py ['prompt' ...]

Greedy (temperature 0), so the first turn is the text of
`build/bin/pyramid-cli --prompt 'def fibonacci(n):' --temperature 0 --max-tokens 64`.
"""
import sys

import pyramid

turns = sys.argv[1:] or ["def fibonacci(n):", "\n\ndef factorial(n):"]

with pyramid.Model() as model, \
        pyramid.Session(model, temperature=0, max_tokens=64) as session:
    print(f"pyramid {pyramid.__version__} on {model.device}: {model.path}")
    for prompt in turns:
        print(f"\n>>> {prompt!r}")
        print(prompt, end="", flush=True)
        for piece in session.generate(prompt):  # the history carries over between turns
            print(piece, end="", flush=True)
        print()
    print()
    print(session.memory())
