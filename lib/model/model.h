// A loaded model: config, tokenizer and the weight views (read-only, shared by sessions).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "model/config.h"
#include "model/safetensors.h"
#include "tokenizer/tokenizer.h"

namespace pyr {

// A weight matrix or vector as stored in the checkpoint: row-major, [rows, cols] for
// matrices (HF layout [out, in]), [n] for vectors. data == nullptr means absent
// (an optional bias).
struct Tensor {
    DType dtype = DType::F32;
    int64_t rows = 0;
    int64_t cols = 0;  // 1 for vectors
    const void* data = nullptr;
    explicit operator bool() const { return data != nullptr; }
};

struct LayerWeights {
    Tensor attn_norm;            // [n_embd]
    Tensor wq, wk, wv, wo;       // [n_head*hd, n_embd], [n_kv*hd, n_embd] x2, [n_embd, n_head*hd]
    Tensor bq, bk, bv, bo;       // optional (attention_bias)
    Tensor ffn_norm;             // [n_embd]
    Tensor w_gate, w_up, w_down; // [n_ff, n_embd] x2, [n_embd, n_ff]
    Tensor b_gate, b_up, b_down; // optional (mlp_bias)
};

struct ModelWeights {
    Tensor tok_embd;     // [n_vocab, n_embd]
    Tensor output_norm;  // [n_embd]
    Tensor output;       // [n_vocab, n_embd]; the embedding when tie_word_embeddings
    std::vector<LayerWeights> layers;
};

class Model {
public:
    // Loads config.json, the safetensors weights and tokenizer.model from `dir`, validating
    // every tensor the config needs (name, shape, dtype). Throws pyr::Error naming the file.
    static std::shared_ptr<const Model> load(const std::string& dir);

    const std::string& dir() const { return dir_; }
    const ModelConfig& config() const { return config_; }
    const ModelWeights& weights() const { return weights_; }
    const Tokenizer& tokenizer() const { return *tokenizer_; }
    uint64_t weights_bytes() const { return store_->total_bytes(); }

private:
    std::string dir_;
    ModelConfig config_;
    std::unique_ptr<TensorStore> store_;
    ModelWeights weights_;
    std::unique_ptr<Tokenizer> tokenizer_;
};

}  // namespace pyr
