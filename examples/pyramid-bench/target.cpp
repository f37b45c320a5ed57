// The backend under test: model shapes, random host weights for the CPU backend, the
// checkpoint with --model, and the backend itself.
#include <cctype>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>

#include "backend/cpu/cpu_backend.h"
#include "bench.h"
#include "common/error.h"
#include "pyramid.h"

namespace bench {

namespace {

// ---- model shapes and random host weights ---------------------------------------------

pyr::ModelConfig shape_config(const std::string& shape) {
    pyr::ModelConfig c;
    c.n_vocab = 32000;
    c.n_ctx_train = 4096;
    c.rms_norm_eps = 1e-5f;
    c.rope_theta = 10000.0f;
    c.head_dim = 128;
    if (shape == "llama2-7b") {
        c.n_embd = 4096, c.n_ff = 11008, c.n_layer = 32, c.n_head = 32, c.n_head_kv = 32;
    } else if (shape == "llama2-13b") {
        c.n_embd = 5120, c.n_ff = 13824, c.n_layer = 40, c.n_head = 40, c.n_head_kv = 40;
    } else if (shape == "llama3-8b") {  // 4 query heads a KV head; a 128256-token vocabulary
        c.n_embd = 4096, c.n_ff = 14336, c.n_layer = 32, c.n_head = 32, c.n_head_kv = 8;
        c.n_vocab = 128256;
        c.n_ctx_train = 8192;
        c.rope_theta = 500000.0f;
    } else {  // tiny: grouped-query attention, so that path is exercised too
        c.n_embd = 512, c.n_ff = 1376, c.n_layer = 8, c.n_head = 8, c.n_head_kv = 4;
        c.head_dim = 64;
    }
    c.dtype = pyr::DType::F16;
    return c;
}

uint64_t splitmix64(uint64_t x) {
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

// float -> IEEE half, round to nearest even. Magnitudes below the smallest normal half
// (6.1e-5) become 0: harmless for random weights, and it keeps this short.
uint16_t f32_to_f16(float f) {
    uint32_t x;
    std::memcpy(&x, &f, 4);
    const uint32_t sign = (x >> 16) & 0x8000u;
    const int32_t exp = int32_t((x >> 23) & 0xff) - 127 + 15;
    const uint32_t mant = x & 0x7fffffu;
    if (exp <= 0) return uint16_t(sign);
    if (exp >= 31) return uint16_t(sign | 0x7c00u);
    uint32_t h = sign | (uint32_t(exp) << 10) | (mant >> 13);
    const uint32_t rest = mant & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;  // a carry rounds into the exponent
    return uint16_t(h);
}

uint16_t f32_to_bf16(float f) {
    uint32_t x;
    std::memcpy(&x, &f, 4);
    return uint16_t((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

// Random weights in host memory for the CPU backend (the CUDA backend makes its own on the
// device). Same distribution as CudaBackend::randomize: uniform, scaled by 1/sqrt(fan-in)
// so that activations stay O(1), norms near 1 -- so the CPU runs the same kind of numbers.
struct HostWeights {
    std::deque<std::vector<uint16_t>> buffers;  // a deque: adding one never moves the others
    pyr::ModelWeights weights;
    uint64_t bytes = 0;
};

std::shared_ptr<HostWeights> make_host_weights(const pyr::ModelConfig& c, bool bf16, uint64_t seed) {
    auto hw = std::make_shared<HostWeights>();
    const pyr::DType dt = bf16 ? pyr::DType::BF16 : pyr::DType::F16;
    uint64_t stream = 0;
    auto make = [&](int64_t rows, int64_t cols, float scale, float offset) {
        std::vector<uint16_t>& buf = hw->buffers.emplace_back(size_t(rows * cols));
        const uint64_t s = seed + 1000003ull * ++stream;
        for (size_t i = 0; i < buf.size(); ++i) {
            const uint64_t r = splitmix64(s ^ splitmix64(uint64_t(i)));
            const float u = float(r >> 40) * (2.0f / 16777216.0f) - 1.0f;  // 24 bits -> [-1, 1)
            const float w = offset + scale * u;
            buf[i] = bf16 ? f32_to_bf16(w) : f32_to_f16(w);
        }
        hw->bytes += buf.size() * 2;
        return pyr::Tensor{dt, rows, cols, buf.data()};
    };
    auto matrix = [&](int64_t rows, int64_t cols) {
        return make(rows, cols, 1.0f / std::sqrt(float(cols)), 0.0f);
    };
    auto norm = [&](int64_t n) { return make(n, 1, 0.1f, 1.0f); };
    const int64_t q_dim = int64_t(c.n_head) * c.head_dim, kv_dim = int64_t(c.n_head_kv) * c.head_dim;
    pyr::ModelWeights& w = hw->weights;
    w.tok_embd = make(c.n_vocab, c.n_embd, 1.0f, 0.0f);
    w.output_norm = norm(c.n_embd);
    w.output = matrix(c.n_vocab, c.n_embd);
    for (int il = 0; il < c.n_layer; ++il) {
        pyr::LayerWeights L;
        L.attn_norm = norm(c.n_embd);
        L.wq = matrix(q_dim, c.n_embd);
        L.wk = matrix(kv_dim, c.n_embd);
        L.wv = matrix(kv_dim, c.n_embd);
        L.wo = matrix(c.n_embd, q_dim);
        L.ffn_norm = norm(c.n_embd);
        L.w_gate = matrix(c.n_ff, c.n_embd);
        L.w_up = matrix(c.n_ff, c.n_embd);
        L.w_down = matrix(c.n_embd, c.n_ff);
        w.layers.push_back(L);
    }
    return hw;
}

// ---- the backend under test -----------------------------------------------------------


int cuda_index(const std::string& device) {
    return device == "cpu" ? -1 : std::atoi(device.c_str() + 5);
}

std::string lower(std::string s) {
    for (char& ch : s) ch = char(std::tolower(static_cast<unsigned char>(ch)));
    return s;
}

}  // namespace

// Fails before any weights are made when the device is not there.
void check_device(const std::string& device) {
    const int idx = cuda_index(device), n = pyr::cuda_device_count();
    if (idx >= n)
        pyr::fail(PYR_ERR_UNSUPPORTED,
                  "device '" + device + "': " +
                      (n > 0 ? "this machine has " + std::to_string(n) + " CUDA device(s)"
                             : std::string("no CUDA device (no GPU, no driver, or a build "
                                           "without CUDA)")) +
                      "; use --device cpu");
}

// The model's config (and the checkpoint with --model), before any weights are made, so
// that the flags can be checked against it cheaply.
Target describe_target(const Options& o) {
    Target t;
    if (o.model.empty()) {
        t.config = shape_config(o.shape);
        t.shape = o.shape;
        t.dtype = o.dtype;
    } else {
        std::fprintf(stderr, "pyramid-bench: loading %s...\n", o.model.c_str());
        t.model = pyr::Model::load(o.model);
        t.config = t.model->config();
        t.shape = o.model;
        const pyr::DType dt = t.model->weights().tok_embd.dtype;
        // The CUDA backend keeps F16 and BF16 as they are and narrows F32 to F16.
        t.dtype = o.device != "cpu" && dt == pyr::DType::F32 ? "f16" : lower(pyr::dtype_name(dt));
        t.host_weight_bytes = t.model->weights_bytes();
    }
    return t;
}

void open_backend(const Options& o, Target& t) {
    const bool bf16 = o.dtype == "bf16";
    if (o.device == "cpu") {
        if (t.model) {
            t.backend = pyr::make_cpu_backend(t.model, o.threads, o.max_device_bytes);
            return;
        }
        std::fprintf(stderr, "pyramid-bench: making random %s weights (%s) on the host...\n",
                     t.shape.c_str(), o.dtype.c_str());
        std::shared_ptr<HostWeights> hw = make_host_weights(t.config, bf16, o.seed);
        t.host_weight_bytes = hw->bytes;
        const pyr::ModelWeights& w = hw->weights;
        // The backend holds views into hw; passing it as the owner keeps it alive as long.
        t.backend = std::make_unique<pyr::CpuBackend>(t.config, w, o.threads, std::move(hw),
                                                      o.max_device_bytes);
        return;
    }
    if (t.model) {
        std::fprintf(stderr, "pyramid-bench: uploading weights to %s...\n", o.device.c_str());
        t.backend = pyr::make_cuda_backend(t.model, cuda_index(o.device), o.max_device_bytes);
    } else {
        std::fprintf(stderr, "pyramid-bench: making random %s weights (%s) on %s...\n",
                     t.shape.c_str(), o.dtype.c_str(), o.device.c_str());
        t.backend = pyr::make_cuda_backend_random(t.config, bf16, o.seed, cuda_index(o.device),
                                                  o.max_device_bytes);
    }
}

}  // namespace bench
