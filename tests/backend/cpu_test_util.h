// Helpers for the CPU backend tests: a seeded RNG (the seed is printed on failure), host
// tensors of any dtype that remember their exact values, and a tiny random LLaMA with a
// slow double-precision reference forward (plain loops, FORMATS.md formulas).
#pragma once

#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <random>
#include <vector>

#include "backend/cpu/cpu_ops.h"
#include "common/dtype.h"
#include "model/model.h"

namespace pyr_test {

using pyr::DType;

// A fresh seed per run; tests CAPTURE(rng.seed) so a failure can be replayed.
struct Rng {
    uint32_t seed;
    std::mt19937 gen;
    Rng() : seed(std::random_device{}()), gen(seed) {}
    float uniform(float lo, float hi) { return std::uniform_real_distribution<float>(lo, hi)(gen); }
    int32_t index(int32_t n) { return std::uniform_int_distribution<int32_t>(0, n - 1)(gen); }
    std::vector<float> vec(size_t n, float scale) {
        std::vector<float> v(n);
        for (float& x : v) x = uniform(-scale, scale);
        return v;
    }
};

// Chooses the SIMD or the generic CPU kernels; restores SIMD at scope exit.
struct KernelChoice {
    explicit KernelChoice(bool simd) { pyr::cpu::set_simd_enabled(simd); }
    ~KernelChoice() { pyr::cpu::set_simd_enabled(true); }
    KernelChoice(const KernelChoice&) = delete;
    KernelChoice& operator=(const KernelChoice&) = delete;
};

// f32 -> f16 bits by truncation (normal range only; tiny values flush to signed zero).
inline uint16_t f32_to_f16_trunc(float f) {
    uint32_t bits;
    std::memcpy(&bits, &f, 4);
    const uint16_t sign = uint16_t((bits >> 16) & 0x8000);
    const int32_t exp = int32_t((bits >> 23) & 0xff) - 127 + 15;
    if (exp <= 0) return sign;
    if (exp >= 31) return uint16_t(sign | 0x7bff);
    return uint16_t(sign | (uint32_t(exp) << 10) | ((bits >> 13) & 0x3ff));
}

// A weight of any dtype in host memory, with the exact value of every element.
struct HostTensor {
    DType dtype = DType::F32;
    int64_t rows = 0, cols = 0;
    std::vector<float> f32;
    std::vector<uint16_t> half;  // F16 or BF16 bits
    std::vector<double> values;  // (rows, cols) exact values

    pyr::Tensor view() const {
        if (values.empty()) return {};
        pyr::Tensor t;
        t.dtype = dtype;
        t.rows = rows;
        t.cols = cols;
        t.data = dtype == DType::F32 ? static_cast<const void*>(f32.data())
                                     : static_cast<const void*>(half.data());
        return t;
    }
    double at(int64_t r, int64_t c) const { return values[size_t(r * cols + c)]; }

    // Elements uniform in [center - scale, center + scale], rounded to the dtype.
    static HostTensor random(Rng& rng, DType dtype, int64_t rows, int64_t cols, float scale,
                             float center = 0.0f) {
        HostTensor t;
        t.dtype = dtype;
        t.rows = rows;
        t.cols = cols;
        const size_t n = size_t(rows * cols);
        t.values.resize(n);
        if (dtype == DType::F32) t.f32.resize(n); else t.half.resize(n);
        for (size_t i = 0; i < n; ++i) {
            const float f = center + rng.uniform(-scale, scale);
            if (dtype == DType::F32) {
                t.f32[i] = f;
                t.values[i] = f;
            } else if (dtype == DType::F16) {
                t.half[i] = f32_to_f16_trunc(f);
                t.values[i] = pyr::f16_to_f32(t.half[i]);
            } else {
                uint32_t bits;
                std::memcpy(&bits, &f, 4);
                t.half[i] = uint16_t(bits >> 16);
                t.values[i] = pyr::bf16_to_f32(t.half[i]);
            }
        }
        return t;
    }
};

// ---- a tiny random LLaMA and its reference forward -----------------------------------

struct HostLayer {
    HostTensor attn_norm, wq, wk, wv, wo, bq, bk, bv, bo;
    HostTensor ffn_norm, w_gate, w_up, w_down, b_gate, b_up, b_down;
};

struct TinyModel {
    pyr::ModelConfig config;
    HostTensor tok_embd, output_norm, output;
    std::vector<HostLayer> layers;

    const HostTensor& out() const { return config.tie_word_embeddings ? tok_embd : output; }
    pyr::ModelWeights weights() const {
        pyr::ModelWeights w;
        w.tok_embd = tok_embd.view();
        w.output_norm = output_norm.view();
        w.output = out().view();
        for (const HostLayer& l : layers) {
            pyr::LayerWeights lw;
            lw.attn_norm = l.attn_norm.view();
            lw.wq = l.wq.view(), lw.wk = l.wk.view(), lw.wv = l.wv.view(), lw.wo = l.wo.view();
            lw.bq = l.bq.view(), lw.bk = l.bk.view(), lw.bv = l.bv.view(), lw.bo = l.bo.view();
            lw.ffn_norm = l.ffn_norm.view();
            lw.w_gate = l.w_gate.view(), lw.w_up = l.w_up.view(), lw.w_down = l.w_down.view();
            lw.b_gate = l.b_gate.view(), lw.b_up = l.b_up.view(), lw.b_down = l.b_down.view();
            w.layers.push_back(lw);
        }
        return w;
    }
};

// 2 layers, n_embd 32, 4 heads, 2 kv heads, head_dim 12 (an override: n_head*hd != n_embd),
// n_ff 40, vocab 50.
inline TinyModel make_tiny_model(Rng& rng, DType dtype, bool bias, bool tied) {
    TinyModel m;
    pyr::ModelConfig& c = m.config;
    c.n_vocab = 50, c.n_embd = 32, c.n_ff = 40, c.n_layer = 2;
    c.n_head = 4, c.n_head_kv = 2, c.head_dim = 12, c.n_ctx_train = 64;
    c.rms_norm_eps = 1e-5f;
    c.tie_word_embeddings = tied, c.attention_bias = bias, c.mlp_bias = bias;
    const int64_t H = c.n_embd, Q = c.n_head * c.head_dim, KV = c.n_head_kv * c.head_dim;
    auto mat = [&](int64_t rows, int64_t cols) {
        return HostTensor::random(rng, dtype, rows, cols, 1.7f / std::sqrt(float(cols)));
    };
    auto vec = [&](int64_t n, bool present, float center = 0.0f) {
        return present ? HostTensor::random(rng, dtype, n, 1, center == 0.0f ? 0.1f : 0.2f, center)
                       : HostTensor{};
    };
    m.tok_embd = HostTensor::random(rng, dtype, c.n_vocab, H, 1.0f);
    m.output_norm = vec(H, true, 1.0f);
    if (!tied) m.output = mat(c.n_vocab, H);
    for (int il = 0; il < c.n_layer; ++il) {
        HostLayer l;
        l.attn_norm = vec(H, true, 1.0f), l.ffn_norm = vec(H, true, 1.0f);
        l.wq = mat(Q, H), l.wk = mat(KV, H), l.wv = mat(KV, H), l.wo = mat(H, Q);
        l.bq = vec(Q, bias), l.bk = vec(KV, bias), l.bv = vec(KV, bias), l.bo = vec(H, bias);
        l.w_gate = mat(c.n_ff, H), l.w_up = mat(c.n_ff, H), l.w_down = mat(H, c.n_ff);
        l.b_gate = vec(c.n_ff, bias), l.b_up = vec(c.n_ff, bias), l.b_down = vec(H, bias);
        m.layers.push_back(std::move(l));
    }
    return m;
}

using Vec = std::vector<double>;

// y = x W^T + b, one token.
inline Vec ref_linear(const Vec& x, const HostTensor& w, const HostTensor& b) {
    Vec y(size_t(w.rows));
    for (int64_t o = 0; o < w.rows; ++o) {
        double s = b.values.empty() ? 0.0 : b.values[size_t(o)];
        for (int64_t i = 0; i < w.cols; ++i) s += x[size_t(i)] * w.at(o, i);
        y[size_t(o)] = s;
    }
    return y;
}

inline Vec ref_rmsnorm(const Vec& x, const HostTensor& w, double eps) {
    double ss = 0.0;
    for (double v : x) ss += v * v;
    const double inv = 1.0 / std::sqrt(ss / double(x.size()) + eps);
    Vec y(x.size());
    for (size_t i = 0; i < x.size(); ++i) y[i] = w.values[i] * x[i] * inv;
    return y;
}

// RoPE (default frequencies) on every head of x at position p, in double.
inline void ref_rope(Vec& x, int n_head, int hd, double theta, int32_t p) {
    const int half = hd / 2;
    for (int h = 0; h < n_head; ++h) {
        double* xh = x.data() + h * hd;
        for (int i = 0; i < half; ++i) {
            const double angle = p * std::pow(theta, -2.0 * i / hd);
            const double a = xh[i], b = xh[i + half];
            xh[i] = a * std::cos(angle) - b * std::sin(angle);
            xh[i + half] = b * std::cos(angle) + a * std::sin(angle);
        }
    }
}

// Softmax attention of one query over the keys j with visible[j], GQA.
inline Vec ref_attention(const Vec& q, const std::vector<Vec>& k, const std::vector<Vec>& v,
                         const std::vector<bool>& visible, int n_head, int n_head_kv, int hd) {
    Vec out(size_t(n_head * hd), 0.0);
    for (int h = 0; h < n_head; ++h) {
        const int kvh = h / (n_head / n_head_kv);
        Vec s(k.size(), -INFINITY);
        double mx = -INFINITY;
        for (size_t j = 0; j < k.size(); ++j) {
            if (!visible[j]) continue;
            double d = 0.0;
            for (int i = 0; i < hd; ++i) d += q[size_t(h * hd + i)] * k[j][size_t(kvh * hd + i)];
            s[j] = d / std::sqrt(double(hd));
            mx = std::max(mx, s[j]);
        }
        double sum = 0.0;
        for (size_t j = 0; j < k.size(); ++j) sum += visible[j] ? std::exp(s[j] - mx) : 0.0;
        for (size_t j = 0; j < k.size(); ++j) {
            if (!visible[j]) continue;
            const double p = std::exp(s[j] - mx) / sum;
            for (int i = 0; i < hd; ++i) out[size_t(h * hd + i)] += p * v[j][size_t(kvh * hd + i)];
        }
    }
    return out;
}

// visible(il, query index, key index): whether a key takes part in a query's attention.
using Visibility = std::function<bool(int il, size_t iq, size_t ik)>;

// The whole sequence at positions 0..n-1 at once, no cache; returns the logits of every
// position. Default visibility: causal.
inline std::vector<Vec> ref_forward(const TinyModel& m, const std::vector<int32_t>& tokens,
                                    const Visibility& visible = nullptr) {
    const pyr::ModelConfig& c = m.config;
    const size_t n = tokens.size();
    std::vector<Vec> x(n);
    for (size_t t = 0; t < n; ++t)
        for (int64_t i = 0; i < c.n_embd; ++i) x[t].push_back(m.tok_embd.at(tokens[t], i));
    for (int il = 0; il < c.n_layer; ++il) {
        const HostLayer& l = m.layers[size_t(il)];
        std::vector<Vec> q(n), k(n), v(n);
        for (size_t t = 0; t < n; ++t) {
            const Vec xn = ref_rmsnorm(x[t], l.attn_norm, c.rms_norm_eps);
            q[t] = ref_linear(xn, l.wq, l.bq);
            k[t] = ref_linear(xn, l.wk, l.bk);
            v[t] = ref_linear(xn, l.wv, l.bv);
            ref_rope(q[t], c.n_head, c.head_dim, c.rope_theta, int32_t(t));
            ref_rope(k[t], c.n_head_kv, c.head_dim, c.rope_theta, int32_t(t));
        }
        for (size_t t = 0; t < n; ++t) {
            std::vector<bool> vis(n);
            for (size_t j = 0; j < n; ++j) vis[j] = visible ? visible(il, t, j) : j <= t;
            const Vec a = ref_attention(q[t], k, v, vis, c.n_head, c.n_head_kv, c.head_dim);
            const Vec o = ref_linear(a, l.wo, l.bo);
            for (size_t i = 0; i < o.size(); ++i) x[t][i] += o[i];
            const Vec xn = ref_rmsnorm(x[t], l.ffn_norm, c.rms_norm_eps);
            Vec g = ref_linear(xn, l.w_gate, l.b_gate);
            const Vec u = ref_linear(xn, l.w_up, l.b_up);
            for (size_t i = 0; i < g.size(); ++i) g[i] = g[i] / (1.0 + std::exp(-g[i])) * u[i];
            const Vec d = ref_linear(g, l.w_down, l.b_down);
            for (size_t i = 0; i < d.size(); ++i) x[t][i] += d[i];
        }
    }
    std::vector<Vec> logits(n);
    for (size_t t = 0; t < n; ++t)
        logits[t] = ref_linear(ref_rmsnorm(x[t], m.output_norm, c.rms_norm_eps), m.out(), {});
    return logits;
}

}  // namespace pyr_test
