#!/usr/bin/env python3
"""pyramid-bench end to end with random tiny weights: what it reports (sizes, KV bytes, the
bandwidth model), --prefill-batch, --batch max against a memory limit, and usage errors.

Usage: test_bench.py cpu PATH/TO/pyramid-bench
       test_bench.py cuda-sim PATH/TO/tools/cuda_sim/run.sh   (the CUDA backend on the
           simulated device: run.sh --bench builds and runs it; exits 77 where run.sh skips)
Prints 'N passed, N failed'."""
import json
import os
import subprocess
import sys

from harness import check, finish

mode, tool = sys.argv[1], sys.argv[2]
TINY = ["--shape", "tiny", "--seed", "7"]
N_LAYER = 8  # the tiny shape


def run(*args, env=None):
    cmd = ["bash", tool, "--bench", *args] if mode == "cuda-sim" else [tool, "--device", "cpu", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    if mode == "cuda-sim" and r.returncode == 77:
        print(r.stderr.strip())
        sys.exit(77)  # no CUDA headers here: ctest shows "Skipped"
    return r


def run_json(*args, env=None):
    r = run(*TINY, *args, "--json", env=env)
    check(r.returncode == 0, f"{' '.join(args)}: exit {r.returncode}: {r.stderr[-2000:]}")
    # run.sh prints its build and exit lines around the bench's one JSON line
    lines = [l for l in r.stdout.splitlines() if l.startswith("{")]
    return json.loads(lines[-1]) if r.returncode == 0 and lines else None


def batch_max(policy, limit, prompt, gen, group):
    return run_json("--batch", "max", "--max-device-bytes", limit, "--prompt", str(prompt),
                    "--gen", str(gen), "--prefill-batch", str(group), "--kv-policy", policy,
                    "--kv-retention", "0.5")


def streaming_moves(extra_env=None):
    """kv_rows_moved of a short streaming run: StreamingLLM drops the row after its 4 sinks
    in every layer each decode step."""
    d = run_json("--prompt", "128", "--gen", "8", "--warmup", "0", "--kv-policy", "streaming",
                 "--kv-retention", "0.5", "--batch", "2", env=dict(os.environ, **(extra_env or {})))
    return d["kv_rows_moved"] if d else None


def check_search(d, what):
    """The tries: from the estimate down, every one but the last out of memory."""
    s = d["batch_search"]
    tries = s["tries"]
    check(tries and tries[0]["batch"] == s["estimate"] and tries[-1]["fits"] and
          tries[-1]["batch"] == d["batch"], f"{what}: tries end at the batch run: {s}")
    check(all(not t["fits"] and "budget" in t["error"] for t in tries[:-1]),
          f"{what}: earlier tries ran out of memory: {tries}")
    check(all(a["batch"] > b["batch"] for a, b in zip(tries, tries[1:])), f"{what}: tries decrease")
    check(d["device_memory"]["peak"] <= s["limit_bytes"], f"{what}: peak within the limit")


if mode == "cpu":
    # One sequence, full cache: the KV bytes are the tokens' (fp32 keys and values, 4 KV heads
    # of 64), the bandwidth model adds them to the weights.
    d = run_json("--prompt", "64", "--gen", "8", "--warmup", "0", "--repeat", "2")
    if d:
        row = 2 * 4 * 64 * 4
        check((d["batch"], d["prompt"], d["gen"], d["repeat"], d["policy"], d["device"]) ==
              (1, 64, 8, 2, "full", "cpu"), "sizes and policy reported")
        check(len(d["runs"]) == 2 and d["batch_search"] is None and d["prefill_batch"] == 1,
              "two timed runs, no search")
        check(d["kv_after_prefill"] == {"bytes": N_LAYER * 64 * row, "bytes_full": N_LAYER * 64 * row,
                                        "retention": 1.0}, f"KV after prefill: {d['kv_after_prefill']}")
        check(d["kv_end"]["bytes"] == N_LAYER * 72 * row, f"KV at the end: {d['kv_end']}")
        check(d["device_memory"]["kv"] >= d["kv_end"]["bytes"] and d["device_memory"]["weights"] == 0,
              f"the CPU counts its caches' room: {d['device_memory']}")
        check(d["prefill_ms"] > 0 and d["decode_tokens_per_s"] > 0 and
              abs(d["decode_ms_per_step"] * 8 - d["decode_ms"]) < 1e-6 * d["decode_ms"] + 1e-9,
              "times")
        bw = d["bandwidth"]
        check(bw["bytes_per_step"] == bw["weight_bytes"] + bw["mean_kv_bytes_per_step"] and
              bw["weight_bytes"] > 20e6, f"bandwidth model: {bw}")
        check(d["kv_rows_moved"] == {"prefill": 0, "decode": 0, "bytes_per_row": row},
              f"a full cache moves nothing: {d['kv_rows_moved']}")
    m = streaming_moves()
    if m:
        check(m["decode"] == 2 * N_LAYER * 4 * 8, f"streaming moves its sinks: {m}")

    # pyramid at retention 0.5 keeps about half after the prefill; three sequences prefilled
    # two at a time hold three times one's bytes
    p = run_json("--prompt", "256", "--gen", "4", "--warmup", "0", "--kv-policy", "pyramid",
                 "--kv-retention", "0.5", "--batch", "3", "--prefill-batch", "2")
    if p:
        check(0.4 < p["kv_after_prefill"]["retention"] < 0.6, f"pyramid keeps ~half: {p['kv_after_prefill']}")
        check(p["prefill_batch"] == 2 and p["batch"] == 3, "prefill batch reported")
        check(p["kv_after_prefill"]["bytes_full"] == 3 * N_LAYER * 256 * 2 * 4 * 64 * 4, "three sequences")

    # --batch max: on the CPU only the caches count, so the search is exact for the full
    # cache: B sequences fit and B + 1 do not
    limit = 40 << 20
    f = batch_max("full", str(limit), 256, 16, 4)
    if f:
        check_search(f, "full")
        per = f["batch_search"]["kv_per_sequence_bytes"]
        check(per == N_LAYER * 272 * 2 * 4 * 64 * 4, f"a full sequence holds its 272 tokens: {per}")
        check(f["batch"] * per <= limit < (f["batch"] + 1) * per, f"batch {f['batch']} is the most")
        r = run(*TINY, "--batch", str(f["batch"] + 1), "--max-device-bytes", str(limit), "--prompt",
                "256", "--gen", "16", "--prefill-batch", "4", "--warmup", "0")
        check(r.returncode == 1 and "out of memory" in r.stderr, f"one more does not fit: {r.stderr[-500:]}")
        p = batch_max("pyramid", str(limit), 256, 16, 4)
        if p:
            check_search(p, "pyramid")
            check(p["batch"] > f["batch"], f"pyramid fits more: {p['batch']} > {f['batch']}")

    # usage errors: exit 2 with the reason
    for args, says in [(["--batch", "max"], "--max-device-bytes"),
                       (["--batch", "0"], "--batch"),
                       (["--batch", "many"], "--batch"),
                       (["--prefill-batch", "0"], "--prefill-batch"),
                       (["--shape", "llama4"], "llama3-8b")]:
        r = run(*TINY, *args)
        check(r.returncode == 2 and says in r.stderr, f"{args}: exit {r.returncode}: {r.stderr}")
else:
    # The CUDA backend: weights, scratch and pages against the limit. Pages follow what each
    # layer keeps, so a pyramid sequence needs about half a full one's and more of them fit.
    # The limit leaves room for a few sequences beside the 107 MiB of weights: each try is a
    # whole run on the slow simulated device (140M, 14 and 18 sequences, took 4 min in all).
    limit = "124M"
    f = batch_max("full", limit, 128, 4, 2)
    p = batch_max("pyramid", limit, 128, 4, 2)
    if f and p:
        check(f["device"].startswith("cuda") and f["sampling"] == "device", "on the (simulated) GPU")
        # the tiny shape's head_dim 64: every prefill attention launch on the tensor cores
        pa = f["prefill_attention_launches"]
        check(pa["tensor_cores"] > 0 and pa["cuda_cores"] == 0, f"prefill attention launches: {pa}")
        check_search(f, "full")
        check_search(p, "pyramid")
        fs, ps = f["batch_search"], p["batch_search"]
        check(fs["weights_bytes"] > 100e6 and fs["scratch_per_sequence_bytes"] > 0, f"measures: {fs}")
        check(ps["kv_per_sequence_bytes"] < 0.8 * fs["kv_per_sequence_bytes"],
              f"a pyramid sequence holds fewer pages: {ps['kv_per_sequence_bytes']} vs "
              f"{fs['kv_per_sequence_bytes']}")
        check(p["batch"] > f["batch"], f"pyramid fits more: {p['batch']} > {f['batch']}")
        check(len(fs["tries"]) + len(ps["tries"]) > 2, "a search retried after running out of memory")
        print(f"batch max within {limit}: full {f['batch']} ({fs}), pyramid {p['batch']} ({ps})")
    # the GPU's caches: the sinks move toward the back, or (PYRAMID_KV_BACK_MOVES=0) the
    # window toward the front
    m = streaming_moves()
    front = streaming_moves({"PYRAMID_KV_BACK_MOVES": "0"})
    if m and front:
        check(m["decode"] == 2 * N_LAYER * 4 * 8, f"streaming moves its sinks: {m}")
        check(front["decode"] > 10 * m["decode"], f"the window moves otherwise: {front} vs {m}")
        print(f"streaming's decode, rows moved: {m['decode']} toward the back, {front['decode']} front-only")
finish()
