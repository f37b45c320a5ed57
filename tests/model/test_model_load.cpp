// Model::load: the bundled model, and tiny generated checkpoints (config.json + safetensors
// + the bundled tokenizer.model) exercising tied embeddings, biases, head_dim override,
// mixed dtypes and every kind of missing or malformed part. To add a case: change a
// TinySpec, write_tiny_model(), then load or CHECK_PYR_ERROR.
#include "model/model.h"

#include <cmath>
#include <cstdio>
#include <map>
#include <set>

#include "common/log.h"
#include "model_test_util.h"

using pyr_test::json;
using pyr_test::StTensor;
using pyr_test::TempDir;

namespace {

const std::string kBundledTokenizer = PYR_TEST_MODEL_DIR "/tokenizer.model";

// A tiny LLaMA: vocab 4096 (the bundled tokenizer's size), n_embd 8, 2 heads, 1 kv head.
struct TinySpec {
    int64_t vocab = 4096, embd = 8, ff = 16, layers = 2, heads = 2, kv = 1, head_dim = 4;
    bool explicit_head_dim = false;
    bool tie = false, attention_bias = false, mlp_bias = false;
    bool write_lm_head = true;  // written unless tie; with tie only when forced (stray)
    std::string dtype = "F32";
    std::map<std::string, std::string> dtype_of;               // per-tensor dtype
    std::set<std::string> drop;                                 // tensors left out
    std::map<std::string, std::vector<int64_t>> shape_of;       // per-tensor wrong shape
};

json tiny_config(const TinySpec& s) {
    json c = {{"architectures", {"LlamaForCausalLM"}},
              {"model_type", "llama"},
              {"vocab_size", s.vocab},
              {"hidden_size", s.embd},
              {"intermediate_size", s.ff},
              {"num_hidden_layers", s.layers},
              {"num_attention_heads", s.heads},
              {"num_key_value_heads", s.kv},
              {"max_position_embeddings", 256},
              {"rms_norm_eps", 1e-5},
              {"rope_theta", 10000.0},
              {"torch_dtype", "float32"},
              {"tie_word_embeddings", s.tie},
              {"attention_bias", s.attention_bias},
              {"mlp_bias", s.mlp_bias},
              {"bos_token_id", 1},
              {"eos_token_id", 2}};
    if (s.explicit_head_dim) c["head_dim"] = s.head_dim;
    return c;
}

// Every tensor the spec implies, in HF names and [out, in] shapes.
std::vector<StTensor> tiny_tensors(const TinySpec& s) {
    std::vector<std::pair<std::string, std::vector<int64_t>>> t;
    const int64_t q = s.heads * s.head_dim, kvd = s.kv * s.head_dim;
    t.push_back({"model.embed_tokens.weight", {s.vocab, s.embd}});
    t.push_back({"model.norm.weight", {s.embd}});
    if (s.write_lm_head) t.push_back({"lm_head.weight", {s.vocab, s.embd}});
    for (int64_t il = 0; il < s.layers; ++il) {
        const std::string p = "model.layers." + std::to_string(il) + ".";
        t.push_back({p + "input_layernorm.weight", {s.embd}});
        t.push_back({p + "post_attention_layernorm.weight", {s.embd}});
        t.push_back({p + "self_attn.q_proj.weight", {q, s.embd}});
        t.push_back({p + "self_attn.k_proj.weight", {kvd, s.embd}});
        t.push_back({p + "self_attn.v_proj.weight", {kvd, s.embd}});
        t.push_back({p + "self_attn.o_proj.weight", {s.embd, q}});
        t.push_back({p + "mlp.gate_proj.weight", {s.ff, s.embd}});
        t.push_back({p + "mlp.up_proj.weight", {s.ff, s.embd}});
        t.push_back({p + "mlp.down_proj.weight", {s.embd, s.ff}});
        if (s.attention_bias) {
            t.push_back({p + "self_attn.q_proj.bias", {q}});
            t.push_back({p + "self_attn.k_proj.bias", {kvd}});
            t.push_back({p + "self_attn.v_proj.bias", {kvd}});
            t.push_back({p + "self_attn.o_proj.bias", {s.embd}});
        }
        if (s.mlp_bias) {
            t.push_back({p + "mlp.gate_proj.bias", {s.ff}});
            t.push_back({p + "mlp.up_proj.bias", {s.ff}});
            t.push_back({p + "mlp.down_proj.bias", {s.embd}});
        }
    }
    t.push_back({"model.layers.0.self_attn.rotary_emb.inv_freq", {s.head_dim / 2}});  // ignored
    std::vector<StTensor> out;
    for (auto& [name, shape] : t) {
        if (s.drop.count(name)) continue;
        auto d = s.dtype_of.find(name);
        auto sh = s.shape_of.find(name);
        out.push_back({name, d != s.dtype_of.end() ? d->second : s.dtype,
                       sh != s.shape_of.end() ? sh->second : shape, ""});
    }
    return out;
}

void write_tiny_model(const TempDir& dir, const TinySpec& s) {
    pyr_test::write_file(dir / "config.json", tiny_config(s).dump(2));
    pyr_test::write_file(dir / "model.safetensors", pyr_test::safetensors_bytes(tiny_tensors(s)));
    pyr_test::copy_file(kBundledTokenizer, dir / "tokenizer.model");
}

TinySpec tied_spec() {
    TinySpec s;
    s.tie = true;
    s.write_lm_head = false;
    return s;
}

void check_shape(const pyr::Tensor& t, int64_t rows, int64_t cols) {
    CHECK(t.data != nullptr);
    CHECK(t.rows == rows);
    CHECK(t.cols == cols);
}

}  // namespace

TEST_CASE("Model::load: the bundled tiny-code-llama") {
    std::vector<std::string> logged;
    pyr::log_set_level(PYR_LOG_INFO);
    pyr::log_set_callback(
        [](pyr_log_level, const char* msg, void* user) {
            static_cast<std::vector<std::string>*>(user)->push_back(msg);
        },
        &logged);
    auto model = pyr::Model::load(PYR_TEST_MODEL_DIR);
    pyr::log_set_callback(nullptr, nullptr);
    pyr::log_set_level(PYR_LOG_WARN);

    const pyr::ModelConfig& c = model->config();
    CHECK(c.n_layer == 10);
    CHECK(c.n_embd == 384);
    CHECK(c.n_head == 6);
    CHECK(c.n_head_kv == 2);
    CHECK(c.head_dim == 64);
    CHECK(c.n_vocab == 4096);
    const pyr::ModelWeights& w = model->weights();
    check_shape(w.tok_embd, 4096, 384);
    check_shape(w.output, 4096, 384);
    check_shape(w.output_norm, 384, 1);
    CHECK(w.output.data != w.tok_embd.data);  // untied
    REQUIRE(w.layers.size() == 10);
    for (const pyr::LayerWeights& l : w.layers) {
        check_shape(l.attn_norm, 384, 1);
        check_shape(l.wq, 384, 384);
        check_shape(l.wk, 128, 384);
        check_shape(l.wv, 128, 384);
        check_shape(l.wo, 384, 384);
        check_shape(l.ffn_norm, 384, 1);
        check_shape(l.w_gate, 1024, 384);
        check_shape(l.w_up, 1024, 384);
        check_shape(l.w_down, 384, 1024);
        CHECK(l.wq.dtype == pyr::DType::F16);
        CHECK_FALSE(l.bq);
        CHECK_FALSE(l.b_gate);
    }
    CHECK(w.tok_embd.dtype == pyr::DType::F16);
    float norm0 = pyr::f16_to_f32(*static_cast<const uint16_t*>(w.output_norm.data));
    CHECK(std::isfinite(norm0));
    CHECK(norm0 != 0.0f);
    CHECK(model->weights_bytes() == 37764864);
    CHECK(model->tokenizer().n_vocab() <= 4096);
    CHECK(model->dir() == PYR_TEST_MODEL_DIR);
    REQUIRE(logged.size() == 1);
    CHECK(logged[0].find("10 layers") != std::string::npos);
}

TEST_CASE("Model::load: tiny generated checkpoints that load") {
    TempDir dir;
    SUBCASE("plain F32") {
        write_tiny_model(dir, TinySpec{});
        auto m = pyr::Model::load(dir.path());
        const pyr::ModelWeights& w = m->weights();
        check_shape(w.tok_embd, 4096, 8);
        check_shape(w.output, 4096, 8);
        CHECK(w.output.data != w.tok_embd.data);
        REQUIRE(w.layers.size() == 2);
        check_shape(w.layers[1].wq, 8, 8);
        check_shape(w.layers[1].wk, 4, 8);
        check_shape(w.layers[1].w_down, 8, 16);
        CHECK(w.layers[0].wq.data != w.layers[1].wq.data);
        CHECK(w.layers[1].wq.dtype == pyr::DType::F32);
    }
    SUBCASE("tied embeddings without lm_head") {
        write_tiny_model(dir, tied_spec());
        auto m = pyr::Model::load(dir.path());
        CHECK(m->weights().output.data == m->weights().tok_embd.data);
        check_shape(m->weights().output, 4096, 8);
    }
    SUBCASE("tied embeddings with a stray lm_head: ignored") {
        TinySpec s = tied_spec();
        s.write_lm_head = true;
        write_tiny_model(dir, s);
        auto m = pyr::Model::load(dir.path());
        CHECK(m->weights().output.data == m->weights().tok_embd.data);
    }
    SUBCASE("attention and MLP biases") {
        TinySpec s;
        s.attention_bias = true;
        s.mlp_bias = true;
        write_tiny_model(dir, s);
        auto m = pyr::Model::load(dir.path());
        const pyr::LayerWeights& l = m->weights().layers[1];
        check_shape(l.bq, 8, 1);
        check_shape(l.bk, 4, 1);
        check_shape(l.bv, 4, 1);
        check_shape(l.bo, 8, 1);
        check_shape(l.b_gate, 16, 1);
        check_shape(l.b_up, 16, 1);
        check_shape(l.b_down, 8, 1);
    }
    SUBCASE("head_dim override") {
        TinySpec s;
        s.head_dim = 8;  // 2 heads x 8 = 16 != n_embd 8
        s.explicit_head_dim = true;
        write_tiny_model(dir, s);
        auto m = pyr::Model::load(dir.path());
        CHECK(m->config().head_dim == 8);
        check_shape(m->weights().layers[0].wq, 16, 8);
        check_shape(m->weights().layers[0].wk, 8, 8);
        check_shape(m->weights().layers[0].wo, 8, 16);
    }
    SUBCASE("mixed dtypes") {
        TinySpec s;
        s.dtype = "F16";
        s.dtype_of["model.norm.weight"] = "BF16";
        s.dtype_of["model.layers.1.mlp.up_proj.weight"] = "F32";
        write_tiny_model(dir, s);
        auto m = pyr::Model::load(dir.path());
        CHECK(m->weights().output_norm.dtype == pyr::DType::BF16);
        CHECK(m->weights().layers[1].w_up.dtype == pyr::DType::F32);
        CHECK(m->weights().layers[1].w_gate.dtype == pyr::DType::F16);
    }
    SUBCASE("sharded with an index") {
        TinySpec s;
        std::vector<StTensor> all = tiny_tensors(s);
        std::vector<StTensor> a(all.begin(), all.begin() + 5), b(all.begin() + 5, all.end());
        json map = json::object();
        for (const StTensor& t : a) map[t.name] = "model-00001-of-00002.safetensors";
        for (const StTensor& t : b) map[t.name] = "model-00002-of-00002.safetensors";
        pyr_test::write_file(dir / "model-00001-of-00002.safetensors", pyr_test::safetensors_bytes(a));
        pyr_test::write_file(dir / "model-00002-of-00002.safetensors", pyr_test::safetensors_bytes(b));
        pyr_test::write_file(dir / "model.safetensors.index.json",
                             json{{"metadata", {{"total_size", 0}}}, {"weight_map", map}}.dump());
        pyr_test::write_file(dir / "config.json", tiny_config(s).dump());
        pyr_test::copy_file(kBundledTokenizer, dir / "tokenizer.model");
        CHECK(pyr::Model::load(dir.path())->weights().layers.size() == 2);
    }
}

TEST_CASE("Model::load: missing or malformed parts") {
    TempDir dir;
    const std::string d = dir.path();
    const std::string config_path = dir / "config.json";
    const std::string tokenizer_path = dir / "tokenizer.model";
    SUBCASE("missing directory") {
        const std::string missing = d + "/no-such-model";
        CHECK_PYR_ERROR(pyr::Model::load(missing), PYR_ERR_IO, missing.c_str(), "No such file");
    }
    SUBCASE("missing config.json") {
        write_tiny_model(dir, TinySpec{});
        std::remove((dir / "config.json").c_str());
        CHECK_PYR_ERROR(pyr::Model::load(d), PYR_ERR_IO, config_path.c_str(), "cannot open");
    }
    SUBCASE("malformed config.json") {
        write_tiny_model(dir, TinySpec{});
        pyr_test::write_file(dir / "config.json", "{\"vocab_size\": 4096 \"hidden_size\": 8}");
        CHECK_PYR_ERROR(pyr::Model::load(d), PYR_ERR_FORMAT, "config.json", "invalid JSON");
        json c = tiny_config(TinySpec{});
        c.erase("num_hidden_layers");
        pyr_test::write_file(dir / "config.json", c.dump());
        CHECK_PYR_ERROR(pyr::Model::load(d), PYR_ERR_FORMAT, "config.json", "num_hidden_layers");
    }
    SUBCASE("missing tokenizer.model") {
        write_tiny_model(dir, TinySpec{});
        std::remove((dir / "tokenizer.model").c_str());
        CHECK_PYR_ERROR(pyr::Model::load(d), PYR_ERR_IO, tokenizer_path.c_str(),
                        "not found");
    }
    SUBCASE("no weights") {
        write_tiny_model(dir, TinySpec{});
        std::remove((dir / "model.safetensors").c_str());
        CHECK_PYR_ERROR(pyr::Model::load(d), PYR_ERR_IO, "no model.safetensors");
    }
    SUBCASE("missing tensor") {
        TinySpec s;
        s.drop.insert("model.layers.1.mlp.down_proj.weight");
        write_tiny_model(dir, s);
        CHECK_PYR_ERROR(pyr::Model::load(d), PYR_ERR_FORMAT, "missing tensor",
                        "model.layers.1.mlp.down_proj.weight");
    }
    SUBCASE("untied without lm_head") {
        TinySpec s;
        s.write_lm_head = false;
        write_tiny_model(dir, s);
        CHECK_PYR_ERROR(pyr::Model::load(d), PYR_ERR_FORMAT, "missing tensor", "lm_head.weight");
    }
    SUBCASE("wrong tensor shape") {
        TinySpec s;
        s.shape_of["model.layers.1.self_attn.k_proj.weight"] = {8, 8};
        write_tiny_model(dir, s);
        CHECK_PYR_ERROR(pyr::Model::load(d), PYR_ERR_FORMAT, "model.safetensors",
                        "model.layers.1.self_attn.k_proj.weight", "[8, 8]", "expected [4, 8]");
    }
    SUBCASE("biases required when attention_bias / mlp_bias") {
        TinySpec s;
        write_tiny_model(dir, s);
        json c = tiny_config(s);
        c["attention_bias"] = true;
        pyr_test::write_file(dir / "config.json", c.dump());
        CHECK_PYR_ERROR(pyr::Model::load(d), PYR_ERR_FORMAT, "missing tensor",
                        "model.layers.0.self_attn.q_proj.bias");
        c["attention_bias"] = false;
        c["mlp_bias"] = true;
        pyr_test::write_file(dir / "config.json", c.dump());
        CHECK_PYR_ERROR(pyr::Model::load(d), PYR_ERR_FORMAT, "missing tensor",
                        "model.layers.0.mlp.gate_proj.bias");
    }
    SUBCASE("more layers in config than in the weights") {
        TinySpec s;
        write_tiny_model(dir, s);
        json c = tiny_config(s);
        c["num_hidden_layers"] = 3;
        pyr_test::write_file(dir / "config.json", c.dump());
        CHECK_PYR_ERROR(pyr::Model::load(d), PYR_ERR_FORMAT, "model.layers.2.");
    }
    SUBCASE("vocab_size smaller than the tokenizer") {
        TinySpec s;
        s.vocab = 100;
        write_tiny_model(dir, s);
        CHECK_PYR_ERROR(pyr::Model::load(d), PYR_ERR_FORMAT, "tokenizer.model", "vocab_size 100");
    }
    SUBCASE("truncated weights file") {
        write_tiny_model(dir, TinySpec{});
        std::string bytes = pyr_test::read_file(dir / "model.safetensors");
        pyr_test::write_file(dir / "model.safetensors", bytes.substr(0, bytes.size() - 100));
        CHECK_PYR_ERROR(pyr::Model::load(d), PYR_ERR_FORMAT, "model.safetensors",
                        "beyond the data section");
    }
}
