// Tests of kernels/rope.cu: rope_store (kernel_test_util.h says how they test).
#include "cuda/kernel_test_util.h"

using namespace kernel_test;

namespace {

// One rope_store launch on random inputs against the double reference: q rotated in place,
// k and v of the projection untouched, sequence s's rotated k and v in its cache rows
// [slot0[s], slot0[s] + tokens[s]) and nothing else of the caches written (each a paged cache
// of slot0[s] + tokens[s] + 3 rows: DevicePagedCache). With kv_len the first slots travel
// only on the device (kv_len[s] = slot0[s] + tokens[s]) and batch.slot0 holds garbage.
void check_rope_store(Rng& rng, Dt dt, int32_t n_head, int32_t n_head_kv, int32_t hd,
                      const std::vector<int32_t>& tokens, const std::vector<int32_t>& slot0,
                      bool kv_len) {
    INFO("dt " << dt_name(dt) << ", heads " << n_head << "/" << n_head_kv << ", head_dim " << hd
               << ", " << tokens.size() << " sequences" << std::string(kv_len ? ", kv_len" : ""));
    const int32_t half = hd / 2, q_dim = n_head * hd, kv_dim = n_head_kv * hd;
    const int32_t width = q_dim + 2 * kv_dim;
    const int32_t n_seq = int32_t(tokens.size());
    K::RopeStoreBatch batch;
    batch.n_seq = n_seq;
    for (int32_t s = 0; s < n_seq; ++s) batch.row0[s + 1] = batch.row0[s] + tokens[s];
    const int32_t N = batch.row0[n_seq];
    const std::vector<float> qkv = rng.floats(size_t(N) * width, -2.0f, 2.0f);
    std::vector<float> cos(size_t(N) * half), sin(size_t(N) * half);
    for (size_t i = 0; i < cos.size(); ++i) {
        const float angle = rng.uniform(-3.2f, 3.2f);
        cos[i] = std::cos(angle);
        sin[i] = std::sin(angle);
    }
    DeviceArray<float> d_qkv(qkv), d_cos(cos), d_sin(sin);
    std::vector<DevicePagedCache> caches;
    caches.reserve(size_t(n_seq));
    std::vector<int32_t> lens(n_seq);
    for (int32_t s = 0; s < n_seq; ++s) {
        // rows after the new ones too; all poison
        caches.emplace_back(rng, slot0[s] + tokens[s] + 3, size_t(kv_dim) * 2);
        batch.pages[s] = caches.back().pages();
        batch.slot0[s] = kv_len ? -1000003 * (s + 1) : slot0[s];
        lens[s] = slot0[s] + tokens[s];
    }
    DeviceArray<int32_t> d_lens(lens);
    if (kv_len) batch.kv_len = d_lens.get();
    LAUNCH_OK(K::rope_store(dt, d_qkv.get(), batch, n_head, n_head_kv, hd, d_cos.get(),
                            d_sin.get(), nullptr));

    // rotate-half of head x (hd values at x) of row t, in double
    auto rotated = [&](const float* x, int32_t t, int32_t i) {
        const double c = cos[size_t(t) * half + i % half], s = sin[size_t(t) * half + i % half];
        return i < half ? x[i] * c - x[i + half] * s : x[i] * c + x[i - half] * s;
    };
    const std::vector<float> out = d_qkv.download();
    std::vector<double> q_got, q_ref;
    std::vector<float> kv_got, kv_ref;
    for (int32_t t = 0; t < N; ++t) {
        const float* row = &qkv[size_t(t) * width];
        for (int32_t c = 0; c < width; ++c) {
            const float o = out[size_t(t) * width + c];
            if (c < q_dim) {
                q_got.push_back(o);
                q_ref.push_back(rotated(row + c / hd * hd, t, c % hd));
            } else {  // k and v of the projection are inputs only
                kv_got.push_back(o);
                kv_ref.push_back(row[c]);
            }
        }
    }
    check_close(q_got, q_ref, 1e-5);
    CHECK(count_bit_mismatches(kv_got, kv_ref) == 0);

    for (int32_t s = 0; s < n_seq; ++s) {
        INFO("sequence " << s << " (slot0 " << slot0[s] << ", " << tokens[s] << " tokens)");
        const DevicePagedCache& c = caches[s];
        const PageImage got = c.download();
        // the written rows: k within tolerance (then taken as they are), v bit-exact (one
        // rounding); every other byte of the pages (rows, spare pages, guards) still poison
        PageImage want = c.poisoned();
        std::vector<double> k_got, k_ref;
        for (int32_t slot = slot0[s]; slot < slot0[s] + tokens[s]; ++slot) {
            const int32_t t = batch.row0[s] + slot - slot0[s];  // its token row
            const float* k_row = &qkv[size_t(t) * width + q_dim];
            const std::vector<uint16_t> k_bits = c.rows<uint16_t>(got, false, slot, 1);
            std::vector<uint16_t> v_bits(static_cast<size_t>(kv_dim));
            for (int32_t i = 0; i < kv_dim; ++i) {
                k_got.push_back(from_bits(dt, k_bits[size_t(i)]));
                k_ref.push_back(rotated(k_row + i / hd * hd, t, i % hd));
                v_bits[size_t(i)] = to_bits(dt, k_row[kv_dim + i]);
            }
            c.set_rows(want, false, slot, k_bits);
            c.set_rows(want, true, slot, v_bits);
        }
        if (tokens[s] > 0) check_close(k_got, k_ref, tol16(dt));
        CHECK(count_bit_mismatches(got, want) == 0);
    }
}

}  // namespace

TEST_CASE("rope_store: q rotated in place, rotated k and v appended to each cache") {
    GPU_OR_SKIP();
    SEEDED_RNG();
    for (Dt dt : kDts) {
        // ragged batch, one sequence with no new tokens; caches written from nonzero slots:
        // a page's last row (63), appends that run into the next page (60 + 10, 50 + 17)
        for (int32_t hd : {64, 80})
            check_rope_store(rng, dt, 4, 2, hd, {1, 10, 0, 17}, {63, 60, 4, 50}, false);
        // decode at LLaMA-2-7B shapes: one row of 32 + 32 heads of 128, spread over blocks;
        // the first row of the second page
        check_rope_store(rng, dt, 32, 32, 128, {1}, {64}, false);
        // GQA decode batch (8 kv heads), and the largest head_dim
        check_rope_store(rng, dt, 32, 8, 128, {1, 1, 1}, {0, 63, 300}, false);
        check_rope_store(rng, dt, 3, 1, 256, {2, 1}, {63, 0}, false);
        // odd half (36 -> 18) and the smallest head (half 1): pairs straddle heads and blocks
        check_rope_store(rng, dt, 5, 1, 36, {3, 4}, {0, 62}, false);
        check_rope_store(rng, dt, 3, 3, 2, {2}, {1}, false);
        // a prefill over more than a page, and an append over the end of a second page
        check_rope_store(rng, dt, 2, 1, 8, {70, 3}, {0, 126}, false);
    }
}

TEST_CASE("rope_store: every row finds its sequence among kMaxBatch, empty ones included") {
    GPU_OR_SKIP();
    SEEDED_RNG();
    std::vector<int32_t> tokens(K::kMaxBatch), slot0(K::kMaxBatch);
    for (int32_t s = 0; s < K::kMaxBatch; ++s) {
        tokens[s] = rng.index(4);  // 0..3, so some sequences are empty
        slot0[s] = rng.index(140);  // in the first three pages
    }
    tokens[0] = tokens[K::kMaxBatch - 1] = 0;  // empty at both ends
    tokens[1] = 2;
    for (Dt dt : kDts) check_rope_store(rng, dt, 4, 2, 8, tokens, slot0, false);
}

TEST_CASE("rope_store: kv_len gives the first slots on the device, slot0 ignored") {
    GPU_OR_SKIP();
    SEEDED_RNG();
    for (Dt dt : kDts) {
        check_rope_store(rng, dt, 32, 32, 128, {1}, {127}, true);
        check_rope_store(rng, dt, 4, 2, 64, {1, 10, 0, 17}, {63, 60, 4, 50}, true);
        check_rope_store(rng, dt, 32, 8, 128, {1, 1, 1, 1}, {0, 64, 300, 127}, true);
    }
}

TEST_CASE("rope_store: bad arguments are refused, an empty batch is a no-op") {
    GPU_OR_SKIP();
    float* qkv = nullptr;
    K::RopeStoreBatch batch;
    batch.n_seq = 1;
    batch.row0[1] = 1;
    CHECK(K::rope_store(Dt::F16, qkv, batch, 4, 2, 7, nullptr, nullptr, nullptr) ==
          cudaErrorInvalidValue);  // odd head_dim
    CHECK(K::rope_store(Dt::F16, qkv, batch, 0, 2, 8, nullptr, nullptr, nullptr) ==
          cudaErrorInvalidValue);
    CHECK(K::rope_store(Dt::F16, qkv, batch, 4, 0, 8, nullptr, nullptr, nullptr) ==
          cudaErrorInvalidValue);
    batch.n_seq = 0;
    CHECK(K::rope_store(Dt::F16, qkv, batch, 4, 2, 8, nullptr, nullptr, nullptr) ==
          cudaErrorInvalidValue);
    batch.n_seq = K::kMaxBatch + 1;
    CHECK(K::rope_store(Dt::F16, qkv, batch, 4, 2, 8, nullptr, nullptr, nullptr) ==
          cudaErrorInvalidValue);
    batch.n_seq = 2;
    batch.row0[1] = 3;
    batch.row0[2] = 2;  // decreasing
    CHECK(K::rope_store(Dt::F16, qkv, batch, 4, 2, 8, nullptr, nullptr, nullptr) ==
          cudaErrorInvalidValue);
    batch.row0[1] = batch.row0[2] = 0;  // no rows: nothing to do
    CHECK(K::rope_store(Dt::F16, qkv, batch, 4, 2, 8, nullptr, nullptr, nullptr) == cudaSuccess);
}
