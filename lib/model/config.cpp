// config.json -> ModelConfig. Both transformers spellings are accepted:
//   4.x: rope_theta, torch_dtype, rope_scaling {type|rope_type, factor, ...}
//   5.x: rope_parameters {rope_theta, rope_type, factor, ...}, dtype
// Every error names the file and the key ("<path>: rope_scaling.factor must be ...").
#include "model/config.h"

#include <cmath>
#include <limits>

#include "model/json_util.h"

namespace pyr {
namespace {

using json = nlohmann::json;

// A short rendering of a JSON value for messages (long values are cut).
std::string show(const json& j) {
    std::string s = j.dump();
    return s.size() > 40 ? s.substr(0, 37) + "..." : s;
}

// Typed access to the keys of one JSON object; `prefix` ("rope_scaling.") makes nested
// keys read as their full path in messages. Absent and null keys are treated alike, as
// transformers writes null for unset optional values.
class Reader {
public:
    Reader(const json& obj, const std::string& source, std::string prefix = "")
        : obj_(obj), source_(source), prefix_(std::move(prefix)) {}

    const json* get(const char* key) const {
        auto it = obj_.find(key);
        return it == obj_.end() || it->is_null() ? nullptr : &*it;
    }
    bool has(const char* key) const { return get(key) != nullptr; }
    bool present(const char* key) const { return obj_.contains(key); }  // null included

    [[noreturn]] void bad(const char* key, const std::string& problem,
                          pyr_status status = PYR_ERR_FORMAT) const {
        fail(status, source_ + ": \"" + prefix_ + key + "\" " + problem);
    }

    const json& required(const char* key) const {
        const json* j = get(key);
        if (!j) fail(PYR_ERR_FORMAT, source_ + ": missing required key \"" + prefix_ + key + "\"");
        return *j;
    }

    int32_t int_value(const char* key, const json& j, int64_t min) const {
        int64_t v = 0;
        if (!json_util::get_int64(j, v) || v < min || v > std::numeric_limits<int32_t>::max())
            bad(key, "must be an integer in [" + std::to_string(min) + ", 2147483647], got " +
                         show(j));
        return int32_t(v);
    }
    int32_t int_required(const char* key, int64_t min) const {
        return int_value(key, required(key), min);
    }
    int32_t int_or(const char* key, int32_t fallback, int64_t min) const {
        const json* j = get(key);
        return j ? int_value(key, *j, min) : fallback;
    }

    // A finite float > 0 (every float hyper-parameter we read is a positive scale).
    float positive_float(const char* key, const json& j) const {
        double v = j.is_number() ? j.get<double>() : 0.0;
        if (!j.is_number() || !std::isfinite(v) || v <= 0.0 ||
            v > double(std::numeric_limits<float>::max()))
            bad(key, "must be a positive finite number, got " + show(j));
        return float(v);
    }
    float float_required(const char* key) const { return positive_float(key, required(key)); }
    float float_or(const char* key, float fallback) const {
        const json* j = get(key);
        return j ? positive_float(key, *j) : fallback;
    }

    bool bool_or(const char* key, bool fallback) const {
        const json* j = get(key);
        if (!j) return fallback;
        if (!j->is_boolean()) bad(key, "must be true or false, got " + show(*j));
        return j->get<bool>();
    }

    // nullptr when absent.
    const std::string* string_or_null(const char* key) const {
        const json* j = get(key);
        if (!j) return nullptr;
        if (!j->is_string()) bad(key, "must be a string, got " + show(*j));
        return j->get_ptr<const std::string*>();
    }

    const json* object_or_null(const char* key) const {
        const json* j = get(key);
        if (j && !j->is_object()) bad(key, "must be an object, got " + show(*j));
        return j;
    }

private:
    const json& obj_;
    const std::string& source_;
    std::string prefix_;
};

void read_sizes(const Reader& r, ModelConfig& c) {
    c.n_vocab = r.int_required("vocab_size", 1);
    c.n_embd = r.int_required("hidden_size", 1);
    c.n_ff = r.int_required("intermediate_size", 1);
    c.n_layer = r.int_required("num_hidden_layers", 1);
    c.n_head = r.int_required("num_attention_heads", 1);
    c.n_ctx_train = r.int_required("max_position_embeddings", 1);
    // HF's defaults: LlamaConfig's is num_attention_heads, MistralConfig's 8
    const std::string* type = r.string_or_null("model_type");
    const int32_t kv_default = type && *type == "mistral" ? 8 : c.n_head;
    c.n_head_kv = r.int_or("num_key_value_heads", kv_default, 1);
    if (c.n_head % c.n_head_kv != 0)
        r.bad("num_key_value_heads", "(" + std::to_string(c.n_head_kv) +
                                         ") must divide num_attention_heads (" +
                                         std::to_string(c.n_head) + ")");
    if (r.has("head_dim")) {
        c.head_dim = r.int_required("head_dim", 1);  // may differ from hidden/heads
    } else {
        if (c.n_embd % c.n_head != 0)
            r.bad("hidden_size", "(" + std::to_string(c.n_embd) +
                                     ") is not divisible by num_attention_heads (" +
                                     std::to_string(c.n_head) + ") and head_dim is absent");
        c.head_dim = c.n_embd / c.n_head;
    }
    // Rotate-half RoPE pairs element i with i + head_dim/2.
    if (c.head_dim % 2 != 0)
        r.bad(r.has("head_dim") ? "head_dim" : "hidden_size",
              "gives an odd head_dim (" + std::to_string(c.head_dim) + "); RoPE needs it even");
}

RopeScaling::Type rope_kind(const Reader& r, bool kind_optional) {
    const char* key = r.has("rope_type") ? "rope_type" : "type";
    const std::string* kind = r.string_or_null(key);
    if (!kind) {
        if (kind_optional) return RopeScaling::Type::Default;
        r.bad("rope_type", "is missing (neither rope_type nor type is given)");
    }
    if (*kind == "default") return RopeScaling::Type::Default;
    if (*kind == "linear") return RopeScaling::Type::Linear;
    if (*kind == "dynamic") return RopeScaling::Type::Dynamic;
    if (*kind == "llama3") return RopeScaling::Type::Llama3;
    r.bad(key, "value \"" + *kind + "\" is not supported (default, linear, dynamic, llama3)",
          PYR_ERR_UNSUPPORTED);
}

// `r` reads rope_scaling (4.x) or rope_parameters (5.x); in the latter the kind may be
// absent, meaning plain RoPE.
RopeScaling read_rope_scaling(const Reader& r, bool kind_optional) {
    RopeScaling s;
    s.type = rope_kind(r, kind_optional);
    if (s.type == RopeScaling::Type::Default) return s;
    s.factor = r.float_required("factor");
    if (s.type != RopeScaling::Type::Llama3) return s;
    s.low_freq_factor = r.float_required("low_freq_factor");
    s.high_freq_factor = r.float_required("high_freq_factor");
    s.original_max_position = r.int_required("original_max_position_embeddings", 1);
    // The llama3 blend divides by (high - low).
    if (!(s.high_freq_factor > s.low_freq_factor))
        r.bad("high_freq_factor", "(" + std::to_string(s.high_freq_factor) +
                                      ") must be greater than low_freq_factor (" +
                                      std::to_string(s.low_freq_factor) + ")");
    return s;
}

void read_rope(const json& root, const std::string& source, ModelConfig& c) {
    Reader top(root, source);
    const json* params = top.object_or_null("rope_parameters");
    const json* scaling = top.object_or_null("rope_scaling");
    c.rope_theta = top.float_or("rope_theta", 10000.0f);
    if (params) {
        Reader p(*params, source, "rope_parameters.");
        c.rope_theta = p.float_or("rope_theta", c.rope_theta);
    }
    // A 4.x rope_scaling wins over 5.x rope_parameters should a file carry both.
    if (scaling)
        c.rope_scaling = read_rope_scaling(Reader(*scaling, source, "rope_scaling."), false);
    else if (params)
        c.rope_scaling = read_rope_scaling(Reader(*params, source, "rope_parameters."), true);
}

void read_token_ids(const Reader& r, ModelConfig& c) {
    const int64_t max_id = int64_t(c.n_vocab) - 1;
    if (const json* bos = r.get("bos_token_id")) {
        c.bos_token_id = r.int_value("bos_token_id", *bos, 0);
        if (c.bos_token_id > max_id)
            r.bad("bos_token_id", std::to_string(c.bos_token_id) + " is not below vocab_size " +
                                      std::to_string(c.n_vocab));
    }
    // eos_token_id: an int or a non-empty list of ints; absent/null keeps the SentencePiece
    // LLaMA default {2}.
    const json* eos = r.get("eos_token_id");
    if (!eos) return;
    std::vector<int32_t> ids;
    if (eos->is_array()) {
        for (const json& e : *eos) ids.push_back(r.int_value("eos_token_id", e, 0));
        if (ids.empty()) r.bad("eos_token_id", "is an empty list");
    } else {
        ids.push_back(r.int_value("eos_token_id", *eos, 0));
    }
    for (int32_t id : ids)
        if (id > max_id)
            r.bad("eos_token_id", std::to_string(id) + " is not below vocab_size " +
                                      std::to_string(c.n_vocab));
    c.eos_token_ids = ids;
}

DType read_dtype(const Reader& r) {
    // 5.x writes "dtype", 4.x "torch_dtype".
    const char* key = r.has("dtype") ? "dtype" : "torch_dtype";
    const std::string* name = r.string_or_null(key);
    if (!name) return DType::F32;
    if (*name == "float32") return DType::F32;
    if (*name == "float16") return DType::F16;
    if (*name == "bfloat16") return DType::BF16;
    r.bad(key, "value \"" + *name + "\" is not supported (float32, float16, bfloat16)",
          PYR_ERR_UNSUPPORTED);
}

// Only the LLaMA architecture runs; Mistral is the same network unless it uses its
// sliding window, which this engine does not implement.
void check_architecture(const Reader& r) {
    if (const std::string* type = r.string_or_null("model_type")) {
        if (*type == "mistral") {
            if (const json* window = r.get("sliding_window"))
                r.bad("sliding_window", show(*window) +
                                            ": sliding-window attention (mistral) is not "
                                            "supported",
                      PYR_ERR_UNSUPPORTED);
            if (!r.present("sliding_window"))  // absent is MistralConfig's default window
                r.bad("sliding_window", "absent: HF's MistralConfig then takes a 4096-token "
                                        "sliding window, which is not supported (null: none)",
                      PYR_ERR_UNSUPPORTED);
        } else if (*type != "llama") {
            r.bad("model_type", "value \"" + *type + "\" is not supported (llama)",
                  PYR_ERR_UNSUPPORTED);
        }
    }
    if (const std::string* act = r.string_or_null("hidden_act"))
        if (*act != "silu")
            r.bad("hidden_act", "value \"" + *act + "\" is not supported (silu)", PYR_ERR_UNSUPPORTED);
}

}  // namespace

ModelConfig parse_model_config(const std::string& json_text, const std::string& source) {
    json root = json_util::parse(json_text.data(), json_text.size(), source);
    if (!root.is_object())
        fail(PYR_ERR_FORMAT, source + ": top level must be a JSON object, got " +
                                 json_util::type_name(root));
    Reader r(root, source);
    ModelConfig c;
    check_architecture(r);
    read_sizes(r, c);
    c.rms_norm_eps = r.float_or("rms_norm_eps", 1e-6f);
    read_rope(root, source, c);
    c.tie_word_embeddings = r.bool_or("tie_word_embeddings", false);
    c.attention_bias = r.bool_or("attention_bias", false);
    c.mlp_bias = r.bool_or("mlp_bias", false);
    read_token_ids(r, c);
    c.dtype = read_dtype(r);
    return c;
}

ModelConfig load_model_config(const std::string& path) {
    return parse_model_config(json_util::read_text_file(path, /*max_size=*/16u << 20), path);
}

}  // namespace pyr
