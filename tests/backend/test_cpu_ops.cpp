// The CPU ops (lib/backend/cpu/cpu_ops.h), RoPE frequencies (lib/model/rope.h) and the CPU
// KV storage, each against a plain-loop double-precision reference on fresh random inputs.
// Every case runs with the SIMD kernels and with the generic ones. To add an op: write its
// obvious loop here and compare on random shapes, odd sizes included.
#include <doctest/doctest.h>

#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "backend/cpu/cpu_backend.h"
#include "backend/cpu/cpu_ops.h"
#include "common/error.h"
#include "cpu_test_util.h"
#include "model/rope.h"

using namespace pyr_test;
namespace cpu = pyr::cpu;

namespace {

// |got - want| <= tol * scale for each element, naming the first bad index.
void check_close(const float* got, const Vec& want, double tol, const Vec& scale = {}) {
    for (size_t i = 0; i < want.size(); ++i) {
        const double s = scale.empty() ? std::max(1.0, std::fabs(want[i])) : scale[i];
        if (!(std::fabs(double(got[i]) - want[i]) <= tol * s)) {  // NaN fails too
            CAPTURE(i);
            CHECK(double(got[i]) == doctest::Approx(want[i]));
            return;
        }
    }
}

}  // namespace

// ---- conversions and matmul -----------------------------------------------------------

TEST_CASE("f16 -> f32: every half value, both kernel sets") {
    std::vector<uint16_t> all(65536);
    for (uint32_t i = 0; i < 65536; ++i) all[i] = uint16_t(i);
    pyr::Tensor t{DType::F16, 1, 65536, all.data()};
    for (bool simd : {true, false}) {
        KernelChoice kc(simd);
        CAPTURE(cpu::kernel_name());
        std::vector<float> out(65536);
        cpu::to_f32(t, 0, 65536, out.data());
        int bad = 0;
        for (uint32_t i = 0; i < 65536; ++i) {
            const float want = pyr::f16_to_f32(uint16_t(i));
            const bool ok = std::isnan(want) ? std::isnan(out[i]) : out[i] == want;
            bad += ok ? 0 : 1;
        }
        CHECK(bad == 0);
    }
}

// The dot path (fewer than 5 tokens) and the tiled path (row blocks of 16/32/64 rows, tiles
// of 6 tokens x 16 rows, token blocks): odd n_in, n_out not a multiple of any block.
TEST_CASE("matmul: y = x W^T + b for F32/F16/BF16 weights, odd sizes, 1 to 257 tokens") {
    Rng rng;
    CAPTURE(rng.seed);
    pyr::ThreadPool pool(2);
    struct Shape { int64_t n_in, n_out; };
    const Shape shapes[] = {{67, 33}, {384, 130}, {5, 3}, {29, 200}, {19, 515}, {19, 300}};
    for (DType dtype : {DType::F32, DType::F16, DType::BF16}) {
        for (Shape sh : shapes) {
            for (int64_t n_tok : {1, 3, 5, 17, 64, 257}) {
                for (bool bias : {false, true}) {
                    CAPTURE(pyr::dtype_name(dtype));
                    CAPTURE(sh.n_in);
                    CAPTURE(sh.n_out);
                    CAPTURE(n_tok);
                    CAPTURE(bias);
                    HostTensor w = HostTensor::random(rng, dtype, sh.n_out, sh.n_in, 1.0f);
                    HostTensor b = bias ? HostTensor::random(rng, dtype, sh.n_out, 1, 1.0f)
                                        : HostTensor{};
                    std::vector<float> x = rng.vec(size_t(n_tok * sh.n_in), 1.0f);
                    // want (n_tok, n_out) and the scale of its rounding: sum |x w| + |b|
                    Vec want, scale;
                    for (int64_t t = 0; t < n_tok; ++t) {
                        const Vec xt(x.begin() + t * sh.n_in, x.begin() + (t + 1) * sh.n_in);
                        const Vec yt = ref_linear(xt, w, b);
                        want.insert(want.end(), yt.begin(), yt.end());
                        for (int64_t o = 0; o < sh.n_out; ++o) {
                            double s = bias ? std::fabs(b.values[size_t(o)]) : 0.0;
                            for (int64_t i = 0; i < sh.n_in; ++i)
                                s += std::fabs(xt[size_t(i)] * w.at(o, i));
                            scale.push_back(s + 1e-30);
                        }
                    }
                    for (bool simd : {true, false}) {
                        KernelChoice kc(simd);
                        CAPTURE(cpu::kernel_name());
                        std::vector<float> y(size_t(n_tok * sh.n_out), NAN);
                        pyr::Tensor wt = w.view(), bt = b.view();
                        cpu::matmul(pool, x.data(), n_tok, {{&wt, &bt, y.data()}});
                        check_close(y.data(), want, 1e-6, scale);
                    }
                }
            }
        }
    }
}

TEST_CASE("matmul: several projections of one input share a pass") {
    Rng rng;
    CAPTURE(rng.seed);
    pyr::ThreadPool pool(2);
    const int64_t n_in = 29;
    HostTensor w1 = HostTensor::random(rng, DType::F16, 13, n_in, 1.0f);
    HostTensor w2 = HostTensor::random(rng, DType::F16, 7, n_in, 1.0f);
    HostTensor w3 = HostTensor::random(rng, DType::F16, 1, n_in, 1.0f);
    HostTensor w4 = HostTensor::random(rng, DType::BF16, 70, n_in, 1.0f);
    HostTensor b2 = HostTensor::random(rng, DType::F16, 7, 1, 1.0f);
    pyr::Tensor t1 = w1.view(), t2 = w2.view(), t3 = w3.view(), t4 = w4.view(), tb2 = b2.view();
    for (int64_t n_tok : {1, 3, 5, 64}) {
        for (bool simd : {true, false}) {
            KernelChoice kc(simd);
            CAPTURE(n_tok);
            CAPTURE(cpu::kernel_name());
            std::vector<float> x = rng.vec(size_t(n_tok * n_in), 1.0f);
            std::vector<float> y1(static_cast<size_t>(n_tok * 13));
            std::vector<float> y2(static_cast<size_t>(n_tok * 7));
            std::vector<float> y3(static_cast<size_t>(n_tok));
            std::vector<float> y4(static_cast<size_t>(n_tok * 70));
            cpu::matmul(pool, x.data(), n_tok,
                        {{&t1, nullptr, y1.data()},
                         {&t2, &tb2, y2.data()},
                         {&t3, nullptr, y3.data()},
                         {&t4, nullptr, y4.data()}});
            for (int64_t t = 0; t < n_tok; ++t) {
                Vec xt(x.begin() + t * n_in, x.begin() + (t + 1) * n_in);
                check_close(y1.data() + t * 13, ref_linear(xt, w1, {}), 1e-5);
                check_close(y2.data() + t * 7, ref_linear(xt, w2, b2), 1e-5);
                check_close(y3.data() + t, ref_linear(xt, w3, {}), 1e-5);
                check_close(y4.data() + t * 70, ref_linear(xt, w4, {}), 1e-5);
            }
        }
    }
}

// ---- element-wise ops -----------------------------------------------------------------

TEST_CASE("rmsnorm: x * rsqrt(mean(x^2) + eps) * w, weights of every dtype") {
    Rng rng;
    CAPTURE(rng.seed);
    for (DType dtype : {DType::F32, DType::F16, DType::BF16}) {
        CAPTURE(pyr::dtype_name(dtype));
        const int64_t n = 67, n_tok = 3;
        HostTensor w = HostTensor::random(rng, dtype, n, 1, 0.5f, 1.0f);
        std::vector<float> x = rng.vec(size_t(n * n_tok), 2.0f);
        std::vector<float> y(x.size());
        cpu::rmsnorm(x.data(), n_tok, w.view(), 1e-5f, y.data());
        for (int64_t t = 0; t < n_tok; ++t) {
            Vec xt(x.begin() + t * n, x.begin() + (t + 1) * n);
            check_close(y.data() + t * n, ref_rmsnorm(xt, w, 1e-5), 1e-6);
        }
        cpu::rmsnorm(x.data(), n_tok, w.view(), 1e-5f, x.data());  // in place
        CHECK(x == y);
    }
}

TEST_CASE("silu_mul, add, embed") {
    Rng rng;
    CAPTURE(rng.seed);
    std::vector<float> g = rng.vec(37, 6.0f), u = rng.vec(37, 2.0f), g0 = g;
    cpu::silu_mul(g.data(), u.data(), 37);
    for (size_t i = 0; i < 37; ++i) {
        const double s = double(g0[i]) / (1.0 + std::exp(-double(g0[i]))) * u[i];
        CHECK(g[i] == doctest::Approx(s).epsilon(1e-6));
    }
    std::vector<float> y = rng.vec(9, 1.0f), x = rng.vec(9, 1.0f), y0 = y;
    cpu::add(y.data(), x.data(), 9);
    for (size_t i = 0; i < 9; ++i) CHECK(y[i] == y0[i] + x[i]);

    for (DType dtype : {DType::F32, DType::F16, DType::BF16}) {
        CAPTURE(pyr::dtype_name(dtype));
        HostTensor table = HostTensor::random(rng, dtype, 11, 19, 1.0f);
        const std::vector<int32_t> tokens{3, 0, 10, 3};
        std::vector<float> out(tokens.size() * 19);
        cpu::embed(table.view(), tokens.data(), int32_t(tokens.size()), out.data());
        for (size_t t = 0; t < tokens.size(); ++t)
            for (int64_t i = 0; i < 19; ++i) CHECK(out[t * 19 + size_t(i)] == table.at(tokens[t], i));
    }
}

// ---- RoPE -----------------------------------------------------------------------------

namespace {

pyr::ModelConfig rope_config(pyr::RopeScaling::Type type, int hd, float theta) {
    pyr::ModelConfig c;
    c.head_dim = hd;
    c.rope_theta = theta;
    c.n_ctx_train = 4096;
    c.rope_scaling.type = type;
    return c;
}

// FORMATS.md: f_i = theta^(-2i/hd) with the scaling rules, in double.
Vec rope_freq_formula(const pyr::ModelConfig& c, int32_t seq_len) {
    const int hd = c.head_dim;
    const pyr::RopeScaling& rs = c.rope_scaling;
    double theta = c.rope_theta;
    if (rs.type == pyr::RopeScaling::Type::Dynamic && seq_len > c.n_ctx_train) {
        const double s = double(seq_len) / c.n_ctx_train;
        theta *= std::pow(rs.factor * s - (rs.factor - 1.0), double(hd) / (hd - 2));
    }
    Vec f(size_t(hd / 2));
    for (int i = 0; i < hd / 2; ++i) {
        double fi = std::pow(theta, -2.0 * i / hd);
        if (rs.type == pyr::RopeScaling::Type::Linear) fi /= rs.factor;
        if (rs.type == pyr::RopeScaling::Type::Llama3) {
            const double L = rs.original_max_position, wl = 2.0 * 3.14159265358979323846 / fi;
            if (wl > L / rs.low_freq_factor) {
                fi /= rs.factor;
            } else if (wl >= L / rs.high_freq_factor) {
                const double s = (L / wl - rs.low_freq_factor) /
                                 (rs.high_freq_factor - rs.low_freq_factor);
                fi = (1 - s) * fi / rs.factor + s * fi;
            }
        }
        f[size_t(i)] = fi;
    }
    return f;
}

}  // namespace

TEST_CASE("rope_inv_freq: default, linear, dynamic, llama3 against the formulas") {
    using T = pyr::RopeScaling::Type;
    struct Case { const char* name; pyr::ModelConfig c; int32_t seq_len; };
    std::vector<Case> cases;
    cases.push_back({"default", rope_config(T::Default, 64, 10000.0f), 10});
    cases.push_back({"default hd 10", rope_config(T::Default, 10, 10000.0f), 10});
    pyr::ModelConfig lin = rope_config(T::Linear, 64, 10000.0f);
    lin.rope_scaling.factor = 4.0f;
    cases.push_back({"linear", lin, 10});
    pyr::ModelConfig dyn = rope_config(T::Dynamic, 64, 10000.0f);
    dyn.rope_scaling.factor = 2.0f;
    cases.push_back({"dynamic below max", dyn, 4096});
    cases.push_back({"dynamic above max", dyn, 6000});
    cases.push_back({"dynamic far above", dyn, 50000});
    pyr::ModelConfig l3 = rope_config(T::Llama3, 128, 500000.0f);
    l3.rope_scaling.factor = 8.0f;
    l3.rope_scaling.low_freq_factor = 1.0f;
    l3.rope_scaling.high_freq_factor = 4.0f;
    l3.rope_scaling.original_max_position = 8192;
    cases.push_back({"llama3", l3, 10});
    for (const Case& k : cases) {
        CAPTURE(k.name);
        const std::vector<float> got = pyr::rope_inv_freq(k.c, k.seq_len);
        const Vec want = rope_freq_formula(k.c, k.seq_len);
        REQUIRE(got.size() == want.size());
        for (size_t i = 0; i < want.size(); ++i) {
            CAPTURE(i);
            CHECK(std::fabs(got[i] - want[i]) <= 2e-6 * want[i]);
        }
    }
    // llama3 with these settings has frequencies in all three bands.
    const std::vector<float> base = pyr::rope_inv_freq(rope_config(T::Default, 128, 5e5f), 1);
    const std::vector<float> scaled = pyr::rope_inv_freq(l3, 1);
    int unchanged = 0, divided = 0, between = 0;
    for (size_t i = 0; i < base.size(); ++i) {
        const double r = double(scaled[i]) / base[i];
        unchanged += std::fabs(r - 1.0) < 1e-6;
        divided += std::fabs(r - 1.0 / 8.0) < 1e-6;
        between += r < 1.0 - 1e-6 && r > 1.0 / 8.0 + 1e-6;
    }
    CHECK(unchanged > 0);
    CHECK(divided > 0);
    CHECK(between > 0);
    // dynamic grows theta: lower frequencies than default above the trained length.
    CHECK(pyr::rope_inv_freq(dyn, 6000)[10] < pyr::rope_inv_freq(dyn, 4096)[10]);
}

TEST_CASE("rope_cos_sin and rope_apply: rotate-half at given positions") {
    Rng rng;
    CAPTURE(rng.seed);
    const int hd = 10, n_head = 3;
    const pyr::ModelConfig c = rope_config(pyr::RopeScaling::Type::Default, hd, 10000.0f);
    const std::vector<float> f = pyr::rope_inv_freq(c, 1);
    const std::vector<int32_t> pos{0, 1, 7, 1000, 4095};
    const int32_t n = int32_t(pos.size());
    std::vector<float> cs(pos.size() * hd / 2), sn(cs.size());
    pyr::rope_cos_sin(f, pos.data(), n, cs.data(), sn.data());
    for (int32_t t = 0; t < n; ++t) {
        for (int i = 0; i < hd / 2; ++i) {
            const double angle = pos[size_t(t)] * std::pow(10000.0, -2.0 * i / hd);
            // float32 angles (as HF) lose ~6e-8 relative of the angle
            const double tol = 1e-6 + 2e-7 * angle;
            CHECK(std::fabs(cs[size_t(t * hd / 2 + i)] - std::cos(angle)) <= tol);
            CHECK(std::fabs(sn[size_t(t * hd / 2 + i)] - std::sin(angle)) <= tol);
        }
    }
    std::vector<float> x = rng.vec(size_t(n * n_head * hd), 1.0f), x0 = x;
    cpu::rope_apply(x.data(), n, n_head, hd, cs.data(), sn.data());
    for (int32_t t = 0; t < n; ++t) {
        for (int h = 0; h < n_head; ++h) {
            const size_t o = size_t((t * n_head + h) * hd);
            for (int i = 0; i < hd / 2; ++i) {
                const double cv = cs[size_t(t * hd / 2 + i)], sv = sn[size_t(t * hd / 2 + i)];
                const double a = x0[o + size_t(i)], b = x0[o + size_t(i + hd / 2)];
                CHECK(x[o + size_t(i)] == doctest::Approx(a * cv - b * sv).epsilon(1e-6));
                CHECK(x[o + size_t(i + hd / 2)] == doctest::Approx(b * cv + a * sv).epsilon(1e-6));
            }
        }
    }
}

// ---- attention ------------------------------------------------------------------------

TEST_CASE("attention: GQA, causal by position over a non-contiguous cache, odd head_dim") {
    Rng rng;
    CAPTURE(rng.seed);
    pyr::ThreadPool pool(2);
    const int n_head = 4, n_head_kv = 2, hd = 10;
    const std::vector<int32_t> kv_pos{0, 1, 5, 9};
    const std::vector<int32_t> q_pos{9, 6, 0, 1};
    const int32_t n_kv = 4, n_q = 4;
    for (bool simd : {true, false}) {
        KernelChoice kc(simd);
        std::vector<float> q = rng.vec(size_t(n_q * n_head * hd), 2.0f);
        std::vector<float> k = rng.vec(size_t(n_kv * n_head_kv * hd), 2.0f);
        std::vector<float> v = rng.vec(k.size(), 1.0f);
        std::vector<float> out(q.size());
        cpu::AttentionArgs a;
        a.q = q.data(), a.q_pos = q_pos.data(), a.n_q = n_q;
        a.k = k.data(), a.v = v.data(), a.kv_pos = kv_pos.data(), a.n_kv = n_kv;
        a.n_head = n_head, a.n_head_kv = n_head_kv, a.head_dim = hd, a.out = out.data();
        cpu::attention(pool, a);
        std::vector<Vec> kr(static_cast<size_t>(n_kv)), vr(static_cast<size_t>(n_kv));
        for (int32_t j = 0; j < n_kv; ++j) {
            kr[size_t(j)].assign(k.begin() + j * n_head_kv * hd, k.begin() + (j + 1) * n_head_kv * hd);
            vr[size_t(j)].assign(v.begin() + j * n_head_kv * hd, v.begin() + (j + 1) * n_head_kv * hd);
        }
        for (int32_t t = 0; t < n_q; ++t) {
            CAPTURE(t);
            std::vector<bool> vis(static_cast<size_t>(n_kv));
            for (size_t j = 0; j < vis.size(); ++j) vis[j] = kv_pos[j] <= q_pos[size_t(t)];
            Vec qt(q.begin() + t * n_head * hd, q.begin() + (t + 1) * n_head * hd);
            check_close(out.data() + t * n_head * hd,
                        ref_attention(qt, kr, vr, vis, n_head, n_head_kv, hd), 1e-5);
        }
    }
    // A query that sees no key gets zeros (not NaN).
    std::vector<float> q(size_t(n_head * hd), 1.0f), k(size_t(n_head_kv * hd), 1.0f), out(q.size(), 7.0f);
    const int32_t late = 5, early = 2;
    cpu::AttentionArgs a;
    a.q = q.data(), a.q_pos = &early, a.n_q = 1, a.k = k.data(), a.v = k.data();
    a.kv_pos = &late, a.n_kv = 1, a.n_head = n_head, a.n_head_kv = n_head_kv, a.head_dim = hd;
    a.out = out.data();
    cpu::attention(pool, a);
    for (float o : out) CHECK(o == 0.0f);
}

// Both ways of cpu::attention: per query (fewer than 4 tokens) and tiled (4 or more), over
// caches longer than a key chunk, with the observations the KV policies ask for.
TEST_CASE("attention: per-query and tiled paths, probabilities and column sums") {
    Rng rng;
    CAPTURE(rng.seed);
    pyr::ThreadPool pool(3);
    struct Case { int n_head, n_head_kv, hd; int32_t n_q, n_kv; bool sorted; };
    const Case cases[] = {
        {6, 2, 64, 1, 300, true},   // decode: single heads per item, three key chunks
        {6, 2, 64, 3, 41, true},    // a few tokens: one kv group per item
        {6, 2, 64, 40, 300, true},  // prefill: tiles, several key chunks and panels
        {4, 2, 10, 5, 23, true},    // head_dim neither a multiple of 8 nor of 16
        {3, 3, 24, 64, 70, true},   // no GQA; head_dim = 16 + 8
        {8, 1, 16, 7, 19, false},   // MQA; cache positions out of order
        {6, 2, 80, 2, 33, false},
    };
    for (const Case& c : cases) {
        CAPTURE(c.n_head);
        CAPTURE(c.n_head_kv);
        CAPTURE(c.hd);
        CAPTURE(c.n_q);
        CAPTURE(c.n_kv);
        CAPTURE(c.sorted);
        const int kv_dim = c.n_head_kv * c.hd;
        // Distinct cache positions in [1, 3 n_kv]; queries anywhere in [0, 3 n_kv], so some
        // see every key, some none.
        std::vector<int32_t> kv_pos;
        for (int32_t p = 1; int32_t(kv_pos.size()) < c.n_kv; ++p)
            if (rng.index(3) == 0 || 3 * c.n_kv - p < c.n_kv - int32_t(kv_pos.size()))
                kv_pos.push_back(p);
        if (!c.sorted)
            for (int32_t j = c.n_kv - 1; j > 0; --j)
                std::swap(kv_pos[size_t(j)], kv_pos[size_t(rng.index(j + 1))]);
        std::vector<int32_t> q_pos(static_cast<size_t>(c.n_q));
        for (int32_t& p : q_pos) p = rng.index(3 * c.n_kv + 1);
        q_pos[0] = 0;  // sees nothing
        std::vector<float> q = rng.vec(size_t(c.n_q * c.n_head * c.hd), 1.0f);
        std::vector<float> k = rng.vec(size_t(c.n_kv * kv_dim), 1.0f);
        std::vector<float> v = rng.vec(k.size(), 1.0f);

        // reference: outputs (n_q, n_head * hd) and probabilities (n_q, n_head, n_kv)
        std::vector<Vec> kr(static_cast<size_t>(c.n_kv)), vr(static_cast<size_t>(c.n_kv));
        for (int32_t j = 0; j < c.n_kv; ++j) {
            kr[size_t(j)].assign(k.begin() + j * kv_dim, k.begin() + (j + 1) * kv_dim);
            vr[size_t(j)].assign(v.begin() + j * kv_dim, v.begin() + (j + 1) * kv_dim);
        }
        std::vector<Vec> want_out(static_cast<size_t>(c.n_q));
        Vec want_probs(size_t(c.n_q * c.n_head * c.n_kv), 0.0);
        Vec want_sums(size_t(c.n_head * c.n_kv), 0.0);
        for (int32_t t = 0; t < c.n_q; ++t) {
            std::vector<bool> vis(static_cast<size_t>(c.n_kv));
            for (size_t j = 0; j < vis.size(); ++j) vis[j] = kv_pos[j] <= q_pos[size_t(t)];
            const Vec qt(q.begin() + t * c.n_head * c.hd, q.begin() + (t + 1) * c.n_head * c.hd);
            want_out[size_t(t)] = ref_attention(qt, kr, vr, vis, c.n_head, c.n_head_kv, c.hd);
            for (size_t h = 0; h < size_t(c.n_head); ++h) {
                const size_t q0 = h * size_t(c.hd);
                const size_t k0 = h / size_t(c.n_head / c.n_head_kv) * size_t(c.hd);
                Vec s(vis.size(), 0.0);
                double mx = -INFINITY, sum = 0.0;
                for (size_t j = 0; j < vis.size(); ++j) {
                    for (size_t i = 0; i < size_t(c.hd); ++i) s[j] += qt[q0 + i] * kr[j][k0 + i];
                    s[j] /= std::sqrt(double(c.hd));
                    if (vis[j]) mx = std::max(mx, s[j]);
                }
                for (size_t j = 0; j < vis.size(); ++j) sum += vis[j] ? std::exp(s[j] - mx) : 0.0;
                for (size_t j = 0; j < vis.size(); ++j) {
                    const double p = vis[j] ? std::exp(s[j] - mx) / sum : 0.0;
                    want_probs[(size_t(t) * size_t(c.n_head) + h) * vis.size() + j] = p;
                    want_sums[h * vis.size() + j] += p;
                }
            }
        }

        const int32_t probs_from = c.n_q / 2;
        for (bool simd : {true, false}) {
            KernelChoice kc(simd);
            CAPTURE(cpu::kernel_name());
            std::vector<float> out(q.size(), NAN);
            std::vector<float> probs(size_t((c.n_q - probs_from) * c.n_head * c.n_kv), NAN);
            std::vector<float> sums(size_t(c.n_head * c.n_kv), 0.5f);
            cpu::AttentionArgs a;
            a.q = q.data(), a.q_pos = q_pos.data(), a.n_q = c.n_q;
            a.k = k.data(), a.v = v.data(), a.kv_pos = kv_pos.data(), a.n_kv = c.n_kv;
            a.n_head = c.n_head, a.n_head_kv = c.n_head_kv, a.head_dim = c.hd;
            a.out = out.data(), a.probs = probs.data(), a.probs_from = probs_from;
            a.col_sums = sums.data();
            cpu::attention(pool, a);
            for (int32_t t = 0; t < c.n_q; ++t) {
                CAPTURE(t);
                check_close(out.data() + t * c.n_head * c.hd, want_out[size_t(t)], 1e-5);
            }
            const Vec observed(want_probs.begin() + probs_from * c.n_head * c.n_kv,
                               want_probs.end());
            check_close(probs.data(), observed, 1e-6);
            for (size_t i = 0; i < observed.size(); ++i)  // masked keys: exactly 0
                if (observed[i] == 0.0) CHECK(probs[i] == 0.0f);
            for (float& s : sums) s -= 0.5f;  // col_sums are added to
            check_close(sums.data(), want_sums, 1e-5);
        }
    }
}

// ---- KV storage -----------------------------------------------------------------------

TEST_CASE("CpuKvStorage: append, retain and truncate keep the right rows") {
    const int32_t kv_dim = 6, n_ctx = 40;
    pyr::CpuKvStorage s(2, n_ctx, kv_dim);
    CHECK(s.bytes_per_token() == 2 * kv_dim * sizeof(float));
    // token r of layer il holds keys 100*il + r + i/10, values the negatives
    auto row = [&](int il, int r, bool value) {
        std::vector<float> v(static_cast<size_t>(kv_dim));
        for (int i = 0; i < kv_dim; ++i) v[size_t(i)] = (value ? -1.0f : 1.0f) * (100.0f * il + r + i / 10.0f);
        return v;
    };
    auto append = [&](int il, int r) {
        s.append(il, row(il, r, false).data(), row(il, r, true).data(), 1);
    };
    auto expect = [&](int il, const std::vector<int>& rows) {
        REQUIRE(s.size(il) == int32_t(rows.size()));
        for (size_t j = 0; j < rows.size(); ++j) {
            CAPTURE(il);
            CAPTURE(j);
            const std::vector<float> k = row(il, rows[j], false), v = row(il, rows[j], true);
            CHECK(std::vector<float>(s.keys(il) + j * kv_dim, s.keys(il) + (j + 1) * kv_dim) == k);
            CHECK(std::vector<float>(s.values(il) + j * kv_dim, s.values(il) + (j + 1) * kv_dim) == v);
        }
    };
    for (int r = 0; r < 30; ++r) append(0, r);  // past the first reservation (16)
    for (int r = 0; r < 5; ++r) append(1, r);
    expect(0, [] { std::vector<int> v; for (int r = 0; r < 30; ++r) v.push_back(r); return v; }());
    s.retain(0, {0, 2, 3, 17, 29});
    expect(0, {0, 2, 3, 17, 29});
    expect(1, {0, 1, 2, 3, 4});
    s.retain(1, {1, 2, 3, 4});  // drop the first: every row moves
    expect(1, {1, 2, 3, 4});
    s.truncate(0, 3);
    expect(0, {0, 2, 3});
    append(0, 31);
    expect(0, {0, 2, 3, 31});
    s.retain(0, {});
    CHECK(s.size(0) == 0);
    // Appending past n_ctx is an internal error; bad retain indices too.
    std::vector<float> big(size_t((n_ctx + 1) * kv_dim));
    CHECK_THROWS_AS(s.append(0, big.data(), big.data(), n_ctx + 1), pyr::Error);
    s.append(0, big.data(), big.data(), n_ctx);
    CHECK(s.size(0) == n_ctx);
    CHECK_THROWS_AS(s.retain(1, {2, 1}), pyr::Error);
    CHECK_THROWS_AS(s.retain(1, {0, 9}), pyr::Error);
}

TEST_CASE("CpuKvStorage: random appends, retains and truncates against a list of rows") {
    // A retain moves the rows after its first dropped one, or those before its last dropped
    // one when fewer (leaving a gap in front that later growth reuses): either way the rows
    // must be the list's. Row r holds keys r + i / 10 and values -(r + i / 10).
    const int32_t kv_dim = 3, n_ctx = 300;
    auto budget = std::make_shared<pyr::KvBudget>(0);
    pyr::CpuKvStorage s(1, n_ctx, kv_dim, budget);
    std::vector<int32_t> model;  // the row ids the layer should hold, in order
    std::mt19937 gen(12345);
    int32_t next_id = 0;
    for (int op = 0; op < 2000; ++op) {
        const uint32_t what = gen() % 10;
        const int32_t n = int32_t(model.size());
        if (what < 4) {  // append 1..20 rows
            const int32_t k = std::min(int32_t(1 + gen() % 20), n_ctx - n);
            std::vector<float> keys, values;
            for (int32_t r = 0; r < k; ++r) {
                for (int i = 0; i < kv_dim; ++i) {
                    keys.push_back(float(next_id) + float(i) / 10.0f);
                    values.push_back(-(float(next_id) + float(i) / 10.0f));
                }
                model.push_back(next_id++);
            }
            s.append(0, keys.data(), values.data(), k);
        } else if (what < 9) {  // retain: drop one row near either end, or a random set
            std::vector<int32_t> keep;
            const uint32_t how = gen() % 3;
            const int32_t drop = n == 0 ? -1 : how == 0 ? int32_t(gen() % std::min(n, 6))
                                             : how == 1 ? n - 1 - int32_t(gen() % std::min(n, 6)) : -2;
            for (int32_t i = 0; i < n; ++i)
                if (drop == -2 ? gen() % 4 != 0 : i != drop) keep.push_back(i);
            std::vector<int32_t> kept;
            for (int32_t i : keep) kept.push_back(model[size_t(i)]);
            model = kept;
            s.retain(0, keep);
        } else {  // truncate
            const int32_t to = n == 0 ? 0 : int32_t(gen() % uint32_t(n + 1));
            model.resize(size_t(to));
            s.truncate(0, to);
        }
        REQUIRE(s.size(0) == int32_t(model.size()));
        for (size_t j = 0; j < model.size(); ++j)
            for (int i = 0; i < kv_dim; ++i) {
                const float want = float(model[j]) + float(i) / 10.0f;
                REQUIRE(s.keys(0)[j * kv_dim + size_t(i)] == want);
                REQUIRE(s.values(0)[j * kv_dim + size_t(i)] == -want);
            }
        // the room: the tokens at least, and never more than twice the usual spare beyond
        const uint64_t held = budget->used() / s.bytes_per_token();
        REQUIRE(held >= model.size());
        REQUIRE(held <= std::min<uint64_t>(n_ctx, model.size() + 2 * std::max<size_t>(16, model.size() / 8)));
    }
}

TEST_CASE("CpuKvStorage: room for what a layer holds and an eighth more, counted in the budget") {
    const int32_t kv_dim = 4, n_ctx = 3000;
    const uint64_t token = 2 * kv_dim * sizeof(float);  // bytes of a token in one layer
    auto budget = std::make_shared<pyr::KvBudget>(0);   // no limit: counts only
    auto held = [&] { return budget->used() / token; };  // tokens of room, all layers
    const std::vector<float> rows(size_t(n_ctx) * kv_dim, 1.0f);
    {
        pyr::CpuKvStorage s(2, n_ctx, kv_dim, budget);
        s.append(0, rows.data(), rows.data(), 100);  // a first fill: what it needs
        CHECK(held() == 100);
        s.append(0, rows.data(), rows.data(), 1);  // growth: 16 tokens more (an eighth is less)
        CHECK(held() == 117);
        s.append(0, rows.data(), rows.data(), 16);  // 117 fit
        CHECK(held() == 117);
        s.append(0, rows.data(), rows.data(), 883);  // 1000: an eighth more
        CHECK(held() == 1125);
        s.append(1, rows.data(), rows.data(), 10);
        CHECK(held() == 1135);
        // compressed to 500: more than twice the spare room unused, cut to 500 + 62
        std::vector<int32_t> keep(500);
        for (int32_t i = 0; i < 500; ++i) keep[size_t(i)] = 2 * i;
        s.retain(0, keep);
        CHECK(s.size(0) == 500);
        CHECK(held() == 562 + 10);
        keep.resize(480);
        for (int32_t i = 0; i < 480; ++i) keep[size_t(i)] = i;
        s.retain(0, keep);  // 82 unused: within the margin (twice 60)
        CHECK(held() == 562 + 10);
        s.append(0, rows.data(), rows.data(), n_ctx - 480);  // never past n_ctx
        CHECK(held() == uint64_t(n_ctx) + 10);
        s.truncate(1, 0);  // an emptied layer gives everything back
        CHECK(held() == uint64_t(n_ctx));
    }
    CHECK(budget->used() == 0);  // the storage gone, its room too

    // Near the limit: a layer's spare room goes back when another layer needs the memory.
    auto tight = std::make_shared<pyr::KvBudget>(2 * 40 * token);  // 40 tokens in each of 2 layers
    pyr::CpuKvStorage s(2, n_ctx, kv_dim, tight);
    s.append(0, rows.data(), rows.data(), 20);
    s.append(1, rows.data(), rows.data(), 20);
    s.append(0, rows.data(), rows.data(), 19);  // 39 + 16 spare: 55 + 20 <= 80
    CHECK(tight->used() == (55 + 20) * token);
    s.append(1, rows.data(), rows.data(), 19);  // 20 + 39 + 16 > 80, 55 + 39 too: layer 0 gives 16 back
    CHECK(tight->used() == (39 + 39) * token);
    CHECK_THROWS_AS(s.append(1, rows.data(), rows.data(), 3), pyr::Error);  // 39 + 42 > 80
    CHECK(s.size(1) == 39);
    CHECK(tight->used() == (39 + 39) * token);
}

TEST_CASE("KvCache over CpuKvStorage keeps positions and rows together") {
    pyr::KvCache cache(1, std::make_unique<pyr::CpuKvStorage>(1, 10, 2));
    auto& s = static_cast<pyr::CpuKvStorage&>(cache.storage());
    const std::vector<float> k{0, 0, 1, 1, 2, 2, 3, 3}, v{0, 0, -1, -1, -2, -2, -3, -3};
    const std::vector<int32_t> pos{4, 5, 6, 7};
    s.append(0, k.data(), v.data(), 4);
    cache.appended(0, pos.data(), 4);
    cache.retain(0, {1, 3});
    CHECK(cache.positions(0) == std::vector<int32_t>{5, 7});
    CHECK(std::vector<float>(s.keys(0), s.keys(0) + 4) == std::vector<float>{1, 1, 3, 3});
    CHECK(std::vector<float>(s.values(0), s.values(0) + 4) == std::vector<float>{-1, -1, -3, -3});
    cache.truncate({1});
    CHECK(s.size(0) == 1);
    CHECK(cache.bytes() == 2 * 2 * sizeof(float));
}

// A pool the system cannot start (here: too little address space left for the threads'
// stacks, in a child process) is a pyr::Error, which the C ABI returns as a status; before,
// the half-built pool's running threads made it std::terminate. Sanitizers reserve address
// space of their own, so their builds skip it.
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
constexpr bool kSanitized = true;
#else
constexpr bool kSanitized = false;
#endif
TEST_CASE("a thread pool the system cannot start fails with an error" * doctest::skip(kSanitized)) {
    const pid_t pid = fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
        std::signal(SIGABRT, SIG_DFL);  // a std::terminate ends the child (not doctest's handler)
        long pages = 0;
        FILE* f = std::fopen("/proc/self/statm", "r");
        if (!f || std::fscanf(f, "%ld", &pages) != 1) _exit(4);
        std::fclose(f);
        const rlim_t used = rlim_t(pages) * rlim_t(sysconf(_SC_PAGESIZE));
        const rlimit limit{used + (48u << 20), used + (48u << 20)};  // room for ~5 stacks of 8 MiB
        if (setrlimit(RLIMIT_AS, &limit) != 0) _exit(5);
        try {
            pyr::ThreadPool pool(64);
            _exit(1);
        } catch (const pyr::Error& e) {
            _exit(e.status() == PYR_ERR_OUT_OF_MEMORY &&
                          std::string(e.what()).find("n_threads") != std::string::npos
                      ? 0
                      : 2);
        } catch (...) {
            _exit(3);
        }
    }
    int status = 0;
    pid_t ended = 0;
    for (int ms = 0; ms < 60000 && ended == 0; ms += 10) {  // bounded: a hung child fails
        ended = waitpid(pid, &status, WNOHANG);
        if (ended == 0) std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    if (ended == 0) kill(pid, SIGKILL), waitpid(pid, &status, 0);
    REQUIRE(ended == pid);
    REQUIRE(WIFEXITED(status));  // not killed by std::terminate's abort
    CHECK(WEXITSTATUS(status) == 0);  // 1: the pool started; 2: another error; 3: not a pyr::Error
}
