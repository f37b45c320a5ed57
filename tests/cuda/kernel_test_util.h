// What the CUDA kernel tests (tests/cuda/test_kernels_*.cpp) share: device arrays, 16-bit
// values on the host, seeded random inputs, comparisons, and a paged KV cache laid out as
// kernels.h says with poison around it.
//
// The tests run each kernel against a slow, obvious host reference in double. Every test
// draws fresh random inputs (the seed is printed on failure; PYR_TEST_SEED replays one),
// poisons its outputs with NaN bytes first so that an element the kernel never wrote cannot
// pass, and feeds the reference the same 16-bit-rounded inputs as the device, so that only
// output rounding and accumulation order separate the two. On a machine without a CUDA
// device they skip (GPU_OR_SKIP); tools/cuda_sim runs them on the CPU.
#pragma once

#include <cuda_runtime.h>
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "common/dtype.h"
#include "cuda_sim_hook.h"
#include "kernels/kernels.h"

namespace kernel_test {

namespace K = pyr::kernels;
using K::Dt;

inline constexpr Dt kDts[] = {Dt::F16, Dt::BF16};

// ---- CUDA plumbing ----------------------------------------------------------------------

inline bool have_gpu() {
    int n = 0;
    const bool ok = cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
    cudaGetLastError();  // a failed query must not leak into the next check
    return ok;
}

#define GPU_OR_SKIP()                     \
    do {                                  \
        if (!have_gpu()) {                \
            MESSAGE("no CUDA device");    \
            return;                       \
        }                                 \
    } while (0)

#define CUDA_OK(call)                                                                  \
    do {                                                                               \
        const cudaError_t cuda_ok_err = (call);                                        \
        REQUIRE_MESSAGE(cuda_ok_err == cudaSuccess,                                    \
                        #call " -> " << cudaGetErrorString(cuda_ok_err));              \
    } while (0)

// A launch function's status, then the kernel's own (faults surface at the sync).
#define LAUNCH_OK(call)                         \
    do {                                        \
        CUDA_OK(call);                          \
        CUDA_OK(cudaDeviceSynchronize());       \
    } while (0)

// Device memory of n elements of T, freed on scope exit.
template <typename T>
class DeviceArray {
public:
    explicit DeviceArray(size_t n) : n_(n) {
        CUDA_OK(cudaMalloc(reinterpret_cast<void**>(&p_), std::max<size_t>(bytes(), 1)));
    }
    explicit DeviceArray(const std::vector<T>& host) : DeviceArray(host.size()) { upload(host); }
    DeviceArray(DeviceArray&& o) noexcept : p_(o.p_), n_(o.n_) { o.p_ = nullptr; }
    DeviceArray(const DeviceArray&) = delete;
    DeviceArray& operator=(const DeviceArray&) = delete;
    DeviceArray& operator=(DeviceArray&&) = delete;
    ~DeviceArray() { cudaFree(p_); }

    T* get() const { return p_; }
    size_t size() const { return n_; }
    size_t bytes() const { return n_ * sizeof(T); }

    void upload(const std::vector<T>& host) {
        REQUIRE(host.size() == n_);
        CUDA_OK(cudaMemcpy(p_, host.data(), bytes(), cudaMemcpyHostToDevice));
    }
    std::vector<T> download() const {
        std::vector<T> host(n_);
        CUDA_OK(cudaMemcpy(host.data(), p_, bytes(), cudaMemcpyDeviceToHost));
        return host;
    }
    // All bytes 0xFF: NaN as fp32, fp16 and bf16, -1 as int32.
    void poison() { CUDA_OK(cudaMemset(p_, 0xFF, bytes())); }
    void zero() { CUDA_OK(cudaMemset(p_, 0, bytes())); }

private:
    T* p_ = nullptr;
    size_t n_ = 0;
};

// ---- 16-bit values on the host ----------------------------------------------------------

// fp32 -> IEEE half bits, round to nearest even, with subnormals, overflow to inf and NaN.
inline uint16_t f32_to_f16_bits(float f) {
    uint32_t x;
    std::memcpy(&x, &f, 4);
    const uint32_t sign = (x >> 16) & 0x8000u;
    const uint32_t ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return uint16_t(sign | 0x7e00u);
    if (ax >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // >= 65520 rounds to inf
    if (ax >= 0x38800000u) {                                  // normal half (>= 2^-14)
        uint32_t h = ((ax >> 23) - 112) << 10 | ((ax & 0x7fffffu) >> 13);
        const uint32_t rem = ax & 0x1fffu;
        if (rem > 0x1000u || (rem == 0x1000u && (h & 1))) ++h;
        return uint16_t(sign | h);
    }
    if (ax <= 0x33000000u) return uint16_t(sign);  // <= 2^-25: ties to even zero
    // subnormal half: the value in units of 2^-24, rounded
    const uint32_t mant = (ax & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126 - (ax >> 23);
    uint32_t h = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1), halfway = 1u << (shift - 1);
    if (rem > halfway || (rem == halfway && (h & 1))) ++h;
    return uint16_t(sign | h);
}

// fp32 -> bf16 bits, round to nearest even, NaN kept NaN.
inline uint16_t f32_to_bf16_bits(float f) {
    uint32_t x;
    std::memcpy(&x, &f, 4);
    if ((x & 0x7fffffffu) > 0x7f800000u) return uint16_t((x >> 16) | 0x40u);
    x += 0x7fffu + ((x >> 16) & 1u);
    return uint16_t(x >> 16);
}

inline uint16_t to_bits(Dt dt, float f) { return dt == Dt::F16 ? f32_to_f16_bits(f) : f32_to_bf16_bits(f); }
inline float from_bits(Dt dt, uint16_t h) { return dt == Dt::F16 ? pyr::f16_to_f32(h) : pyr::bf16_to_f32(h); }
inline std::string dt_name(Dt dt) { return dt == Dt::F16 ? "F16" : "BF16"; }  // text in messages

// Relative-norm tolerance of a 16-bit output: a few of its rounding steps.
inline double tol16(Dt dt) { return dt == Dt::F16 ? 2e-3 : 1.5e-2; }

inline std::vector<double> widen(Dt dt, const std::vector<uint16_t>& bits) {
    std::vector<double> out(bits.size());
    for (size_t i = 0; i < bits.size(); ++i) out[i] = from_bits(dt, bits[i]);
    return out;
}
inline std::vector<double> widen(const std::vector<float>& v) { return {v.begin(), v.end()}; }

// ---- random inputs ----------------------------------------------------------------------

inline uint64_t pick_seed() {
    if (const char* s = std::getenv("PYR_TEST_SEED")) return std::strtoull(s, nullptr, 10);
    std::random_device rd;
    return (uint64_t(rd()) << 32) ^ rd();
}

struct Rng {
    uint64_t seed = pick_seed();
    std::mt19937_64 gen{seed};

    float uniform(float lo, float hi) { return std::uniform_real_distribution<float>(lo, hi)(gen); }
    int32_t index(int32_t n) { return std::uniform_int_distribution<int32_t>(0, n - 1)(gen); }
    std::vector<float> floats(size_t n, float lo, float hi) {
        std::vector<float> v(n);
        for (float& x : v) x = uniform(lo, hi);
        return v;
    }
    // 16-bit values (bits) drawn uniformly in [lo, hi) and rounded to dt.
    std::vector<uint16_t> bits16(Dt dt, size_t n, float lo, float hi) {
        std::vector<uint16_t> v(n);
        for (uint16_t& x : v) x = to_bits(dt, uniform(lo, hi));
        return v;
    }
};

// Declares `rng` and reports its seed with any failure of the enclosing scope.
#define SEEDED_RNG()                                                       \
    Rng rng;                                                               \
    INFO("random seed " << rng.seed << " (replay: PYR_TEST_SEED=" << rng.seed << ")")

// ---- comparisons ------------------------------------------------------------------------

// ||out - ref|| / ||ref|| below tol, and every output finite (they all start as NaN).
inline void check_close(const std::vector<double>& out, const std::vector<double>& ref, double tol) {
    REQUIRE(out.size() == ref.size());
    size_t non_finite = 0;
    double num = 0.0, den = 0.0;
    for (size_t i = 0; i < out.size(); ++i) {
        if (!std::isfinite(out[i])) {
            ++non_finite;
            continue;
        }
        num += (out[i] - ref[i]) * (out[i] - ref[i]);
        den += ref[i] * ref[i];
    }
    CHECK_MESSAGE(non_finite == 0, non_finite << " of " << out.size() << " outputs not finite");
    const double rel = std::sqrt(num) / std::max(std::sqrt(den), 1e-300);
    CHECK_MESSAGE(rel < tol, "relative error " << rel << " >= " << tol);
}

template <typename T>
inline size_t count_bit_mismatches(const std::vector<T>& a, const std::vector<T>& b) {
    REQUIRE(a.size() == b.size());
    size_t n = 0;
    for (size_t i = 0; i < a.size(); ++i) n += std::memcmp(&a[i], &b[i], sizeof(T)) != 0;
    return n;
}

// ---- paged KV caches ----------------------------------------------------------------------

// The bytes of a paged cache's allocations (DevicePagedCache), one vector per allocation.
using PageImage = std::vector<std::vector<uint8_t>>;

inline size_t count_bit_mismatches(const PageImage& a, const PageImage& b) {
    REQUIRE(a.size() == b.size());
    size_t n = 0;
    for (size_t i = 0; i < a.size(); ++i) n += count_bit_mismatches(a[i], b[i]);
    return n;
}

// A paged KV cache on the device (kernels.h: KvPages) of n_rows rows of keys and of values,
// row_bytes each, from slot `gap` on (random when not given: 0 or up to a page less one):
// its page table (the gap entry and exactly ceil((gap + n_rows) / kKvPageRows) pages, so
// that ASan sees a read past it) and its pages, each a separate cudaMalloc of lead + 2
// kKvPageRows row_bytes + kGuard bytes, the rows at `lead` as kernels.h lays them out (keys,
// then values; lead is 0 but for compact_rows' offsets). More pages are allocated than the
// table needs, every byte poisoned (0xFF: NaN), and the table takes a random permutation of
// them: a kernel that treats the cache as contiguous, pages as consecutive in memory, or
// ignores the gap, reads poison or another page's rows. The spare pages, the gap's slots,
// the lead and guard bytes and the rows past n_rows stay poison unless a kernel writes where
// it must not: compare download() with the image the test expects (poisoned() with the rows
// set that the kernel may write).
class DevicePagedCache {
public:
    static constexpr int32_t kPageRows = K::kKvPageRows;
    static constexpr size_t kGuard = 16;

    DevicePagedCache(Rng& rng, int32_t n_rows, size_t row_bytes, size_t lead = 0, int32_t gap = -1)
        : n_rows_(n_rows),
          gap_(gap >= 0 ? gap : rng.index(2) == 0 ? 0 : rng.index(kPageRows)),
          row_bytes_(row_bytes),
          lead_(lead),
          page_bytes_(lead + 2 * size_t(kPageRows) * row_bytes + kGuard),
          table_(1 + size_t((gap_ + n_rows + kPageRows - 1) / kPageRows)) {
        REQUIRE(n_rows >= 0);
        const size_t n_pages = table_.size() - 1, n_alloc = n_pages + 1 + size_t(rng.index(3));
        for (size_t a = 0; a < n_alloc; ++a) {
            allocs_.emplace_back(page_bytes_);
            allocs_.back().poison();
        }
        std::vector<size_t> perm(n_alloc);
        for (size_t a = 0; a < n_alloc; ++a) perm[a] = a;
        std::shuffle(perm.begin(), perm.end(), rng.gen);
        page_alloc_.assign(perm.begin(), perm.begin() + ptrdiff_t(n_pages));
        std::vector<void*> table{reinterpret_cast<void*>(uintptr_t(gap_))};
        for (size_t i = 0; i < n_pages; ++i) table.push_back(allocs_[page_alloc_[i]].get());
        table_.upload(table);
    }

    K::KvPages pages() const { return table_.get(); }
    void** table() { return table_.get(); }
    int32_t gap() const { return gap_; }
    // the table's gap entry as the device has it now
    int64_t device_gap() const { return int64_t(reinterpret_cast<uintptr_t>(table_.download()[0])); }
    int32_t n_rows() const { return n_rows_; }
    size_t row_bytes() const { return row_bytes_; }
    // bytes into each page of row 0 of the keys or the values (CompactJob::offset)
    size_t offset(bool value) const { return lead_ + (value ? size_t(kPageRows) * row_bytes_ : 0); }

    PageImage poisoned() const {
        return PageImage(allocs_.size(), std::vector<uint8_t>(page_bytes_, 0xFF));
    }
    PageImage download() const {
        PageImage im;
        for (const DeviceArray<uint8_t>& a : allocs_) im.push_back(a.download());
        return im;
    }
    void upload(const PageImage& im) {
        REQUIRE(im.size() == allocs_.size());
        for (size_t a = 0; a < allocs_.size(); ++a) allocs_[a].upload(im[a]);
    }

    // Key (or value) slot s of an image of the cache: row s - gap.
    uint8_t* slot(PageImage& im, bool value, int32_t s) const {
        if (s < 0 || s >= gap_ + n_rows_) FAIL("slot " << s << " of a cache of " << gap_ << " + " << n_rows_);
        return im[page_alloc_[size_t(s / kPageRows)]].data() + offset(value) +
               size_t(s % kPageRows) * row_bytes_;
    }
    // Key (or value) row r of an image of the cache.
    uint8_t* row(PageImage& im, bool value, int32_t r) const {
        if (r < 0 || r >= n_rows_) FAIL("row " << r << " of a cache of " << n_rows_);
        return slot(im, value, gap_ + r);
    }
    const uint8_t* row(const PageImage& im, bool value, int32_t r) const {
        return row(const_cast<PageImage&>(im), value, r);
    }
    // Rows [r0, r0 + n) of the keys (values) of an image, as contiguous elements of T.
    template <typename T>
    std::vector<T> rows(const PageImage& im, bool value, int32_t r0, int32_t n) const {
        REQUIRE(row_bytes_ % sizeof(T) == 0);
        std::vector<T> out(size_t(n) * row_bytes_ / sizeof(T));
        for (int32_t i = 0; i < n; ++i)
            std::memcpy(reinterpret_cast<uint8_t*>(out.data()) + size_t(i) * row_bytes_,
                        row(im, value, r0 + i), row_bytes_);
        return out;
    }
    // Sets rows [r0, ...) of the keys (values) of an image from contiguous elements of T.
    template <typename T>
    void set_rows(PageImage& im, bool value, int32_t r0, const std::vector<T>& src) const {
        const size_t bytes = src.size() * sizeof(T);
        REQUIRE(bytes % row_bytes_ == 0);
        for (size_t i = 0; i < bytes / row_bytes_; ++i)
            std::memcpy(row(im, value, r0 + int32_t(i)),
                        reinterpret_cast<const uint8_t*>(src.data()) + i * row_bytes_, row_bytes_);
    }

private:
    int32_t n_rows_, gap_;
    size_t row_bytes_, lead_, page_bytes_;
    std::vector<DeviceArray<uint8_t>> allocs_;  // in allocation order
    std::vector<size_t> page_alloc_;            // page i of the table is allocs_[page_alloc_[i]]
    DeviceArray<void*> table_;
};

}  // namespace kernel_test
