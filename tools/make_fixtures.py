#!/usr/bin/env python3
"""Make the small HF LLaMA reference fixtures in tests/data/fixtures/.

Regenerate (from the repository root; CPU only, ~20 s on 2 cores):

    python3 tools/make_fixtures.py

Options: --only NAME[,NAME...] (just those fixtures; "bundled" = bundled_reference.json),
--retrain-tokenizer (retrain tests/data/fixtures/tokenizer.model with spm_train instead of
reusing the committed one), --data PATH (python_heldout_dev.txt; default: $PYRAMID_DATA or
../shared/data/python_heldout_dev.txt next to the repository, or /work/shared/data/...).

Requires: python3 with torch, transformers (5.x; made with 5.24), safetensors, sentencepiece,
numpy; `spm_train` on PATH only when (re)training the tokenizer (falls back to the python
sentencepiece trainer).

What it writes (see tests/data/fixtures/README.md for the per-fixture table):
  tokenizer.model          tiny SentencePiece BPE (LLaMA-2 style options), trained on ~200 KB of
                           python_heldout_dev.txt; copied into every fixture directory.
  <name>/                  a self-contained HF checkpoint (config.json, generation_config.json,
                           model.safetensors or shards + model.safetensors.index.json,
                           tokenizer.model) with random weights, plus expected.json:
                           prompt_tokens, last_logits (full fp32 vector), greedy (HF generate,
                           fp32 math on the stored weights), steps (top-5 per step), min_top_gap.
  bundled_reference.json   HF fp32 greedy reference for models/tiny-code-llama (3 prompts).
  tokenizer_cases.json     SentencePiece (python) encodings of edge-case strings for both the
                           tiny tokenizer and the bundled one.
  fixtures.json            machine-readable list of the fixture directories.
  README.md                the fixture table (sizes, seeds, gaps) and caveats; generated.

Checks: config.json read back, tensors/dtypes/shards as intended, reload gives bit-identical
logits, generate == manual cached loop, rope scaling actually changes the logits, and an
independent float64 numpy forward (NumpyLlama, written from shared/docs/FORMATS.md) replays
every expected.json.

Determinism: every fixture uses torch.manual_seed(seed) and a fixed parameter order; if a seed
gives a near-tie in greedy decoding (relative top-1/top-2 gap <= 1e-3), an early EOS or a
degenerate (repetitive) generation, the next seed is tried; the seed used is recorded. Torch runs
single-threaded with deterministic algorithms so reruns give the same bytes.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
import sentencepiece as spm
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "data" / "fixtures"
BUNDLED = ROOT / "models" / "tiny-code-llama"
TOKENIZER = OUT / "tokenizer.model"

BOS, EOS = 1, 2
N_GREEDY = 12            # tokens generated for each tiny fixture
N_GREEDY_BUNDLED = 32    # tokens generated for the bundled model
TOP_K = 5
MIN_REL_GAP = 1e-3       # required relative gap between top-1 and top-2 at every step
MAX_SEED_TRIES = 64

# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------
TOKENIZER_CORPUS_BYTES = 200_000
TOKENIZER_VOCAB = 396    # 259 (unk, bos, eos + 256 byte pieces) + ~85 characters + ~50 merges
SPM_ARGS = [
    "--model_type=bpe",
    f"--vocab_size={TOKENIZER_VOCAB}",
    "--byte_fallback=true",
    "--split_digits=true",
    "--normalization_rule_name=identity",
    "--add_dummy_prefix=true",
    "--allow_whitespace_only_pieces=true",
    "--remove_extra_whitespaces=false",
    "--character_coverage=0.9995",   # rarest characters (; $ ~ \ ...) go through byte fallback
    "--max_sentence_length=8192",
    "--unk_id=0", "--bos_id=1", "--eos_id=2", "--pad_id=-1",
    "--num_threads=1",
    "--minloglevel=1",
]


def find_data(arg: str | None) -> Path:
    cands = [arg, os.environ.get("PYRAMID_DATA"),
             ROOT.parent / "shared" / "data" / "python_heldout_dev.txt",
             ROOT / "shared" / "data" / "python_heldout_dev.txt",
             "/work/shared/data/python_heldout_dev.txt"]
    for c in cands:
        if c and Path(c).is_file():
            return Path(c)
    sys.exit("python_heldout_dev.txt not found; pass --data PATH")


def tokenizer_corpus(data: Path) -> bytes:
    """First ~200 KB of the held-out file, whole lines only, without the \\0FILE\\0 separators."""
    raw = data.read_bytes()[:TOKENIZER_CORPUS_BYTES]
    lines = raw.split(b"\n")[:-1]  # drop the partial last line
    lines = [l for l in lines if l != b"\x00FILE\x00"]
    return b"\n".join(lines) + b"\n"


def train_tokenizer(data: Path) -> None:
    with tempfile.TemporaryDirectory() as td:
        # Relative names: the trainer records input/model_prefix in the model file, so fixed
        # names keep the output byte-identical across runs.
        (Path(td) / "corpus.txt").write_bytes(tokenizer_corpus(data))
        args = ["--input=corpus.txt", "--model_prefix=tokenizer"] + SPM_ARGS
        if shutil.which("spm_train"):
            subprocess.run(["spm_train"] + args, cwd=td, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        else:
            cwd = os.getcwd()
            os.chdir(td)
            try:
                spm.SentencePieceTrainer.train(" ".join(args))
            finally:
                os.chdir(cwd)
        OUT.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(td) / "tokenizer.model", TOKENIZER)
    sp = spm.SentencePieceProcessor(model_file=str(TOKENIZER))
    assert sp.vocab_size() == TOKENIZER_VOCAB, sp.vocab_size()
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2)
    assert sp.id_to_piece(3) == "<0x00>" and sp.id_to_piece(258) == "<0xFF>"


def encode_prompt(sp: spm.SentencePieceProcessor, text: str) -> list[int]:
    return [BOS] + sp.encode_as_ids(text)


# --------------------------------------------------------------------------------------------
# Fixture specs
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Spec:
    name: str
    covers: str
    seed: int
    prompt: str
    dtype: torch.dtype = torch.float32
    layers: int = 2
    heads: int = 4
    kv_heads: int = 4
    head_dim: int | None = None
    hidden: int = 64
    intermediate: int = 128
    vocab: int | None = None          # None: the tokenizer's size
    rms_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope: dict | None = None          # extra rope_parameters (rope_type, factor, ...)
    max_pos: int = 256
    tie: bool = False
    attn_bias: bool = False
    mlp_bias: bool = False
    eos: int | list[int] = EOS
    shard: str | None = None          # max_shard_size for save_pretrained
    prompt_len: tuple[int, int] = (12, 24)  # inclusive range, BOS included
    # hooks (a function per fixture kind):
    adjust: Callable | None = None     # (model, spec, prompt_ids) -> dict, before saving
    post_save: Callable | None = None  # (dir, spec) -> None, rewrites files after saving
    check_config: Callable | None = None  # (config dict, spec) -> None, extra config checks
    expect_eos_stop: bool = False


# ---- fixture-kind hooks ---------------------------------------------------------------------
def to_legacy_config(d: Path, spec: Spec) -> None:
    """Rewrite config.json in transformers 4.x spelling: top-level rope_theta,
    rope_scaling {"type": ...}, torch_dtype instead of dtype, no rope_parameters."""
    cfg = json.loads((d / "config.json").read_text())
    rp = cfg.pop("rope_parameters")
    dt = cfg.pop("dtype")
    scaling = {k: v for k, v in rp.items() if k not in ("rope_theta", "rope_type")}
    scaling = {"type": rp["rope_type"], **scaling}
    out = {}
    for k, v in cfg.items():  # keep key order stable, put new keys where 4.x had them
        if k == "rms_norm_eps":
            out[k] = v
            out["rope_scaling"] = scaling
            out["rope_theta"] = rp["rope_theta"]
        else:
            out[k] = v
    out["torch_dtype"] = dt
    out = dict(sorted(out.items()))
    (d / "config.json").write_text(json.dumps(out, indent=2) + "\n")


def check_legacy_config(cfg: dict, spec: Spec) -> None:
    assert "rope_parameters" not in cfg and "dtype" not in cfg, cfg
    assert cfg["rope_theta"] == spec.rope_theta
    assert cfg["rope_scaling"] == {"type": spec.rope["rope_type"],
                                   **{k: v for k, v in spec.rope.items() if k != "rope_type"}}
    assert cfg["torch_dtype"] == str(spec.dtype).removeprefix("torch.")


def check_tied_file(d: Path, spec: Spec) -> None:
    names = weight_names(d)
    assert "lm_head.weight" not in names, "tied checkpoint must not contain lm_head.weight"
    assert "model.embed_tokens.weight" in names


def stop_on_second_eos(model: LlamaForCausalLM, spec: Spec, prompt_ids: list[int]) -> dict:
    """Make greedy decoding stop on the *second* EOS id (5) of eos_token_id [2, 5]: find the
    greedy run of the random model, take the first token t that first appears at step >= 5, and
    swap lm_head rows t and 5. Earlier steps are unchanged (neither t nor 5 was their argmax),
    and at that step the argmax becomes id 5, so HF generate stops there."""
    eos_ids = spec.eos if isinstance(spec.eos, list) else [spec.eos]
    second = eos_ids[1]
    toks = greedy_manual(model, prompt_ids, N_GREEDY)[0]
    for step in range(5, len(toks)):
        t = toks[step]
        if t not in toks[:step] and t not in eos_ids and not any(x in eos_ids for x in toks[:step]):
            with torch.no_grad():
                w = model.lm_head.weight
                w[[t, second]] = w[[second, t]].clone()
            return {"swapped_lm_head_rows": [t, second], "eos_step": step}
    raise RuntimeError("no suitable step for the EOS swap")


# ---- the table ------------------------------------------------------------------------------
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}

SPECS: list[Spec] = [
    Spec("mha_f32", "baseline: multi-head attention (4 = 4 kv heads), float32, single file",
         seed=1000, prompt="def add(a, b):\n    return a + b"),
    Spec("gqa_f16", "GQA 8 heads / 2 kv heads (head_dim 8), 3 layers, float16, sharded into "
         "several safetensors files with an index; vocab padded past the tokenizer (400 > 396)",
         seed=2000, prompt="for i in range(10):\n    print(i)", dtype=torch.float16, layers=3,
         heads=8, kv_heads=2, intermediate=160, vocab=400, rms_eps=1e-6, shard="64KB"),
    Spec("head_dim_override_bf16", "head_dim 24 != hidden/heads (16): q/k/v are [96,64], "
         "o_proj [64,96]; bfloat16", seed=3000, prompt="class Point:\n    x: int = 0",
         dtype=torch.bfloat16, head_dim=24),
    Spec("tied_f32", "tie_word_embeddings: no lm_head.weight in the file, logits use "
         "embed_tokens", seed=4000, prompt="import os\np = os.getcwd()", tie=True),
    Spec("rope_llama3", "rope_parameters llama3 (factor 8, low 1, high 4, original_max 64, "
         "theta 500000, head_dim 16: high, medium and low frequency bands all present); "
         "bfloat16; vocab padded (400)", seed=5000, prompt="x = [n * 2 for n in data]",
         dtype=torch.bfloat16, vocab=400, rope_theta=500000.0, rope=LLAMA3, max_pos=512),
    Spec("rope_linear", "linear rope scaling factor 2; config.json in transformers 4.x "
         "spelling (rope_theta top level, rope_scaling.type, torch_dtype); float16",
         seed=6000, prompt="if x > 0:\n    y = x; z = 1", dtype=torch.float16,
         rope={"rope_type": "linear", "factor": 2.0}, max_pos=512,
         post_save=to_legacy_config, check_config=check_legacy_config),
    Spec("rope_dynamic", "dynamic NTK rope (factor 2, max_position_embeddings 16) with a "
         "31-token prompt so scaling is active from the prefill on; HF cached-generate semantics",
         seed=7000, prompt="def mean(xs):\n    return sum(xs) / n",
         rope={"rope_type": "dynamic", "factor": 2.0}, max_pos=16, prompt_len=(24, 32)),
    Spec("bias_f32", "attention_bias (q,k,v,o) and mlp_bias (gate,up,down), nonzero random "
         "biases; float32", seed=8000, prompt="while n != 1:\n    n //= 2",
         attn_bias=True, mlp_bias=True),
    Spec("eos_list", "eos_token_id [2, 5] (list): greedy generation stops on id 5, the second "
         "EOS id; otherwise like mha_f32", seed=9000, prompt="return {'a': 1, 'b': 2}",
         eos=[2, 5], adjust=stop_on_second_eos, expect_eos_stop=True),
]


# --------------------------------------------------------------------------------------------
# Model construction
# --------------------------------------------------------------------------------------------
def make_config(spec: Spec, n_vocab: int) -> LlamaConfig:
    rope = {"rope_type": "default", "rope_theta": spec.rope_theta}
    if spec.rope:
        rope = {**spec.rope, "rope_theta": spec.rope_theta}
    kw = {}
    if spec.head_dim is not None:
        kw["head_dim"] = spec.head_dim
    return LlamaConfig(
        vocab_size=n_vocab, hidden_size=spec.hidden, intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads, max_position_embeddings=spec.max_pos,
        rms_norm_eps=spec.rms_eps, rope_parameters=rope, tie_word_embeddings=spec.tie,
        attention_bias=spec.attn_bias, mlp_bias=spec.mlp_bias, bos_token_id=BOS,
        eos_token_id=spec.eos, pad_token_id=None, **kw)


def init_weights(model: LlamaForCausalLM, spec: Spec) -> None:
    """Random weights with non-degenerate activations: projections ~ N(0, 1/fan_in) so every
    layer (and thus attention/RoPE) changes the residual stream noticeably; norm weights
    ~ 1 + N(0, 0.1^2) so a loader that ignores them fails; biases ~ N(0, 0.1^2);
    embeddings N(0, 1) (N(0, 0.01) when tied: larger tied embeddings make
    the model just repeat its input token); lm_head N(0, 4/H)."""
    h = spec.hidden
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):  # tied lm_head is listed once
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape))
            elif name == "model.embed_tokens.weight":
                p.copy_((0.1 if spec.tie else 1.0) * torch.randn(p.shape))
            elif name == "lm_head.weight":
                p.copy_((2.0 / math.sqrt(h)) * torch.randn(p.shape))
            else:
                p.copy_(torch.randn(p.shape) / math.sqrt(p.shape[1]))
    if spec.tie:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def build_model(spec: Spec, n_vocab: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(make_config(spec, n_vocab)).to(torch.float32).eval()
    init_weights(model, spec)
    return model


def load_fp32(d: Path) -> LlamaForCausalLM:
    """Fresh model from disk, weights upcast to float32 (what the CPU engine does). Always a
    fresh instance: dynamic rope keeps state between forwards."""
    return LlamaForCausalLM.from_pretrained(d, dtype=torch.float32).eval()


def weight_names(d: Path) -> set[str]:
    names = set()
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(f, "pt") as sf:
            names |= set(sf.keys())
    return names


# --------------------------------------------------------------------------------------------
# Reference computations
# --------------------------------------------------------------------------------------------
def r6(x: float) -> float:
    return float(f"{x:.6g}")


def topk(logits: torch.Tensor, k: int = TOP_K) -> list[list]:
    v, i = torch.topk(logits.float(), k)
    return [[int(a), r6(float(b))] for a, b in zip(i, v)]


def rel_gap(logits: torch.Tensor) -> float:
    """(top1 - top2) / max(|top1|, |top2|, 1)."""
    v, _ = torch.topk(logits.double(), 2)
    return float((v[0] - v[1]) / max(abs(v[0]), abs(v[1]), 1.0))


@torch.no_grad()
def greedy_generate(model: LlamaForCausalLM, prompt: list[int], n: int, eos) -> tuple:
    """HF generate, greedy, default (dynamic) cache; returns (tokens, raw logits per step)."""
    eos_list = eos if isinstance(eos, list) else [eos]
    out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=n,
                         output_logits=True, return_dict_in_generate=True,
                         eos_token_id=eos_list, pad_token_id=eos_list[0],
                         temperature=None, top_p=None, top_k=None)
    toks = out.sequences[0, len(prompt):].tolist()
    logits = [l[0].float() for l in out.logits]
    assert len(toks) == len(logits)
    return toks, logits


@torch.no_grad()
def greedy_manual(model: LlamaForCausalLM, prompt: list[int], n: int, eos=None) -> tuple:
    """Manual loop with the KV cache (prefill once, then one token per forward)."""
    from transformers import DynamicCache
    eos_list = [] if eos is None else (eos if isinstance(eos, list) else [eos])
    cache = DynamicCache(config=model.config)
    cur = torch.tensor([prompt])
    toks, logits = [], []
    for _ in range(n):
        out = model(input_ids=cur, cache=cache, use_cache=True)  # 5.x name of past_key_values
        cache = out.cache
        l = out.logits[0, -1].float()
        t = int(torch.argmax(l))
        toks.append(t)
        logits.append(l)
        if t in eos_list:
            break
        cur = torch.tensor([[t]])
    return toks, logits


@torch.no_grad()
def greedy_recompute(model_factory, prompt: list[int], n: int) -> tuple:
    """No cache: a fresh model and a full forward over the whole sequence at every step."""
    seq, logits = list(prompt), []
    for _ in range(n):
        l = model_factory()(torch.tensor([seq])).logits[0, -1].float()
        logits.append(l)
        seq.append(int(torch.argmax(l)))
    return seq[len(prompt):], logits


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


# --------------------------------------------------------------------------------------------
# One tiny fixture
# --------------------------------------------------------------------------------------------
def save_checkpoint(model: LlamaForCausalLM, spec: Spec, d: Path) -> None:
    if d.exists():
        shutil.rmtree(d)
    m = copy.deepcopy(model).to(spec.dtype)  # (the non-persistent inv_freq buffer is not saved)
    kw = {"max_shard_size": spec.shard} if spec.shard else {}
    m.save_pretrained(d, safe_serialization=True, **kw)
    shutil.copyfile(TOKENIZER, d / "tokenizer.model")
    if spec.post_save:
        spec.post_save(d, spec)


def verify_saved(d: Path, spec: Spec, n_vocab: int, model: LlamaForCausalLM,
                 prompt: list[int]) -> dict:
    """Config read back; weights present; reload gives the same logits as the in-memory model
    rounded to the stored dtype."""
    cfg = json.loads((d / "config.json").read_text())
    hd = spec.head_dim or spec.hidden // spec.heads
    assert cfg["vocab_size"] == n_vocab and cfg["hidden_size"] == spec.hidden
    assert cfg["num_hidden_layers"] == spec.layers
    assert cfg["num_attention_heads"] == spec.heads
    assert cfg["num_key_value_heads"] == spec.kv_heads
    assert cfg["head_dim"] == hd and cfg["intermediate_size"] == spec.intermediate
    assert cfg["rms_norm_eps"] == spec.rms_eps and cfg["max_position_embeddings"] == spec.max_pos
    assert cfg["tie_word_embeddings"] == spec.tie
    assert cfg["attention_bias"] == spec.attn_bias and cfg["mlp_bias"] == spec.mlp_bias
    assert cfg["eos_token_id"] == spec.eos and cfg["bos_token_id"] == BOS
    if spec.check_config:
        spec.check_config(cfg, spec)
    else:
        want_rope = {"rope_type": "default", "rope_theta": spec.rope_theta}
        if spec.rope:
            want_rope = {**spec.rope, "rope_theta": spec.rope_theta}
        assert cfg["rope_parameters"] == want_rope, cfg["rope_parameters"]
        assert cfg["dtype"] == str(spec.dtype).removeprefix("torch.")
    names = weight_names(d)
    if spec.tie:
        check_tied_file(d, spec)
    else:
        assert "lm_head.weight" in names
    idx = d / "model.safetensors.index.json"
    if spec.shard:
        wm = json.loads(idx.read_text())["weight_map"]
        assert set(wm) == names and len(set(wm.values())) > 1, "expected several shards"
    else:
        assert not idx.exists() and (d / "model.safetensors").exists()
    with safe_open(next(d.glob("*.safetensors")), "pt") as sf:
        k = next(iter(sf.keys()))
        assert sf.get_tensor(k).dtype == spec.dtype
    # logits: in-memory model with weights rounded to the stored dtype vs fresh reload
    # (round the parameters only: casting the module would also round the rotary inv_freq buffer)
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(p.to(spec.dtype).to(torch.float32))
    with torch.no_grad():
        a = ref(torch.tensor([prompt])).logits[0]
        b = load_fp32(d)(torch.tensor([prompt])).logits[0]
    diff = max_abs_diff(a, b)
    assert diff == 0.0, f"{spec.name}: reload changed logits by {diff}"
    return {"files": sorted(p.name for p in d.iterdir())}


def rope_sensitivity(d: Path, spec: Spec, prompt: list[int]) -> float:
    """How much the rope scaling changes the prefill logits (vs plain rope, same weights)."""
    m = load_fp32(d)
    cfg = copy.deepcopy(m.config)
    cfg.rope_parameters = {"rope_type": "default", "rope_theta": spec.rope_theta}
    plain = LlamaForCausalLM(cfg).eval()
    plain.load_state_dict(m.state_dict(), strict=False)
    if spec.tie:
        plain.tie_weights()
    with torch.no_grad():
        a = m(torch.tensor([prompt])).logits[0, -1]
        b = plain(torch.tensor([prompt])).logits[0, -1]
    return max_abs_diff(a, b)


def try_seed(spec: Spec, sp, n_vocab: int, seed: int, d: Path) -> dict | None:
    prompt = encode_prompt(sp, spec.prompt)
    lo, hi = spec.prompt_len
    assert lo <= len(prompt) <= hi, f"{spec.name}: prompt has {len(prompt)} tokens"
    model = build_model(spec, n_vocab, seed)
    extra = spec.adjust(model, spec, prompt) if spec.adjust else {}
    save_checkpoint(model, spec, d)
    info = verify_saved(d, spec, n_vocab, model, prompt)

    toks, logits = greedy_generate(load_fp32(d), prompt, N_GREEDY, spec.eos)
    eos_list = spec.eos if isinstance(spec.eos, list) else [spec.eos]
    stopped = bool(toks) and toks[-1] in eos_list
    gaps = [rel_gap(l) for l in logits]
    min_gap = min(gaps)
    why = None
    if min_gap <= MIN_REL_GAP:
        why = f"near-tie (min relative gap {min_gap:.2e})"
    elif stopped != spec.expect_eos_stop:
        why = f"stopped_at_eos={stopped}"
    elif len(set(toks)) < min(len(toks), 5):
        why = f"degenerate greedy {toks}"
    if why:
        print(f"  {spec.name}: seed {seed} rejected: {why}")
        return None

    # cross-checks: fresh prefill forward and a manual cached loop agree with generate
    with torch.no_grad():
        last = load_fp32(d)(torch.tensor([prompt])).logits[0, -1].float()
    assert max_abs_diff(last, logits[0]) < 1e-5, max_abs_diff(last, logits[0])
    mtoks, mlogits = greedy_manual(load_fp32(d), prompt, N_GREEDY, spec.eos)
    assert mtoks == toks, (mtoks, toks)
    manual_diff = max(max_abs_diff(a, b) for a, b in zip(mlogits, logits))
    assert manual_diff < 1e-4, manual_diff

    n_tok = sp.vocab_size()
    exp = {
        "name": spec.name,
        "covers": spec.covers,
        "seed": seed,
        "n_vocab": n_vocab,
        "tokenizer_vocab": n_tok,
        "prompt_text": spec.prompt,
        "prompt_tokens": prompt,
        "eos_token_id": spec.eos,
        "last_logits": [r6(float(x)) for x in last],
        "greedy": toks,
        "stopped_at_eos": stopped,
        "steps": [topk(l) for l in logits],
        "min_top_gap": r6(min_gap),
        "greedy_text": sp.decode_ids([t for t in toks if t < n_tok]),
        "generator": "transformers " + __import__("transformers").__version__ + ", torch "
                     + torch.__version__.split("+")[0] + ", fp32 math on stored weights; "
                     "tools/make_fixtures.py",
        "notes": {"manual_cached_loop_max_logit_diff": float(f"{manual_diff:.3g}"),
                  "files": info["files"], **extra},
    }
    if spec.rope:
        exp["notes"]["rope_scaling_effect_on_last_logits"] = r6(rope_sensitivity(d, spec, prompt))
        assert exp["notes"]["rope_scaling_effect_on_last_logits"] > 1e-2
    if spec.rope and spec.rope["rope_type"] == "dynamic":
        assert len(prompt) > spec.max_pos
        rec, rec_logits = greedy_recompute(lambda: load_fp32(d), prompt, len(toks))
        diffs = [max_abs_diff(a, b) for a, b in zip(rec_logits, logits)]
        assert diffs[0] < 1e-5 and max(diffs) > 1e-2, diffs  # same prefill, then they differ
        exp["notes"]["dynamic_rope"] = (
            "HF recomputes inv_freq when max(position)+1 grows past the cached length: the "
            "prefill uses theta(S=len(prompt)) for all prompt positions, the token at position "
            "p is rotated (q and its cached k) with theta(p+1); cached keys are NOT re-rotated. "
            "greedy/steps follow that (HF generate with its cache). A no-cache recompute of the "
            "whole sequence each step (all positions at theta(len)) gives "
            "greedy_if_recomputed_without_cache instead.")
        exp["notes"]["greedy_if_recomputed_without_cache"] = rec
        exp["notes"]["max_logit_diff_cached_vs_recomputed"] = r6(max(diffs))
    return exp


def make_tiny_fixture(spec: Spec, sp) -> dict:
    d = OUT / spec.name
    n_vocab = spec.vocab or sp.vocab_size()
    for seed in range(spec.seed, spec.seed + MAX_SEED_TRIES):
        exp = try_seed(spec, sp, n_vocab, seed, d)
        if exp:
            (d / "expected.json").write_text(dump_json(exp))
            print(f"  {spec.name}: seed {seed}, prompt {len(exp['prompt_tokens'])} tok, greedy "
                  f"{exp['greedy']}, stopped_at_eos={exp['stopped_at_eos']}, "
                  f"min_top_gap {exp['min_top_gap']:.3g}")
            return exp
    raise RuntimeError(f"{spec.name}: no acceptable seed")


# --------------------------------------------------------------------------------------------
# Bundled model reference
# --------------------------------------------------------------------------------------------
def bundled_snippet(data: Path, sp, n_tokens: int = 100) -> str:
    """Whole lines of the held-out set from its first top-level `def`, up to ~100 tokens."""
    text = data.read_bytes()[:200_000].decode("utf-8")
    start = text.index("\ndef ") + 1
    lines = text[start:].split("\n")
    out = ""
    for ln in lines:
        nxt = out + ln + "\n"
        if len(sp.encode_as_ids(nxt)) > n_tokens:
            break
        out = nxt
    return out


def make_bundled_reference(data: Path) -> dict:
    sp = spm.SentencePieceProcessor(model_file=str(BUNDLED / "tokenizer.model"))
    prompts = ["def fibonacci(n):", "import os\nimport sys\n\n", bundled_snippet(data, sp)]
    model = load_fp32(BUNDLED)
    cfg = json.loads((BUNDLED / "config.json").read_text())
    eos = cfg["eos_token_id"]
    results = []
    for text in prompts:
        ids = encode_prompt(sp, text)
        toks, logits = greedy_generate(model, ids, N_GREEDY_BUNDLED, eos)
        mtoks, mlogits = greedy_manual(load_fp32(BUNDLED), ids, N_GREEDY_BUNDLED, eos)
        assert mtoks == toks
        manual_diff = max(max_abs_diff(a, b) for a, b in zip(mlogits, logits))
        assert manual_diff < 1e-3, manual_diff
        steps = []
        for t, l in zip(toks, logits):
            lp = torch.log_softmax(l.double(), -1)
            steps.append({"top5": topk(l), "token": t, "logit": r6(float(l[t])),
                          "logprob": r6(float(lp[t]))})
        eos_list = eos if isinstance(eos, list) else [eos]
        results.append({
            "text": text,
            "prompt_tokens": ids,
            "n_prompt": len(ids),
            "greedy": toks,
            "greedy_text": sp.decode_ids(toks),
            "stopped_at_eos": bool(toks) and toks[-1] in eos_list,
            "steps": steps,
            "min_top_gap": r6(min(rel_gap(l) for l in logits)),
            "manual_cached_loop_max_logit_diff": float(f"{manual_diff:.3g}"),
        })
        print(f"  bundled: {len(ids)} prompt tokens -> {sp.decode_ids(toks)!r} "
              f"(min_top_gap {results[-1]['min_top_gap']:.3g})")
    ref = {
        "model": "models/tiny-code-llama",
        "what": "HF transformers greedy generation, weights (float16) upcast to float32 "
                "(dtype=torch.float32), default dynamic cache; prompt = [BOS=1] + "
                "SentencePiece EncodeAsIds(text). steps[i]: top-5 [[id, logit]] of the "
                "logits that produced greedy[i], the chosen token, its logit and log_softmax. "
                "min_top_gap = min over steps of (top1-top2)/max(|top1|,|top2|,1).",
        "n_new_tokens": N_GREEDY_BUNDLED,
        "generator": "transformers " + __import__("transformers").__version__ + ", torch "
                     + torch.__version__.split("+")[0] + "; tools/make_fixtures.py",
        "prompts": results,
    }
    (OUT / "bundled_reference.json").write_text(dump_json(ref))
    return ref


# --------------------------------------------------------------------------------------------
# Tokenizer cases
# --------------------------------------------------------------------------------------------
TOKENIZER_TEXTS = [
    "", " ", "a", "hello world", "  two leading spaces", "trailing spaces   ",
    "def f(x):\n\treturn x**2  # tab, newline", "x = 1234567890", "3.14159e-10",
    "multiple\n\n\nnewlines\n", "café naïve — “quotes”", "emoji 🐍🚀 and CJK 漢字",
    "if a != b and c <= d: pass;", "    indented = True", "self.assertEqual(a, b)",
    "\x00\x01 control", "~$^&\\ rare", "<s> </s> <unk> are text here",
]


def make_tokenizer_cases() -> None:
    out = {"what": "SentencePiece python EncodeAsIds(text) without BOS, pieces, and "
                   "DecodeIds(ids); our tokenizer must match ids exactly.",
           "tokenizers": {}}
    for label, path in [("tests/data/fixtures/tokenizer.model", TOKENIZER),
                        ("models/tiny-code-llama/tokenizer.model", BUNDLED / "tokenizer.model")]:
        sp = spm.SentencePieceProcessor(model_file=str(path))
        cases = []
        for t in TOKENIZER_TEXTS:
            ids = sp.encode_as_ids(t)
            cases.append({"text": t, "ids": ids, "pieces": sp.encode_as_pieces(t),
                          "decoded": sp.decode_ids(ids)})
        out["tokenizers"][label] = {"vocab_size": sp.vocab_size(), "cases": cases}
    (OUT / "tokenizer_cases.json").write_text(dump_json(out))


# --------------------------------------------------------------------------------------------
# Independent check: a float64 numpy forward written from shared/docs/FORMATS.md (not from HF)
# --------------------------------------------------------------------------------------------
class NumpyLlama:
    """Reads config.json (4.x or 5.x spelling) + safetensors, keeps a KV cache. Dynamic rope
    follows HF's cached semantics: each forward of T new tokens after n cached ones uses
    theta(n + T) for the new tokens only."""

    def __init__(self, d: Path):
        import numpy as np
        from safetensors.torch import load_file
        self.np = np
        self.cfg = c = json.loads((d / "config.json").read_text())
        self.W = {}
        for f in sorted(d.glob("*.safetensors")):
            self.W.update({k: v.double().numpy() for k, v in load_file(f).items()})
        self.nh = c["num_attention_heads"]
        self.nkv = c.get("num_key_value_heads") or self.nh
        self.hd = c.get("head_dim") or c["hidden_size"] // self.nh
        self.K = [None] * c["num_hidden_layers"]
        self.V = [None] * c["num_hidden_layers"]
        self.n = 0
        if "rope_parameters" in c:
            self.rp = dict(c["rope_parameters"])
            self.theta = self.rp.get("rope_theta", 10000.0)
            self.rtype = self.rp.get("rope_type", "default")
        else:
            self.rp = dict(c.get("rope_scaling") or {})
            self.theta = c.get("rope_theta", 10000.0)
            self.rtype = self.rp.get("rope_type", self.rp.get("type", "default"))

    def inv_freq(self, S: int):
        np, hd, rp, theta = self.np, self.hd, self.rp, self.theta
        M = self.cfg["max_position_embeddings"]
        if self.rtype == "dynamic" and S > M:
            theta = theta * ((rp["factor"] * S / M) - (rp["factor"] - 1)) ** (hd / (hd - 2))
        f = 1.0 / theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
        if self.rtype == "linear":
            f = f / rp["factor"]
        elif self.rtype == "llama3":
            L, lo, hi = (rp["original_max_position_embeddings"], rp["low_freq_factor"],
                         rp["high_freq_factor"])
            wl = 2 * math.pi / f
            s = (L / wl - lo) / (hi - lo)
            f = np.where(wl < L / hi, f, np.where(wl > L / lo, f / rp["factor"],
                                                  (1 - s) * f / rp["factor"] + s * f))
        return f

    def forward(self, ids: list[int]):
        np, c, W = self.np, self.cfg, self.W
        eps, T, hd = c["rms_norm_eps"], len(ids), self.hd
        pos = np.arange(self.n, self.n + T, dtype=np.float64)
        ang = pos[:, None] * self.inv_freq(self.n + T)[None, :]
        cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]

        def rms(x, w):
            return w * (x / np.sqrt((x * x).mean(-1, keepdims=True) + eps))

        def lin(x, name):
            y = x @ W[name + ".weight"].T
            return y + W[name + ".bias"] if name + ".bias" in W else y

        def rope(x):
            a, b = x[..., :hd // 2], x[..., hd // 2:]
            return np.concatenate([a * cos - b * sin, b * cos + a * sin], -1)

        x = W["model.embed_tokens.weight"][ids]
        g = self.nh // self.nkv
        for l in range(c["num_hidden_layers"]):
            p = f"model.layers.{l}."
            h = rms(x, W[p + "input_layernorm.weight"])
            q = rope(lin(h, p + "self_attn.q_proj").reshape(T, self.nh, hd))
            k = rope(lin(h, p + "self_attn.k_proj").reshape(T, self.nkv, hd))
            v = lin(h, p + "self_attn.v_proj").reshape(T, self.nkv, hd)
            self.K[l] = k if self.K[l] is None else np.concatenate([self.K[l], k])
            self.V[l] = v if self.V[l] is None else np.concatenate([self.V[l], v])
            mask = np.arange(self.n + T)[None, :] > pos[:, None]
            o = np.zeros((T, self.nh, hd))
            for hh in range(self.nh):
                sc = q[:, hh] @ self.K[l][:, hh // g].T / math.sqrt(hd)
                sc[mask] = -np.inf
                sc = np.exp(sc - sc.max(-1, keepdims=True))
                o[:, hh] = (sc / sc.sum(-1, keepdims=True)) @ self.V[l][:, hh // g]
            x = x + lin(o.reshape(T, -1), p + "self_attn.o_proj")
            h = rms(x, W[p + "post_attention_layernorm.weight"])
            gate, up = lin(h, p + "mlp.gate_proj"), lin(h, p + "mlp.up_proj")
            x = x + lin(gate / (1 + np.exp(-gate)) * up, p + "mlp.down_proj")
        self.n += T
        lm = W.get("lm_head.weight", W["model.embed_tokens.weight"])
        return rms(x[-1], W["model.norm.weight"]) @ lm.T


def numpy_check(name: str) -> float:
    """Replays expected.json with NumpyLlama; returns the max |logit difference| seen."""
    import numpy as np
    d = OUT / name
    e = json.loads((d / "expected.json").read_text())
    m = NumpyLlama(d)
    logits = m.forward(e["prompt_tokens"])
    worst = float(np.abs(logits - np.array(e["last_logits"])).max())
    eos = e["eos_token_id"] if isinstance(e["eos_token_id"], list) else [e["eos_token_id"]]
    toks = []
    for step in e["steps"]:
        toks.append(int(np.argmax(logits)))
        worst = max([worst] + [abs(logits[i] - v) for i, v in step])
        if toks[-1] in eos or len(toks) == len(e["steps"]):
            break
        logits = m.forward([toks[-1]])
    assert toks == e["greedy"], f"{name}: numpy greedy {toks} != {e['greedy']}"
    assert worst < 1e-4, f"{name}: numpy logits differ by {worst}"
    return worst


# --------------------------------------------------------------------------------------------
# README
# --------------------------------------------------------------------------------------------
README_HEAD = """# Test fixtures (generated — do not edit by hand)

Small HF LLaMA checkpoints with random weights plus HF transformers reference outputs, and a
greedy reference for the bundled `models/tiny-code-llama`. Regenerate everything (CPU, well
under a minute) from the repository root with

    python3 tools/make_fixtures.py

(`--only NAME[,NAME]` for some of them; `bundled` = bundled_reference.json). This README is
written by that script too. The output is deterministic (fixed seeds, single-threaded torch);
a different torch/transformers version may change the last digits of the logits.

## Checkpoints

Every directory is a self-contained HF checkpoint — `config.json`, `generation_config.json`,
`model.safetensors` (or shards + `model.safetensors.index.json`), `tokenizer.model` (a copy of
`./tokenizer.model`) — plus `expected.json`. All: LlamaForCausalLM, hidden 64, SiLU MLP,
BOS 1, EOS 2 (unless noted), vocab = tokenizer size (396) unless noted.

| fixture | dtype | layers / heads / kv / head_dim / inter | vocab | files | size | seed | min_top_gap | covers |
|---|---|---|---|---|---|---|---|---|
"""

README_TAIL = """
## expected.json

- `prompt_tokens`: BOS (1) + SentencePiece `EncodeAsIds(prompt_text)` with the fixture
  tokenizer (12–24 ids; 31 for rope_dynamic so that it exceeds max_position_embeddings 16).
- `last_logits`: all `n_vocab` logits (6 significant digits) at the last prompt position,
  HF forward in float32 with the stored F16/BF16 weights upcast (`dtype=torch.float32`) —
  i.e. fp32 math on the stored weights, what the CPU engine does.
- `greedy`: HF `generate(do_sample=False, max_new_tokens=12)` in float32 with its default
  dynamic KV cache (prefill of the whole prompt in one forward, then one token per forward).
  It stops at an EOS id (the EOS token is included) and then `stopped_at_eos` is true (only
  eos_list does, on id 5).
- `steps[i]`: top-5 `[[id, logit], ...]` of the raw logits that chose `greedy[i]`
  (`steps[0]` is the top of `last_logits`).
- `min_top_gap`: min over steps of (top1 − top2) / max(|top1|, |top2|, 1); seeds were chosen
  so it is > 1e-3 (no near-ties) and the generation is not degenerate.
- `n_vocab` (model), `tokenizer_vocab`, `eos_token_id`, `seed`, `greedy_text`
  (decoded, ids ≥ tokenizer size dropped), `notes` (cross-checks, rope details).

Checks the generator makes: config.json read back (5.x: `rope_parameters`, `dtype`;
rope_linear: 4.x spelling), tensors/dtypes/shards as intended, `lm_head.weight` absent when
tied, a fresh `from_pretrained` gives bit-identical logits to the in-memory model, generate
agrees with a fresh prefill forward and with a manual cached loop, every rope variant changes
the logits (vs plain rope) by > 1e-2, and an independent float64 numpy forward written from
`shared/docs/FORMATS.md` reproduces `last_logits`, `greedy` and `steps` (max diff ~7e-6, i.e.
the 6-digit rounding).

Suggested tolerances for an fp32 engine: |logit − expected| ≤ 1e-4 (absolute; logits are
O(1–10)), greedy ids exact.

## Caveats (HF behaviour)

- **Dynamic NTK rope is stateful in HF.** The rotary module recomputes `inv_freq` when
  max(position)+1 exceeds the length it last cached: the prefill uses
  theta(S = prompt length) for all prompt positions; the decode token at position p uses
  theta(p+1) for its q and k; keys already in the cache are *not* re-rotated. So the result
  depends on how the sequence was chunked (a chunked prefill would differ) and even on what
  the module saw before (it only resets when a later input is shorter than
  max_position_embeddings) — the generator always uses a fresh model. rope_dynamic's
  `greedy`/`steps` follow the cached semantics; recomputing the whole sequence without a cache
  gives the same tokens here but logits differing by up to
  `notes.max_logit_diff_cached_vs_recomputed` (~0.27), so the steps do discriminate.
- **Tied embeddings:** `save_pretrained` drops `lm_head.weight` when
  `tie_word_embeddings` is true (verified); the loader must use `model.embed_tokens.weight`.
- **Vocab padding:** gqa_f16 and rope_llama3 have `vocab_size` 400 > 396 tokenizer pieces;
  greedy may produce ids ≥ 396, which have no piece (the detokenizer must cope).
- **eos_list** is a random model whose `lm_head` rows 5 and t were swapped (see
  `notes.swapped_lm_head_rows`), so greedy decoding hits id 5 — the second entry of
  `eos_token_id: [2, 5]` — at step 7 and must stop there; HF generate stops on any id in
  the list (from generation_config.json, which save_pretrained writes alongside).
- **transformers 5.x spelling:** config.json has `rope_parameters` (with `rope_theta`,
  `rope_type` and the scaling keys) and `dtype`; rope_linear was rewritten to the 4.x
  spelling (`rope_theta` top level, `rope_scaling: {"type": "linear", "factor": 2.0}`,
  `torch_dtype`), which transformers 5.x still reads identically (verified by logits).
- **Tokenizer:** `tokenizer.model` was trained with `spm_train` 0.1.97 (Debian). The python
  sentencepiece 0.2.x trainer with the same options gives different merges, so the script
  reuses the committed model unless `--retrain-tokenizer` is given. Options: BPE, vocab 396,
  byte_fallback, split_digits, identity normalisation, add_dummy_prefix,
  allow_whitespace_only_pieces, remove_extra_whitespaces=false, character_coverage 0.9995
  (`; $ ~ \\ ^ & Q Z J ...` and `\\n` go through byte fallback), unk 0 / bos 1 / eos 2,
  trained on the first 200 KB of python_heldout_dev.txt without the `\\0FILE\\0` lines.
- Random-weight scale: projections N(0, 1/fan_in), norm weights 1 + N(0, 0.01), biases
  N(0, 0.01), embeddings N(0, 1) (N(0, 0.01) when tied), lm_head N(0, 4/hidden).

## Other files

- `tokenizer.model`: the tiny SentencePiece model above.
- `bundled_reference.json`: models/tiny-code-llama (F16, 10 layers, vocab 4096, 4 shards),
  3 prompts (`def fibonacci(n):`, `import os\\nimport sys\\n\\n`, ~90 tokens of held-out
  Python); prompt ids = BOS + python SentencePiece `EncodeAsIds` (our C++ tokenizer must give
  the same ids), then HF fp32 greedy generation of 32 tokens: per step top-5 `[[id, logit]]`,
  the chosen token, its logit and log_softmax, plus min_top_gap.
- `tokenizer_cases.json`: python SentencePiece ids / pieces / decode for edge-case strings
  (spaces, tabs, newlines, digits, non-ASCII, emoji, control chars, literal `<s>`), for both
  the tiny tokenizer and the bundled one.
- `fixtures.json`: the list of checkpoint directories and what each covers.
"""


def dir_size(d: Path) -> int:
    return sum(f.stat().st_size for f in d.iterdir() if f.is_file())


def write_readme() -> None:
    rows = []
    for spec in SPECS:
        d = OUT / spec.name
        if not (d / "expected.json").exists():
            continue
        e = json.loads((d / "expected.json").read_text())
        hd = spec.head_dim or spec.hidden // spec.heads
        n_st = len(list(d.glob("*.safetensors")))
        files = "1 file" if n_st == 1 else f"{n_st} shards + index"
        dt = str(spec.dtype).removeprefix("torch.")
        rows.append(f"| {spec.name} | {dt} | {spec.layers} / {spec.heads} / {spec.kv_heads} / "
                    f"{hd} / {spec.intermediate} | {e['n_vocab']} | {files} | "
                    f"{dir_size(d) / 1024:.0f} KB | {e['seed']} | {e['min_top_gap']:.3g} | "
                    f"{spec.covers} |")
    total = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    ref = OUT / "bundled_reference.json"
    gaps = ""
    if ref.exists():
        r = json.loads(ref.read_text())
        gaps = ", ".join(f"{p['min_top_gap']:.3g}" for p in r["prompts"])
        gaps = f"\nbundled_reference.json min_top_gap per prompt: {gaps}.\n"
    (OUT / "README.md").write_text(README_HEAD + "\n".join(rows) + "\n" + gaps +
                                   f"\nTotal size of tests/data/fixtures: about "
                                   f"{total / 1024:.0f} KB.\n" + README_TAIL)


# --------------------------------------------------------------------------------------------
def dump_json(obj) -> str:
    """Indented JSON with short numeric lists kept on one line."""
    def enc(o, ind):
        pad = "  " * ind
        if isinstance(o, dict):
            if not o:
                return "{}"
            items = [f'{pad}  {json.dumps(k)}: {enc(v, ind + 1)}' for k, v in o.items()]
            return "{\n" + ",\n".join(items) + "\n" + pad + "}"
        if isinstance(o, list):
            flat = json.dumps(o, ensure_ascii=False)
            if all(not isinstance(x, (dict,)) for x in o) and (
                    len(flat) < 100 or all(not isinstance(x, (list, dict)) for x in o)):
                return flat
            return "[\n" + ",\n".join(f"{pad}  {enc(x, ind + 1)}" for x in o) + "\n" + pad + "]"
        return json.dumps(o, ensure_ascii=False)
    return enc(obj, 0) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default="", help="comma-separated fixture names (bundled = "
                    "bundled_reference.json, tokenizer_cases)")
    ap.add_argument("--retrain-tokenizer", action="store_true")
    ap.add_argument("--data", default=None)
    args = ap.parse_args()
    only = set(filter(None, args.only.split(",")))
    unknown = only - {s.name for s in SPECS} - {"bundled", "tokenizer_cases"}
    if unknown:
        ap.error(f"unknown fixture(s): {', '.join(sorted(unknown))}")

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    data = find_data(args.data)
    OUT.mkdir(parents=True, exist_ok=True)

    if args.retrain_tokenizer or not TOKENIZER.exists():
        print("training tokenizer ->", TOKENIZER.relative_to(ROOT))
        train_tokenizer(data)
    sp = spm.SentencePieceProcessor(model_file=str(TOKENIZER))

    listing = []
    for spec in SPECS:
        if not only or spec.name in only:
            make_tiny_fixture(spec, sp)
        diff = numpy_check(spec.name)
        print(f"  {spec.name}: independent numpy forward agrees (max logit diff {diff:.1e})")
        listing.append({"name": spec.name, "covers": spec.covers})
    (OUT / "fixtures.json").write_text(dump_json({"fixtures": listing}))
    if not only or "tokenizer_cases" in only:
        make_tokenizer_cases()
    if not only or "bundled" in only:
        make_bundled_reference(data)
    write_readme()
    print("done:", OUT.relative_to(ROOT))


if __name__ == "__main__":
    main()
