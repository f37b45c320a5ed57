// config.json parsing: both transformers spellings, RoPE scaling kinds, defaults, and the
// errors for malformed files (each must name the key). To add a case: start from
// base_config(), change the keys under test, parse with parse().
#include "model/config.h"

#include "model_test_util.h"

using pyr_test::json;

namespace {

// A minimal valid 5.x-style LLaMA config.
json base_config() {
    return json{{"model_type", "llama"},        {"vocab_size", 4096},
                {"hidden_size", 64},            {"intermediate_size", 128},
                {"num_hidden_layers", 2},       {"num_attention_heads", 4},
                {"num_key_value_heads", 2},     {"max_position_embeddings", 2048},
                {"rms_norm_eps", 1e-5},         {"bos_token_id", 1},
                {"eos_token_id", 2},            {"tie_word_embeddings", false}};
}

pyr::ModelConfig parse(const json& j) { return pyr::parse_model_config(j.dump(), "config.json"); }

}  // namespace

TEST_CASE("config: the bundled model's config.json (5.x spelling)") {
    pyr::ModelConfig c = pyr::load_model_config(PYR_TEST_MODEL_DIR "/config.json");
    CHECK(c.n_vocab == 4096);
    CHECK(c.n_embd == 384);
    CHECK(c.n_ff == 1024);
    CHECK(c.n_layer == 10);
    CHECK(c.n_head == 6);
    CHECK(c.n_head_kv == 2);
    CHECK(c.head_dim == 64);
    CHECK(c.n_ctx_train == 4096);
    CHECK(c.rms_norm_eps == doctest::Approx(1e-5f).epsilon(1e-6));
    CHECK(c.rope_theta == 10000.0f);
    CHECK(c.rope_scaling.type == pyr::RopeScaling::Type::Default);
    CHECK_FALSE(c.tie_word_embeddings);
    CHECK_FALSE(c.attention_bias);
    CHECK_FALSE(c.mlp_bias);
    CHECK(c.bos_token_id == 1);
    CHECK(c.eos_token_ids == std::vector<int32_t>{2});
    CHECK(c.dtype == pyr::DType::F16);
}

TEST_CASE("config: defaults when optional keys are absent") {
    json j = base_config();
    j.erase("num_key_value_heads");
    j.erase("rms_norm_eps");
    j.erase("bos_token_id");
    j.erase("eos_token_id");
    j.erase("tie_word_embeddings");
    pyr::ModelConfig c = parse(j);
    CHECK(c.n_head_kv == 4);
    CHECK(c.head_dim == 16);
    CHECK(c.rms_norm_eps == 1e-6f);
    CHECK(c.rope_theta == 10000.0f);
    CHECK(c.rope_scaling.type == pyr::RopeScaling::Type::Default);
    CHECK(c.bos_token_id == 1);
    CHECK(c.eos_token_ids == std::vector<int32_t>{2});
    CHECK_FALSE(c.tie_word_embeddings);
    CHECK(c.dtype == pyr::DType::F32);

    j["pad_token_id"] = nullptr;  // nulls are ignored like absent keys
    j["num_key_value_heads"] = nullptr;
    CHECK(parse(j).n_head_kv == 4);
}

TEST_CASE("config: 4.x spelling (rope_theta, torch_dtype, rope_scaling.type linear)") {
    json j = base_config();
    j["rope_theta"] = 500000.0;
    j["torch_dtype"] = "bfloat16";
    j["rope_scaling"] = {{"type", "linear"}, {"factor", 2.0}};
    pyr::ModelConfig c = parse(j);
    CHECK(c.rope_theta == 500000.0f);
    CHECK(c.dtype == pyr::DType::BF16);
    CHECK(c.rope_scaling.type == pyr::RopeScaling::Type::Linear);
    CHECK(c.rope_scaling.factor == 2.0f);
}

TEST_CASE("config: 5.x spelling (rope_parameters, dtype)") {
    json j = base_config();
    j["dtype"] = "float16";
    j["rope_parameters"] = {{"rope_theta", 1000000.0}, {"rope_type", "linear"}, {"factor", 4.0}};
    pyr::ModelConfig c = parse(j);
    CHECK(c.rope_theta == 1000000.0f);
    CHECK(c.dtype == pyr::DType::F16);
    CHECK(c.rope_scaling.type == pyr::RopeScaling::Type::Linear);
    CHECK(c.rope_scaling.factor == 4.0f);

    j["rope_parameters"] = {{"rope_theta", 250000}};  // integer theta, no kind: plain RoPE
    c = parse(j);
    CHECK(c.rope_theta == 250000.0f);
    CHECK(c.rope_scaling.type == pyr::RopeScaling::Type::Default);
}

TEST_CASE("config: llama3 and dynamic scaling") {
    json llama3 = {{"rope_type", "llama3"},
                   {"factor", 8.0},
                   {"low_freq_factor", 1.0},
                   {"high_freq_factor", 4.0},
                   {"original_max_position_embeddings", 8192}};
    SUBCASE("llama3 in 4.x rope_scaling") {
        json j = base_config();
        j["rope_theta"] = 500000.0;
        j["rope_scaling"] = llama3;
        pyr::ModelConfig c = parse(j);
        CHECK(c.rope_scaling.type == pyr::RopeScaling::Type::Llama3);
        CHECK(c.rope_scaling.factor == 8.0f);
        CHECK(c.rope_scaling.low_freq_factor == 1.0f);
        CHECK(c.rope_scaling.high_freq_factor == 4.0f);
        CHECK(c.rope_scaling.original_max_position == 8192);
        CHECK(c.rope_theta == 500000.0f);
    }
    SUBCASE("llama3 in 5.x rope_parameters") {
        json j = base_config();
        json p = llama3;
        p["rope_theta"] = 500000.0;
        j["rope_parameters"] = p;
        pyr::ModelConfig c = parse(j);
        CHECK(c.rope_scaling.type == pyr::RopeScaling::Type::Llama3);
        CHECK(c.rope_scaling.original_max_position == 8192);
        CHECK(c.rope_theta == 500000.0f);
    }
    SUBCASE("llama3 without low_freq_factor") {
        json j = base_config();
        json s = llama3;
        s.erase("low_freq_factor");
        j["rope_scaling"] = s;
        CHECK_PYR_ERROR(parse(j), PYR_ERR_FORMAT, "config.json", "rope_scaling.low_freq_factor");
    }
    SUBCASE("dynamic") {
        json j = base_config();
        j["rope_scaling"] = {{"rope_type", "dynamic"}, {"factor", 2.5}};
        pyr::ModelConfig c = parse(j);
        CHECK(c.rope_scaling.type == pyr::RopeScaling::Type::Dynamic);
        CHECK(c.rope_scaling.factor == 2.5f);
    }
    SUBCASE("linear without factor") {
        json j = base_config();
        j["rope_scaling"] = {{"type", "linear"}};
        CHECK_PYR_ERROR(parse(j), PYR_ERR_FORMAT, "rope_scaling.factor");
    }
    SUBCASE("yarn is unsupported") {
        json j = base_config();
        j["rope_scaling"] = {{"rope_type", "yarn"}, {"factor", 4.0}};
        CHECK_PYR_ERROR(parse(j), PYR_ERR_UNSUPPORTED, "config.json", "yarn",
                        "rope_scaling.rope_type");
    }
}

TEST_CASE("config: eos_token_id as int, list or null") {
    json j = base_config();
    j["eos_token_id"] = 7;
    CHECK(parse(j).eos_token_ids == std::vector<int32_t>{7});
    j["eos_token_id"] = {128001, 128008, 128009};
    j["vocab_size"] = 128256;
    CHECK(parse(j).eos_token_ids == std::vector<int32_t>{128001, 128008, 128009});
    j["eos_token_id"] = nullptr;
    CHECK(parse(j).eos_token_ids == std::vector<int32_t>{2});
    j["eos_token_id"] = json::array();
    CHECK_PYR_ERROR(parse(j), PYR_ERR_FORMAT, "eos_token_id", "empty");
    j["eos_token_id"] = {2, "x"};
    CHECK_PYR_ERROR(parse(j), PYR_ERR_FORMAT, "eos_token_id", "integer");
    j["eos_token_id"] = 200000;
    CHECK_PYR_ERROR(parse(j), PYR_ERR_FORMAT, "eos_token_id", "vocab_size");
}

TEST_CASE("config: head_dim override") {
    json j = base_config();
    j["head_dim"] = 32;  // 4 heads x 32 = 128 != hidden_size 64
    pyr::ModelConfig c = parse(j);
    CHECK(c.head_dim == 32);
    CHECK(c.n_embd == 64);
    j["head_dim"] = 15;
    CHECK_PYR_ERROR(parse(j), PYR_ERR_FORMAT, "head_dim", "even");
    j.erase("head_dim");
    j["hidden_size"] = 66;  // 66 / 4 heads is not whole and no head_dim is given
    CHECK_PYR_ERROR(parse(j), PYR_ERR_FORMAT, "hidden_size", "num_attention_heads");
}

TEST_CASE("config: biases and tied embeddings flags") {
    json j = base_config();
    j["attention_bias"] = true;
    j["mlp_bias"] = true;
    j["tie_word_embeddings"] = true;
    pyr::ModelConfig c = parse(j);
    CHECK(c.attention_bias);
    CHECK(c.mlp_bias);
    CHECK(c.tie_word_embeddings);
    j["mlp_bias"] = "yes";
    CHECK_PYR_ERROR(parse(j), PYR_ERR_FORMAT, "mlp_bias", "true or false");
}

TEST_CASE("config: malformed files") {
    SUBCASE("syntax error names the file and the line") {
        std::string text = "{\n  \"vocab_size\": 4096,\n  \"hidden_size\" 64\n}";
        CHECK_PYR_ERROR(pyr::parse_model_config(text, "/m/config.json"), PYR_ERR_FORMAT,
                        "/m/config.json", "invalid JSON", "line 3");
    }
    SUBCASE("empty text") {
        CHECK_PYR_ERROR(pyr::parse_model_config("", "config.json"), PYR_ERR_FORMAT,
                        "config.json", "invalid JSON");
    }
    SUBCASE("number too large for a double") {
        std::string text = base_config().dump();
        text.insert(1, "\"rms_norm_eps\": 1e999, ");
        CHECK_PYR_ERROR(pyr::parse_model_config(text, "config.json"), PYR_ERR_FORMAT,
                        "config.json", "invalid JSON", "1e999");
    }
    SUBCASE("not UTF-8") {
        CHECK_PYR_ERROR(pyr::parse_model_config("{\"model_type\": \"ll\xff\"}", "config.json"),
                        PYR_ERR_FORMAT, "config.json", "UTF-8");
    }
    SUBCASE("top level is not an object") {
        CHECK_PYR_ERROR(pyr::parse_model_config("[1, 2]", "config.json"), PYR_ERR_FORMAT,
                        "config.json", "object");
    }
    SUBCASE("wrong type") {
        json j = base_config();
        j["hidden_size"] = "64";
        CHECK_PYR_ERROR(parse(j), PYR_ERR_FORMAT, "config.json", "\"hidden_size\"", "integer");
        j["hidden_size"] = 64.5;
        CHECK_PYR_ERROR(parse(j), PYR_ERR_FORMAT, "\"hidden_size\"", "64.5");
        j["hidden_size"] = 64;
        j["rms_norm_eps"] = "1e-5";
        CHECK_PYR_ERROR(parse(j), PYR_ERR_FORMAT, "\"rms_norm_eps\"", "number");
        j["rms_norm_eps"] = 1e-5;
        j["rope_scaling"] = "linear";
        CHECK_PYR_ERROR(parse(j), PYR_ERR_FORMAT, "\"rope_scaling\"", "object");
    }
    SUBCASE("missing required key") {
        for (const char* key : {"vocab_size", "hidden_size", "intermediate_size",
                                "num_hidden_layers", "num_attention_heads",
                                "max_position_embeddings"}) {
            CAPTURE(key);
            json j = base_config();
            j.erase(key);
            CHECK_PYR_ERROR(parse(j), PYR_ERR_FORMAT, "config.json", "missing required key",
                            key);
        }
    }
    SUBCASE("sizes out of range") {
        json j = base_config();
        j["num_hidden_layers"] = 0;
        CHECK_PYR_ERROR(parse(j), PYR_ERR_FORMAT, "num_hidden_layers");
        j["num_hidden_layers"] = -3;
        CHECK_PYR_ERROR(parse(j), PYR_ERR_FORMAT, "num_hidden_layers", "-3");
        j["num_hidden_layers"] = 5000000000LL;
        CHECK_PYR_ERROR(parse(j), PYR_ERR_FORMAT, "num_hidden_layers", "5000000000");
        j["num_hidden_layers"] = 2;
        j["rms_norm_eps"] = -1.0;
        CHECK_PYR_ERROR(parse(j), PYR_ERR_FORMAT, "rms_norm_eps", "positive");
    }
    SUBCASE("heads not divisible by kv heads") {
        json j = base_config();
        j["num_key_value_heads"] = 3;
        CHECK_PYR_ERROR(parse(j), PYR_ERR_FORMAT, "num_key_value_heads", "(3)", "(4)");
    }
    SUBCASE("unsupported architecture or dtype") {
        json j = base_config();
        j["model_type"] = "qwen2";
        CHECK_PYR_ERROR(parse(j), PYR_ERR_UNSUPPORTED, "model_type", "qwen2");
        j["model_type"] = "mistral";
        j["sliding_window"] = nullptr;
        CHECK(parse(j).n_layer == 2);  // mistral without a sliding window is LLaMA
        j["sliding_window"] = 4096;
        CHECK_PYR_ERROR(parse(j), PYR_ERR_UNSUPPORTED, "sliding_window", "4096");
        j.erase("sliding_window");  // HF's MistralConfig default: a 4096-token window
        CHECK_PYR_ERROR(parse(j), PYR_ERR_UNSUPPORTED, "sliding_window", "absent", "4096");
        // num_key_value_heads absent: MistralConfig's default is 8, LlamaConfig's the heads
        j["sliding_window"] = nullptr;
        j["num_attention_heads"] = 16;
        j.erase("num_key_value_heads");
        CHECK(parse(j).n_head_kv == 8);
        j["model_type"] = "llama";
        CHECK(parse(j).n_head_kv == 16);
        j = base_config();
        j["torch_dtype"] = "float8_e4m3fn";
        CHECK_PYR_ERROR(parse(j), PYR_ERR_UNSUPPORTED, "torch_dtype", "float8_e4m3fn");
        j = base_config();
        j["hidden_act"] = "gelu";
        CHECK_PYR_ERROR(parse(j), PYR_ERR_UNSUPPORTED, "hidden_act", "gelu");
    }
}

TEST_CASE("config: load_model_config file errors") {
    pyr_test::TempDir dir;
    const std::string path = dir / "config.json";
    CHECK_PYR_ERROR(pyr::load_model_config(path), PYR_ERR_IO, path.c_str(), "cannot open");
    CHECK_PYR_ERROR(pyr::load_model_config(dir.path()), PYR_ERR_IO, "not a regular file");
    pyr_test::write_file(path, "{\"vocab_size\": 10,");
    CHECK_PYR_ERROR(pyr::load_model_config(path), PYR_ERR_FORMAT, path.c_str(), "invalid JSON");
    pyr_test::write_file(path, base_config().dump(2));
    CHECK(pyr::load_model_config(path).n_embd == 64);
}
