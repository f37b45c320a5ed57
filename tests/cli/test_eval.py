#!/usr/bin/env python3
"""pyramid-eval end to end on a small self-contained text (tests/data/eval_sample.txt: six
held-out Python files separated by the line NUL FILE NUL): perplexity and passkey with the
full cache, the policy flags reported back, reproducibility, and errors.
Usage: test_eval.py PATH/TO/pyramid-eval TESTS_DATA_DIR. Prints 'N passed, N failed'."""
import json
import math
import sys

from harness import check, finish, run_tool

tool, data_dir = sys.argv[1], sys.argv[2]
text = f"{data_dir}/eval_sample.txt"


def run(*args):
    return run_tool(tool, *args)


def run_json(*args):
    r = run(*args, "--json", "--quiet")
    check(r.returncode == 0, f"{' '.join(args)}: exit {r.returncode}: {r.stderr}")
    return json.loads(r.stdout) if r.returncode == 0 else None


PPL = ("--text", text, "--prompt-len", "128", "--eval-len", "32", "--windows", "3", "--seed", "3")

# Perplexity with the full cache: finite, plausible for code, nothing dropped.
full = run_json(*PPL)
if full:
    check(math.isfinite(full["ppl"]) and 1.2 < full["ppl"] < 20, f"full ppl {full['ppl']}")
    check(full["mean_retention"] == 1.0, "full: mean_retention 1")
    check((full["windows"], full["prompt_len"], full["eval_len"]) == (3, 128, 32), "sizes reported")
    check(full["tokens_per_s"] > 0 and full["kv"] == {"policy": "full"}, "speed and policy")
    check(len(full["per_window"]) == 3, "one record per window")
    # Same seed, same windows, same numbers; another seed, other windows.
    again = run_json(*PPL)
    check(again and again["ppl"] == full["ppl"], "seeded perplexity repeats")
    other = run_json(*PPL[:-1], "4")
    check(other and [w["offset"] for w in other["per_window"]] != [w["offset"] for w in full["per_window"]],
          "another seed picks other windows")

# The policy flags go into the session and come back in "kv".
pyr = run_json(*PPL, "--kv-policy", "pyramid", "--kv-retention", "0.5", "--kv-gen-e", "8",
               "--kv-sinks", "2", "--kv-prefill-shrink", "off", "--kv-min-context", "16")
if pyr:
    kv = pyr["kv"]
    check(kv["policy"] == "pyramid" and kv["retention"] == 0.5 and kv["gen_e"] == 8 and
          kv["sinks"] == 2 and kv["prefill_shrink"] == 0 and kv["min_context"] == 16,
          f"pyramid flags reported back: {kv}")
    check(0 < pyr["mean_retention"] < 0.9 and math.isfinite(pyr["ppl"]), "pyramid compresses")
shr = run_json(*PPL, "--kv-policy", "snapshrink", "--kv-retention", "0.5", "--kv-shrink-start", "3")
if shr:
    check(shr["kv"]["policy"] == "snapshrink" and shr["kv"]["shrink_start"] == 3 and
          shr["kv"]["prefill_shrink"] == 1, f"snapshrink flags reported back: {shr['kv']}")
snap = run_json(*PPL, "--kv-policy", "snapkv", "--kv-retention", "0.3", "--kv-obs-window", "16",
                "--kv-pool", "5", "--kv-rho", "0.5", "--kv-gamma", "2", "--kv-recent-ratio", "0.1")
if snap:
    kv = snap["kv"]
    check(kv["policy"] == "snapkv" and kv["obs_window"] == 16 and kv["pool"] == 5 and
          abs(kv["retention"] - 0.3) < 1e-6, f"snapkv flags reported back: {kv}")

# Passkey with the full cache: the model retrieves short-range keys (3/3 with this seed).
pk = run_json("--passkey", "--text", text, "--lengths", "250,300", "--samples", "3", "--seed", "1")
if pk:
    check(set(pk["accuracy"]) == {"250", "300"}, "accuracy per length")
    check(pk["accuracy"]["300"] >= 2 / 3 and pk["accuracy"]["250"] >= 2 / 3, f"full passkey {pk['accuracy']}")
    check(all(abs(pk["mean_prompt_tokens"][k] - int(k)) <= 12 for k in ("250", "300")),
          f"prompt lengths near the request: {pk['mean_prompt_tokens']}")
    check(pk["mean_retention"] == 1.0 and len(pk["results"]) == 6, "retention and results")
    check(all(len(r["key"]) == 5 and r["key"][0] != "0" and 0 <= r["depth"] <= 1 for r in pk["results"]),
          "5-digit keys at recorded depths")

# Plain output: a one-line summary on stdout, progress on stderr.
r = run(*PPL[:-2], "--windows", "1")
check(r.returncode == 0 and r.stdout.startswith("perplexity ") and "window 1/1" in r.stderr,
      "plain output and progress")

# Usage errors exit 2 and name the flag; runtime errors exit 1 and name the problem.
for args, flag in ((("--kv-retention", "0"), "--kv-retention"), (("--kv-policy", "lru"), "--kv-policy"),
                   (("--kv-gen-e", "-1"), "--kv-gen-e"), (("--kv-shrink-start", "x"), "--kv-shrink-start"), (("--windows", "0"), "--windows"),
                   (("--lengths", "300,x"), "--lengths"), (("--bogus",), "--bogus")):
    r = run("--text", text, *args)
    check(r.returncode == 2 and flag in r.stderr, f"usage error for {args}: {r.returncode} {r.stderr[:80]}")
r = run("--windows", "2")
check(r.returncode == 2 and "--text" in r.stderr, "missing --text")
r = run("--text", "/nonexistent/text.txt")
check(r.returncode == 1 and "/nonexistent/text.txt" in r.stderr, "missing text file")
r = run("--text", text, "--prompt-len", "100000", "--eval-len", "10", "--windows", "1")
check(r.returncode == 1 and "fewer than one window" in r.stderr, "windows longer than the text")

finish()
