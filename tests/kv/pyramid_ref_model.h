// A LLaMA forward for the PyramidInfer reference, one token and one op at a time: weights read
// through the loader (pyr::Model::load) and kept as their exact float values, every sum in
// double (FORMATS.md "Forward"). Attention is split so that the caller sees each query's
// head-averaged probabilities over every key (the "full attention matrices" of the reference).
#pragma once

#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "common/dtype.h"
#include "model/model.h"
#include "model/rope.h"

namespace pyr_ref {

using Vec = std::vector<double>;

struct Matrix {
    int64_t rows = 0, cols = 0;
    std::vector<float> w;  // (rows, cols), exact values of the stored weights; empty = absent
    explicit operator bool() const { return !w.empty(); }
};

inline Matrix to_matrix(const pyr::Tensor& t) {
    Matrix m;
    if (!t) return m;
    m.rows = t.rows, m.cols = t.cols;
    m.w.resize(size_t(t.rows * t.cols));
    pyr::convert_to_f32(t.dtype, t.data, m.w.data(), m.w.size());
    return m;
}

struct RefLayer {
    Matrix attn_norm, wq, wk, wv, wo, bq, bk, bv, bo;
    Matrix ffn_norm, w_gate, w_up, w_down, b_gate, b_up, b_down;
};

struct RefModel {
    pyr::ModelConfig cfg;
    Matrix tok_embd, output_norm, output;
    std::vector<RefLayer> layers;
    std::vector<float> inv_freq;  // RoPE f_i as the model defines them (float, as HF)

    static RefModel load(const std::string& dir) {
        auto model = pyr::Model::load(dir);
        RefModel m;
        m.cfg = model->config();
        REQUIRE_MESSAGE(m.cfg.rope_scaling.type != pyr::RopeScaling::Type::Dynamic,
                        "the reference has no stateful dynamic RoPE");
        const pyr::ModelWeights& w = model->weights();
        m.tok_embd = to_matrix(w.tok_embd);
        m.output_norm = to_matrix(w.output_norm);
        m.output = to_matrix(w.output);
        for (const pyr::LayerWeights& lw : w.layers) {
            RefLayer l;
            l.attn_norm = to_matrix(lw.attn_norm), l.ffn_norm = to_matrix(lw.ffn_norm);
            l.wq = to_matrix(lw.wq), l.wk = to_matrix(lw.wk), l.wv = to_matrix(lw.wv);
            l.wo = to_matrix(lw.wo);
            l.bq = to_matrix(lw.bq), l.bk = to_matrix(lw.bk), l.bv = to_matrix(lw.bv);
            l.bo = to_matrix(lw.bo);
            l.w_gate = to_matrix(lw.w_gate), l.w_up = to_matrix(lw.w_up);
            l.w_down = to_matrix(lw.w_down);
            l.b_gate = to_matrix(lw.b_gate), l.b_up = to_matrix(lw.b_up);
            l.b_down = to_matrix(lw.b_down);
            m.layers.push_back(std::move(l));
        }
        m.inv_freq = pyr::rope_inv_freq(m.cfg, m.cfg.n_ctx_train);
        return m;
    }
};

// y = x W^T + b
inline Vec linear(const Vec& x, const Matrix& w, const Matrix& b) {
    REQUIRE(int64_t(x.size()) == w.cols);
    Vec y(size_t(w.rows));
    for (int64_t o = 0; o < w.rows; ++o) {
        double s = b ? double(b.w[size_t(o)]) : 0.0;
        const float* row = w.w.data() + o * w.cols;
        for (int64_t i = 0; i < w.cols; ++i) s += x[size_t(i)] * double(row[i]);
        y[size_t(o)] = s;
    }
    return y;
}

// RMSNorm(x) = w * x / sqrt(mean(x^2) + eps)
inline Vec rmsnorm(const Vec& x, const Matrix& w, double eps) {
    double ss = 0.0;
    for (double v : x) ss += v * v;
    const double inv = 1.0 / std::sqrt(ss / double(x.size()) + eps);
    Vec y(x.size());
    for (size_t i = 0; i < x.size(); ++i) y[i] = double(w.w[i]) * x[i] * inv;
    return y;
}

// Rotate-half RoPE on every head at position p; the angle p * f_i is rounded to float as HF
// computes it (so the reference and an fp32 engine rotate by the same angle).
inline void rope(Vec& x, int n_head, int hd, const std::vector<float>& inv_freq, int32_t p) {
    const int half = hd / 2;
    for (int h = 0; h < n_head; ++h) {
        double* xh = x.data() + h * hd;
        for (int i = 0; i < half; ++i) {
            const double angle = double(float(p) * inv_freq[size_t(i)]);
            const double a = xh[i], b = xh[i + half];
            xh[i] = a * std::cos(angle) - b * std::sin(angle);
            xh[i + half] = b * std::cos(angle) + a * std::sin(angle);
        }
    }
}

// One token's q (after RoPE), k (after RoPE) and v at layer il.
struct Qkv {
    Vec q, k, v;
};

inline Qkv project_qkv(const RefModel& m, int il, const Vec& x, int32_t pos) {
    const pyr::ModelConfig& c = m.cfg;
    const RefLayer& l = m.layers[size_t(il)];
    const Vec xn = rmsnorm(x, l.attn_norm, c.rms_norm_eps);
    Qkv r{linear(xn, l.wq, l.bq), linear(xn, l.wk, l.bk), linear(xn, l.wv, l.bv)};
    rope(r.q, c.n_head, c.head_dim, m.inv_freq, pos);
    rope(r.k, c.n_head_kv, c.head_dim, m.inv_freq, pos);
    return r;
}

// Attention of one query over keys[0..n_visible): the concatenated head outputs, and in
// `avg_probs` (size keys.size()) the softmax probabilities averaged over the query heads
// (0 for the keys it cannot see).
inline Vec attend(const RefModel& m, const Vec& q, const std::vector<Vec>& keys,
                  const std::vector<Vec>& values, size_t n_visible, Vec& avg_probs) {
    const int nh = m.cfg.n_head, nkv = m.cfg.n_head_kv, hd = m.cfg.head_dim;
    Vec out(size_t(nh * hd), 0.0);
    avg_probs.assign(keys.size(), 0.0);
    Vec s(n_visible);
    for (int h = 0; h < nh; ++h) {
        const int kvh = h / (nh / nkv);  // GQA: query head h reads kv head h / (nh / nkv)
        double mx = -INFINITY;
        for (size_t j = 0; j < n_visible; ++j) {
            double d = 0.0;
            for (int i = 0; i < hd; ++i) d += q[size_t(h * hd + i)] * keys[j][size_t(kvh * hd + i)];
            s[j] = d / std::sqrt(double(hd));
            mx = std::max(mx, s[j]);
        }
        double sum = 0.0;
        for (size_t j = 0; j < n_visible; ++j) sum += std::exp(s[j] - mx);
        for (size_t j = 0; j < n_visible; ++j) {
            const double p = std::exp(s[j] - mx) / sum;
            avg_probs[j] += p / nh;
            for (int i = 0; i < hd; ++i) out[size_t(h * hd + i)] += p * values[j][size_t(kvh * hd + i)];
        }
    }
    return out;
}

// The rest of the block for one token: h = x + o_proj(attn); h + Down(silu(Gate(n)) * Up(n)).
inline Vec finish_block(const RefModel& m, int il, const Vec& x, const Vec& attn) {
    const RefLayer& l = m.layers[size_t(il)];
    Vec h = x;
    const Vec o = linear(attn, l.wo, l.bo);
    for (size_t i = 0; i < h.size(); ++i) h[i] += o[i];
    const Vec n = rmsnorm(h, l.ffn_norm, m.cfg.rms_norm_eps);
    Vec g = linear(n, l.w_gate, l.b_gate);
    const Vec u = linear(n, l.w_up, l.b_up);
    for (size_t i = 0; i < g.size(); ++i) g[i] = g[i] / (1.0 + std::exp(-g[i])) * u[i];
    const Vec d = linear(g, l.w_down, l.b_down);
    for (size_t i = 0; i < h.size(); ++i) h[i] += d[i];
    return h;
}

inline Vec embed(const RefModel& m, int32_t token) {
    const int64_t n = m.tok_embd.cols;
    Vec x(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) x[size_t(i)] = m.tok_embd.w[size_t(token * n + i)];
    return x;
}

inline Vec final_logits(const RefModel& m, const Vec& x) {
    return linear(rmsnorm(x, m.output_norm, m.cfg.rms_norm_eps), m.output, Matrix{});
}

// Greedy choice: the largest logit, ties to the lower id.
inline int32_t argmax(const Vec& logits) {
    size_t best = 0;
    for (size_t i = 1; i < logits.size(); ++i)
        if (logits[i] > logits[best]) best = i;
    return int32_t(best);
}

// (top1 - top2) / max(|top1|, 1): how close greedy decoding was to another token.
inline double top2_rel_gap(const Vec& logits) {
    double a = -INFINITY, b = -INFINITY;
    for (double v : logits) {
        if (v > a) b = a, a = v;
        else if (v > b) b = v;
    }
    return (a - b) / std::max(std::fabs(a), 1.0);
}

}  // namespace pyr_ref
