// The model hyper-parameters read from an HF config.json (transformers 4.x and 5.x spellings).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/dtype.h"

namespace pyr {

struct RopeScaling {
    enum class Type { Default, Linear, Dynamic, Llama3 };
    Type type = Type::Default;
    float factor = 1.0f;
    float low_freq_factor = 1.0f;        // llama3
    float high_freq_factor = 4.0f;       // llama3
    int32_t original_max_position = 0;   // llama3: original_max_position_embeddings
};

struct ModelConfig {
    int32_t n_vocab = 0;        // vocab_size
    int32_t n_embd = 0;         // hidden_size
    int32_t n_ff = 0;           // intermediate_size
    int32_t n_layer = 0;        // num_hidden_layers
    int32_t n_head = 0;         // num_attention_heads
    int32_t n_head_kv = 0;      // num_key_value_heads (default n_head)
    int32_t head_dim = 0;       // head_dim (default n_embd / n_head)
    int32_t n_ctx_train = 0;    // max_position_embeddings
    float rms_norm_eps = 1e-6f;
    float rope_theta = 10000.0f;
    RopeScaling rope_scaling;
    bool tie_word_embeddings = false;
    bool attention_bias = false;  // q, k, v, o biases
    bool mlp_bias = false;        // gate, up, down biases
    int32_t bos_token_id = 1;
    std::vector<int32_t> eos_token_ids{2};
    DType dtype = DType::F32;     // torch_dtype / dtype, informational
};

// Parses the text of a config.json; `source` names the file in error messages.
// Throws pyr::Error(PYR_ERR_FORMAT) naming the key and the problem.
ModelConfig parse_model_config(const std::string& json_text, const std::string& source);

// Reads and parses `path`; a missing or unreadable file is PYR_ERR_IO.
ModelConfig load_model_config(const std::string& path);

}  // namespace pyr
