// Helpers for the KV policy tests: tiny random LLaMA checkpoints written into temp dirs (for
// layer counts the fixtures lack), engines and greedy pyramid sessions, random prompts.
#pragma once

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "../model/model_test_util.h"
#include "engine/engine.h"
#include "engine/session.h"
#include "support/engine_util.h"

namespace pyr_test {


// A random F32 LLaMA with default RoPE and the fixture tokenizer (vocab 396).
struct TinySpec {
    int n_layer = 6;
    int n_embd = 48;
    int n_head = 4;
    int n_head_kv = 2;
    int n_ff = 96;
    uint32_t seed = 1;
};

inline void write_random_llama(const std::string& dir, const TinySpec& s) {
    const int n_vocab = 396, hd = s.n_embd / s.n_head;
    json cfg = {{"architectures", {"LlamaForCausalLM"}}, {"model_type", "llama"},
                {"hidden_size", s.n_embd}, {"intermediate_size", s.n_ff},
                {"num_hidden_layers", s.n_layer}, {"num_attention_heads", s.n_head},
                {"num_key_value_heads", s.n_head_kv}, {"max_position_embeddings", 1024},
                {"rms_norm_eps", 1e-5}, {"rope_theta", 10000.0}, {"vocab_size", n_vocab},
                {"tie_word_embeddings", false}, {"bos_token_id", 1}, {"eos_token_id", 2},
                {"torch_dtype", "float32"}, {"hidden_act", "silu"}};
    write_file(dir + "/config.json", cfg.dump(2));
    copy_file(kFixtures + "/tokenizer.model", dir + "/tokenizer.model");

    std::mt19937 gen(s.seed);
    auto random = [&](std::vector<int64_t> shape, float scale, float center) {
        std::vector<float> v(size_t(numel(shape)));
        std::uniform_real_distribution<float> d(center - scale, center + scale);
        for (float& x : v) x = d(gen);
        return StTensor{"", "F32", shape, f32_bytes(v)};
    };
    auto mat = [&](int64_t rows, int64_t cols) {
        return random({rows, cols}, 1.7f / std::sqrt(float(cols)), 0.0f);
    };
    std::vector<StTensor> ts;
    auto add = [&](const std::string& name, StTensor t) {
        t.name = name;
        ts.push_back(std::move(t));
    };
    add("model.embed_tokens.weight", random({n_vocab, s.n_embd}, 1.0f, 0.0f));
    for (int il = 0; il < s.n_layer; ++il) {
        const std::string p = "model.layers." + std::to_string(il) + ".";
        add(p + "input_layernorm.weight", random({s.n_embd}, 0.2f, 1.0f));
        add(p + "post_attention_layernorm.weight", random({s.n_embd}, 0.2f, 1.0f));
        // Larger q/k weights make the attention peaked, so that scores spread out.
        add(p + "self_attn.q_proj.weight", random({s.n_head * hd, s.n_embd}, 3.0f / std::sqrt(float(s.n_embd)), 0.0f));
        add(p + "self_attn.k_proj.weight", random({s.n_head_kv * hd, s.n_embd}, 3.0f / std::sqrt(float(s.n_embd)), 0.0f));
        add(p + "self_attn.v_proj.weight", mat(s.n_head_kv * hd, s.n_embd));
        add(p + "self_attn.o_proj.weight", mat(s.n_embd, s.n_head * hd));
        add(p + "mlp.gate_proj.weight", mat(s.n_ff, s.n_embd));
        add(p + "mlp.up_proj.weight", mat(s.n_ff, s.n_embd));
        add(p + "mlp.down_proj.weight", mat(s.n_embd, s.n_ff));
    }
    add("model.norm.weight", random({s.n_embd}, 0.2f, 1.0f));
    // Rows 0..2 (unk, BOS, EOS) zero: logit 0 never wins against 393 random ones, so greedy
    // generation does not stop early at EOS.
    StTensor head = mat(n_vocab, s.n_embd);
    std::fill(head.bytes.begin(), head.bytes.begin() + 3 * s.n_embd * 4, '\0');
    add("lm_head.weight", std::move(head));
    write_file(dir + "/model.safetensors", safetensors_bytes(ts));
}

inline std::vector<int32_t> iota_positions(int32_t first, int32_t end) {
    std::vector<int32_t> v;
    for (int32_t p = first; p < end; ++p) v.push_back(p);
    return v;
}

// Python code for the bundled model (a trained model's attention has real sinks and heavy
// hitters, unlike random weights); about 330 tokens with its tokenizer.
const char* const kCodeText = R"(import os
import sys
from collections import defaultdict


class Inventory:
    """Counts items per shelf and reports the fullest shelves."""

    def __init__(self, shelves):
        self.shelves = list(shelves)
        self.counts = defaultdict(int)

    def add(self, shelf, item, count=1):
        if shelf not in self.shelves:
            raise KeyError("unknown shelf: %s" % shelf)
        self.counts[(shelf, item)] += count
        return self.counts[(shelf, item)]

    def remove(self, shelf, item, count=1):
        key = (shelf, item)
        if self.counts[key] < count:
            raise ValueError("not enough %s on %s" % (item, shelf))
        self.counts[key] -= count
        if self.counts[key] == 0:
            del self.counts[key]

    def total(self, shelf):
        return sum(n for (s, _), n in self.counts.items() if s == shelf)

    def fullest(self, k=3):
        totals = [(self.total(s), s) for s in self.shelves]
        totals.sort(reverse=True)
        return [s for _, s in totals[:k]]


def main(argv):
    inv = Inventory(["a", "b", "c"])
    for line in open(argv[1]):
        shelf, item, count = line.split()
        inv.add(shelf, item, int(count))
    for shelf in inv.fullest():
        print(shelf, inv.total(shelf))
    return 0
)";

}  // namespace pyr_test
