// Model::load: config.json + safetensors weights + tokenizer.model of an HF LLaMA directory.
// Every tensor the config implies is required with its exact shape (HF layout [out, in]),
// so the forward pass can index the weights without further checks.
#include "model/model.h"

#include <sys/stat.h>

#include <cerrno>
#include <cstring>

#include "common/error.h"
#include "common/log.h"

namespace pyr {
namespace {

// Binds the tensor store to Tensor views with the shapes the config implies.
class WeightBinder {
public:
    explicit WeightBinder(const TensorStore& store) : store_(store) {}

    Tensor matrix(const std::string& name, int64_t rows, int64_t cols) const {
        const TensorInfo& t = store_.require(name, {rows, cols});
        return Tensor{t.dtype, rows, cols, t.data};
    }
    Tensor vector(const std::string& name, int64_t n) const {
        const TensorInfo& t = store_.require(name, {n});
        return Tensor{t.dtype, n, 1, t.data};
    }

private:
    const TensorStore& store_;
};

LayerWeights bind_layer(const WeightBinder& w, const ModelConfig& c, int il) {
    const int64_t n_embd = c.n_embd;
    const int64_t q_dim = int64_t(c.n_head) * c.head_dim;
    const int64_t kv_dim = int64_t(c.n_head_kv) * c.head_dim;
    const int64_t n_ff = c.n_ff;
    const std::string p = "model.layers." + std::to_string(il) + ".";
    const std::string attn = p + "self_attn.", mlp = p + "mlp.";
    LayerWeights l;
    l.attn_norm = w.vector(p + "input_layernorm.weight", n_embd);
    l.wq = w.matrix(attn + "q_proj.weight", q_dim, n_embd);
    l.wk = w.matrix(attn + "k_proj.weight", kv_dim, n_embd);
    l.wv = w.matrix(attn + "v_proj.weight", kv_dim, n_embd);
    l.wo = w.matrix(attn + "o_proj.weight", n_embd, q_dim);
    if (c.attention_bias) {
        l.bq = w.vector(attn + "q_proj.bias", q_dim);
        l.bk = w.vector(attn + "k_proj.bias", kv_dim);
        l.bv = w.vector(attn + "v_proj.bias", kv_dim);
        l.bo = w.vector(attn + "o_proj.bias", n_embd);
    }
    l.ffn_norm = w.vector(p + "post_attention_layernorm.weight", n_embd);
    l.w_gate = w.matrix(mlp + "gate_proj.weight", n_ff, n_embd);
    l.w_up = w.matrix(mlp + "up_proj.weight", n_ff, n_embd);
    l.w_down = w.matrix(mlp + "down_proj.weight", n_embd, n_ff);
    if (c.mlp_bias) {
        l.b_gate = w.vector(mlp + "gate_proj.bias", n_ff);
        l.b_up = w.vector(mlp + "up_proj.bias", n_ff);
        l.b_down = w.vector(mlp + "down_proj.bias", n_embd);
    }
    return l;
}

ModelWeights bind_weights(const TensorStore& store, const ModelConfig& c) {
    WeightBinder w(store);
    ModelWeights m;
    m.tok_embd = w.matrix("model.embed_tokens.weight", c.n_vocab, c.n_embd);
    m.output_norm = w.vector("model.norm.weight", c.n_embd);
    // Tied: the output projection is the embedding; a stray lm_head.weight is ignored, as
    // transformers does when it ties the two.
    m.output = c.tie_word_embeddings ? m.tok_embd
                                     : w.matrix("lm_head.weight", c.n_vocab, c.n_embd);
    m.layers.reserve(size_t(c.n_layer));
    for (int il = 0; il < c.n_layer; ++il) m.layers.push_back(bind_layer(w, c, il));
    return m;
}

void require_directory(const std::string& dir) {
    struct stat st {};
    if (::stat(dir.c_str(), &st) != 0)
        fail(PYR_ERR_IO, dir + ": cannot open model directory: " + std::strerror(errno));
    if (!S_ISDIR(st.st_mode)) fail(PYR_ERR_IO, dir + ": not a directory");
}

// Checked here rather than left to the tokenizer so that the message is the loader's.
void require_file(const std::string& path, const char* what) {
    struct stat st {};
    if (::stat(path.c_str(), &st) != 0)
        fail(PYR_ERR_IO, path + ": " + what + " not found: " + std::strerror(errno));
    if (!S_ISREG(st.st_mode)) fail(PYR_ERR_IO, path + ": " + what + " is not a regular file");
}

std::string summary(const Model& m) {
    const ModelConfig& c = m.config();
    return "loaded " + m.dir() + ": " + std::to_string(c.n_layer) + " layers, n_embd " +
           std::to_string(c.n_embd) + ", n_head " + std::to_string(c.n_head) + "/" +
           std::to_string(c.n_head_kv) + " (kv), head_dim " + std::to_string(c.head_dim) +
           ", n_ff " + std::to_string(c.n_ff) + ", vocab " + std::to_string(c.n_vocab) +
           ", weights " + dtype_name(m.weights().tok_embd.dtype) + " " +
           std::to_string(m.weights_bytes() >> 20) + " MiB";
}

}  // namespace

std::shared_ptr<const Model> Model::load(const std::string& dir) {
    require_directory(dir);
    auto model = std::make_shared<Model>();
    model->dir_ = dir;
    model->config_ = load_model_config(dir + "/config.json");
    const std::string tokenizer_path = dir + "/tokenizer.model";
    require_file(tokenizer_path, "tokenizer file");
    model->store_ = TensorStore::open_dir(dir);
    model->weights_ = bind_weights(*model->store_, model->config_);
    model->tokenizer_ = Tokenizer::load(tokenizer_path);
    const int32_t tok_vocab = model->tokenizer_->n_vocab();
    if (tok_vocab > model->config_.n_vocab)
        fail(PYR_ERR_FORMAT, tokenizer_path + ": tokenizer has " + std::to_string(tok_vocab) +
                                 " pieces, more than vocab_size " +
                                 std::to_string(model->config_.n_vocab) + " in config.json");
    PYR_LOG_INFO(summary(*model));
    return model;
}

}  // namespace pyr
