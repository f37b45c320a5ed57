// Tests of kernels/gemv.cu: gemv and gemv_swiglu (kernel_test_util.h says how they test).
#include <cstdlib>
#include <limits>
#include <string>

#include "cuda/kernel_test_util.h"

using namespace kernel_test;

TEST_CASE("gemv: y = W a + beta y for 1..8 tokens") {
    GPU_OR_SKIP();
    SEEDED_RNG();
    const int32_t rows = 300, ld = rows + 13;  // rows not a multiple of the block's 8 warps
    // cols: the 4-load unrolled loop plus a tail, 16-byte loads only, element by element
    for (Dt dt : kDts)
        for (int32_t cols : {2056, 512, 77}) {
            const std::vector<uint16_t> W = rng.bits16(dt, size_t(rows) * cols, -1.0f, 1.0f);
            const std::vector<uint16_t> a = rng.bits16(dt, size_t(K::kGemvMaxTokens) * cols, -1.0f, 1.0f);
            DeviceArray<uint16_t> d_W(W), d_a(a);
            for (int32_t n = 1; n <= K::kGemvMaxTokens; ++n)
                for (float beta : {0.0f, 1.0f}) {
                    INFO("dt " << dt_name(dt) << ", cols " << cols << ", n " << n << ", beta " << beta);
                    // n + 1 rows of ld: the padding columns and the extra row must survive
                    std::vector<float> y = rng.floats(size_t(n + 1) * ld, -2.0f, 2.0f);
                    if (beta == 0.0f)  // beta = 0 must not read y (0 * NaN would show)
                        for (int32_t t = 0; t < n; ++t)
                            std::fill_n(&y[size_t(t) * ld], rows, std::numeric_limits<float>::quiet_NaN());
                    DeviceArray<float> d_y(y);
                    LAUNCH_OK(K::gemv(dt, d_W.get(), rows, cols, d_a.get(), n, d_y.get(), ld, beta, nullptr));
                    const std::vector<float> out = d_y.download();
                    std::vector<double> got, ref;
                    std::vector<float> untouched_got, untouched_ref;
                    for (int32_t t = 0; t <= n; ++t)
                        for (int32_t r = 0; r < ld; ++r) {
                            const size_t i = size_t(t) * ld + r;
                            if (t == n || r >= rows) {
                                untouched_got.push_back(out[i]);
                                untouched_ref.push_back(y[i]);
                                continue;
                            }
                            double s = beta * double(y[i]);
                            if (beta == 0.0f) s = 0.0;
                            for (int32_t c = 0; c < cols; ++c)
                                s += double(from_bits(dt, W[size_t(r) * cols + c])) *
                                     from_bits(dt, a[size_t(t) * cols + c]);
                            got.push_back(out[i]);
                            ref.push_back(s);
                        }
                    check_close(got, ref, 1e-5);
                    CHECK(count_bit_mismatches(untouched_got, untouched_ref) == 0);
                }
        }
    {  // more tokens than kGemvMaxTokens, misaligned rows: refused
        DeviceArray<uint16_t> d_W(64 * 64), d_a(64 * 9);
        DeviceArray<float> d_y(64 * 9);
        CHECK(K::gemv(Dt::F16, d_W.get(), 64, 64, d_a.get(), K::kGemvMaxTokens + 1, d_y.get(),
                      64, 0.0f, nullptr) == cudaErrorInvalidValue);
        // rows read 16 bytes at a time (cols a multiple of 8) must start 16-byte aligned
        CHECK(K::gemv(Dt::F16, d_W.get() + 1, 8, 64, d_a.get(), 1, d_y.get(), 64, 0.0f, nullptr) ==
              cudaErrorMisalignedAddress);
        CHECK(K::gemv(Dt::F16, d_W.get(), 8, 64, d_a.get() + 4, 1, d_y.get(), 64, 0.0f, nullptr) ==
              cudaErrorMisalignedAddress);
    }
}

TEST_CASE("early launches: on Hopper, gemv starts while the kernel ahead of it ends") {
    GPU_OR_SKIP();
    int dev = 0, major = 0;
    CUDA_OK(cudaGetDevice(&dev));
    CUDA_OK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
    const char* pdl = std::getenv("PYRAMID_PDL");
    if (on_cuda_sim() || major < 9 || (pdl && std::string(pdl) == "0")) {
        MESSAGE("SKIPPED: needs a GPU of compute capability 9.0+ and PYRAMID_PDL unset (the "
                "sim's launches run one after another)");
        for (Dt dt : kDts) CHECK_FALSE(K::early_launches(dt));
        return;
    }
    // a build whose binary or PTX is not sm_90's has no wait in the kernels: refused there
    for (Dt dt : kDts) CHECK_MESSAGE(K::early_launches(dt), dt_name(dt));
}

TEST_CASE("gemv_swiglu: silu(gate) * up in one pass, the bits of gemv + silu_mul") {
    GPU_OR_SKIP();
    SEEDED_RNG();
    // n_ff odd and not a multiple of the block's 8 warps; cols: the 4-load unrolled loop plus
    // a tail, 16-byte loads only, element by element
    for (Dt dt : kDts)
        for (int32_t n_ff : {37, 5})
            for (int32_t cols : {2056, 512, 77}) {
                const std::vector<uint16_t> W = rng.bits16(dt, size_t(2 * n_ff) * cols, -1.0f, 1.0f);
                const std::vector<uint16_t> a = rng.bits16(dt, size_t(K::kGemvMaxTokens) * cols, -1.0f, 1.0f);
                DeviceArray<uint16_t> d_W(W), d_a(a);
                for (int32_t n = 1; n <= K::kGemvMaxTokens; ++n) {
                    INFO("dt " << dt_name(dt) << ", n_ff " << n_ff << ", cols " << cols << ", n " << n);
                    // n + 1 rows: the extra row must stay poisoned
                    DeviceArray<uint16_t> d_h(size_t(n + 1) * n_ff), d_h2(size_t(n) * n_ff);
                    DeviceArray<float> d_gu(size_t(n) * 2 * n_ff);
                    d_h.poison();
                    d_h2.poison();
                    d_gu.poison();
                    LAUNCH_OK(K::gemv_swiglu(dt, d_W.get(), n_ff, cols, d_a.get(), n, d_h.get(), nullptr));
                    const std::vector<uint16_t> h = d_h.download();
                    std::vector<double> got, ref;
                    for (int32_t t = 0; t < n; ++t)
                        for (int32_t i = 0; i < n_ff; ++i) {
                            double g = 0.0, u = 0.0;
                            for (int32_t c = 0; c < cols; ++c) {
                                const double x = from_bits(dt, a[size_t(t) * cols + c]);
                                g += double(from_bits(dt, W[size_t(i) * cols + c])) * x;
                                u += double(from_bits(dt, W[size_t(n_ff + i) * cols + c])) * x;
                            }
                            got.push_back(from_bits(dt, h[size_t(t) * n_ff + i]));
                            ref.push_back(g / (1.0 + std::exp(-g)) * u);
                        }
                    check_close(got, ref, tol16(dt));
                    const std::vector<uint16_t> extra(h.begin() + size_t(n) * n_ff, h.end());
                    CHECK(count_bit_mismatches(extra, std::vector<uint16_t>(size_t(n_ff), 0xFFFF)) == 0);
                    // the unfused path on the same inputs: the same bits
                    LAUNCH_OK(K::gemv(dt, d_W.get(), 2 * n_ff, cols, d_a.get(), n, d_gu.get(), 2 * n_ff,
                                      0.0f, nullptr));
                    LAUNCH_OK(K::silu_mul(dt, d_gu.get(), n, n_ff, d_h2.get(), nullptr));
                    const std::vector<uint16_t> fused(h.begin(), h.begin() + size_t(n) * n_ff);
                    CHECK(count_bit_mismatches(fused, d_h2.download()) == 0);
                }
            }
    // Bit equality once more on many rows: a different fp32 order of the sums (another lane
    // partition, say) changes the 16-bit results of only a few elements in a thousand.
    for (Dt dt : kDts) {
        const int32_t n_ff = 1031, cols = 2056, n = K::kGemvMaxTokens;
        INFO("dt " << dt_name(dt) << ", n_ff " << n_ff << ", cols " << cols << ", n " << n);
        DeviceArray<uint16_t> d_W(rng.bits16(dt, size_t(2 * n_ff) * cols, -1.0f, 1.0f));
        DeviceArray<uint16_t> d_a(rng.bits16(dt, size_t(n) * cols, -1.0f, 1.0f));
        DeviceArray<uint16_t> d_h(size_t(n) * n_ff), d_h2(size_t(n) * n_ff);
        DeviceArray<float> d_gu(size_t(n) * 2 * n_ff);
        d_h.poison();
        d_h2.poison();
        LAUNCH_OK(K::gemv_swiglu(dt, d_W.get(), n_ff, cols, d_a.get(), n, d_h.get(), nullptr));
        LAUNCH_OK(K::gemv(dt, d_W.get(), 2 * n_ff, cols, d_a.get(), n, d_gu.get(), 2 * n_ff, 0.0f,
                          nullptr));
        LAUNCH_OK(K::silu_mul(dt, d_gu.get(), n, n_ff, d_h2.get(), nullptr));
        CHECK(count_bit_mismatches(d_h.download(), d_h2.download()) == 0);
    }
    {  // more tokens than kGemvMaxTokens, negative cols, misaligned rows: refused
        DeviceArray<uint16_t> d_W(2 * 64 * 64), d_a(64 * 9), d_h(64 * 9);
        CHECK(K::gemv_swiglu(Dt::F16, d_W.get(), 64, 64, d_a.get(), K::kGemvMaxTokens + 1, d_h.get(),
                             nullptr) == cudaErrorInvalidValue);
        CHECK(K::gemv_swiglu(Dt::BF16, d_W.get(), 64, -8, d_a.get(), 1, d_h.get(), nullptr) ==
              cudaErrorInvalidValue);
        CHECK(K::gemv_swiglu(Dt::F16, d_W.get() + 2, 8, 64, d_a.get(), 1, d_h.get(), nullptr) ==
              cudaErrorMisalignedAddress);
    }
}
