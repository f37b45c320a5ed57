// The CUDA kernels (kernels/kernels.h) against slow, obvious host references in double.
// Every test draws fresh random inputs (the seed is printed on failure; PYR_TEST_SEED
// replays one), poisons its outputs with NaN bytes first so that an element the kernel
// never wrote cannot pass, and feeds the reference the same 16-bit-rounded inputs as the
// device, so that only output rounding and accumulation order separate the two.
#include <cuda_runtime.h>
#include <doctest/doctest.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "common/dtype.h"
#include "engine/sampler.h"
#include "engine/sampling_rules.h"
#include "kernels/kernels.h"

namespace {

namespace K = pyr::kernels;
using K::Dt;

const Dt kDts[] = {Dt::F16, Dt::BF16};

// ---- CUDA plumbing ----------------------------------------------------------------------

bool have_gpu() {
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
uint16_t f32_to_f16_bits(float f) {
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
uint16_t f32_to_bf16_bits(float f) {
    uint32_t x;
    std::memcpy(&x, &f, 4);
    if ((x & 0x7fffffffu) > 0x7f800000u) return uint16_t((x >> 16) | 0x40u);
    x += 0x7fffu + ((x >> 16) & 1u);
    return uint16_t(x >> 16);
}

uint16_t to_bits(Dt dt, float f) { return dt == Dt::F16 ? f32_to_f16_bits(f) : f32_to_bf16_bits(f); }
float from_bits(Dt dt, uint16_t h) { return dt == Dt::F16 ? pyr::f16_to_f32(h) : pyr::bf16_to_f32(h); }
std::string dt_name(Dt dt) { return dt == Dt::F16 ? "F16" : "BF16"; }  // text in messages

// Relative-norm tolerance of a 16-bit output: a few of its rounding steps.
double tol16(Dt dt) { return dt == Dt::F16 ? 2e-3 : 1.5e-2; }

std::vector<double> widen(Dt dt, const std::vector<uint16_t>& bits) {
    std::vector<double> out(bits.size());
    for (size_t i = 0; i < bits.size(); ++i) out[i] = from_bits(dt, bits[i]);
    return out;
}
std::vector<double> widen(const std::vector<float>& v) { return {v.begin(), v.end()}; }

// ---- random inputs ----------------------------------------------------------------------

uint64_t pick_seed() {
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
void check_close(const std::vector<double>& out, const std::vector<double>& ref, double tol) {
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
size_t count_bit_mismatches(const std::vector<T>& a, const std::vector<T>& b) {
    REQUIRE(a.size() == b.size());
    size_t n = 0;
    for (size_t i = 0; i < a.size(); ++i) n += std::memcmp(&a[i], &b[i], sizeof(T)) != 0;
    return n;
}

// ---- paged KV caches ----------------------------------------------------------------------

// The bytes of a paged cache's allocations (DevicePagedCache), one vector per allocation.
using PageImage = std::vector<std::vector<uint8_t>>;

size_t count_bit_mismatches(const PageImage& a, const PageImage& b) {
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

}  // namespace

// ---- element-wise and row-wise kernels --------------------------------------------------

TEST_CASE("embed: rows of the 16-bit table, exactly, as fp32") {
    GPU_OR_SKIP();
    SEEDED_RNG();
    const int32_t n_vocab = 50, n_embd = 4100;  // not a multiple of the block
    std::vector<int32_t> tokens = {0, n_vocab - 1, 7, 7};  // both ends and a repeat
    for (int i = 0; i < 33; ++i) tokens.push_back(rng.index(n_vocab));
    const int32_t n = int32_t(tokens.size());
    for (Dt dt : kDts) {
        INFO("dt " << dt_name(dt));
        const std::vector<uint16_t> table = rng.bits16(dt, size_t(n_vocab) * n_embd, -2.0f, 2.0f);
        DeviceArray<uint16_t> d_table(table);
        DeviceArray<int32_t> d_tokens(tokens);
        DeviceArray<float> d_x(size_t(n) * n_embd);
        d_x.poison();
        LAUNCH_OK(K::embed(dt, d_table.get(), d_tokens.get(), n, n_embd, d_x.get(), nullptr));
        std::vector<float> ref(size_t(n) * n_embd);
        for (int32_t t = 0; t < n; ++t)
            for (int32_t i = 0; i < n_embd; ++i)
                ref[size_t(t) * n_embd + i] = from_bits(dt, table[size_t(tokens[t]) * n_embd + i]);
        CHECK(count_bit_mismatches(d_x.download(), ref) == 0);
    }
}

namespace {

// rmsnorm of n random rows of dim against the double reference, x, w and out passed at
// off_x, off_w and off_out elements into their buffers (an offset that breaks a vector
// access's alignment must take the scalar path: the sim's alignment sanitizer stops on a
// misaligned vector access).
void check_rmsnorm(Rng& rng, Dt dt, int32_t n, int32_t dim, int32_t off_x = 0,
                   int32_t off_w = 0, int32_t off_out = 0) {
    INFO("dt " << dt_name(dt) << ", " << n << " rows of " << dim << ", offsets " << off_x
               << "/" << off_w << "/" << off_out);
    const float eps = 1e-5f;
    std::vector<float> x = rng.floats(size_t(off_x) + size_t(n) * dim, -3.0f, 3.0f);
    // rows of very different magnitudes: the norm must be per row
    for (int32_t t = 0; t < n; ++t)
        for (int32_t i = 0; i < dim; ++i)
            x[off_x + size_t(t) * dim + i] *= std::pow(10.0f, float(t % 5 - 2));
    const std::vector<uint16_t> w = rng.bits16(dt, size_t(off_w) + dim, 0.5f, 1.5f);
    DeviceArray<float> d_x(x);
    DeviceArray<uint16_t> d_w(w), d_out(size_t(off_out) + size_t(n) * dim);
    d_out.poison();
    LAUNCH_OK(K::rmsnorm(dt, d_x.get() + off_x, n, dim, d_w.get() + off_w, eps,
                         d_out.get() + off_out, nullptr));
    std::vector<double> ref(size_t(n) * dim);
    for (int32_t t = 0; t < n; ++t) {
        const float* xr = &x[off_x + size_t(t) * dim];
        double ss = 0.0;
        for (int32_t i = 0; i < dim; ++i) ss += double(xr[i]) * xr[i];
        const double scale = 1.0 / std::sqrt(ss / dim + eps);
        for (int32_t i = 0; i < dim; ++i)
            ref[size_t(t) * dim + i] = xr[i] * scale * from_bits(dt, w[off_w + i]);
    }
    const std::vector<uint16_t> out = d_out.download();
    CHECK(std::all_of(out.begin(), out.begin() + off_out, [](uint16_t b) { return b == 0xFFFF; }));
    check_close(widen(dt, {out.begin() + off_out, out.end()}), ref, tol16(dt));
}

}  // namespace

TEST_CASE("rmsnorm: x / rms(x) * w, rounded to the 16-bit type") {
    GPU_OR_SKIP();
    SEEDED_RNG();
    for (Dt dt : kDts) {
        // float4 rows (dim % 4 == 0) of every register budget, rows wider than it (past 8 x
        // 256 float4 chunks, re-read: 9000 once, 12000 up to 4 times a thread), and scalar
        // rows (77, 4098, 1, 20001: re-read past 8 x 1024 elements, up to 4 times a thread)
        for (int32_t dim : {64, 4096, 77, 5000, 5120, 384, 36, 100, 1, 4098, 9000, 12000, 20001})
            check_rmsnorm(rng, dt, 5, dim);
        // decode: one row at 7B and 13B widths
        check_rmsnorm(rng, dt, 1, 4096);
        check_rmsnorm(rng, dt, 1, 5120);
        // prefill: many rows
        check_rmsnorm(rng, dt, 1500, 384);
        // each pointer misaligned for its vector access in turn (w and out by 2 and by 4
        // bytes: 4-byte aligned, not 8), and all off by a whole float4 (still vectors)
        check_rmsnorm(rng, dt, 3, 4096, 1, 0, 0);
        check_rmsnorm(rng, dt, 3, 4096, 2, 0, 0);
        check_rmsnorm(rng, dt, 3, 4096, 0, 1, 0);
        check_rmsnorm(rng, dt, 3, 4096, 0, 0, 1);
        check_rmsnorm(rng, dt, 3, 4096, 0, 2, 0);
        check_rmsnorm(rng, dt, 3, 4096, 0, 0, 2);
        check_rmsnorm(rng, dt, 3, 4096, 4, 4, 4);
    }
}

TEST_CASE("rmsnorm: no rows is a no-op, an empty row is refused") {
    GPU_OR_SKIP();
    DeviceArray<float> d_x(64);
    DeviceArray<uint16_t> d_w(64), d_out(64);
    d_out.poison();
    CHECK(K::rmsnorm(Dt::F16, d_x.get(), 0, 64, d_w.get(), 1e-5f, d_out.get(), nullptr) ==
          cudaSuccess);
    CUDA_OK(cudaDeviceSynchronize());
    const std::vector<uint16_t> out = d_out.download();
    CHECK(out == std::vector<uint16_t>(out.size(), 0xFFFF));
    CHECK(K::rmsnorm(Dt::F16, d_x.get(), 1, 0, d_w.get(), 1e-5f, d_out.get(), nullptr) ==
          cudaErrorInvalidValue);
}

TEST_CASE("add_bias: y[t, :ncols] += b in rows ld apart, nothing else touched") {
    GPU_OR_SKIP();
    SEEDED_RNG();
    const int32_t n = 6, ncols = 300, ld = 320;
    for (Dt dt : kDts) {
        INFO("dt " << dt_name(dt));
        // one row more than n: the row after the last must stay as it was
        const std::vector<float> y = rng.floats(size_t(n + 1) * ld, -4.0f, 4.0f);
        const std::vector<uint16_t> b = rng.bits16(dt, size_t(ncols), -1.0f, 1.0f);
        DeviceArray<float> d_y(y);
        DeviceArray<uint16_t> d_b(b);
        LAUNCH_OK(K::add_bias(dt, d_y.get(), n, ncols, ld, d_b.get(), nullptr));
        std::vector<float> ref = y;
        for (int32_t t = 0; t < n; ++t)
            for (int32_t i = 0; i < ncols; ++i) ref[size_t(t) * ld + i] += from_bits(dt, b[i]);
        // one fp32 addition per element: the device's IEEE result is the host's
        CHECK(count_bit_mismatches(d_y.download(), ref) == 0);
    }
}

TEST_CASE("silu_mul: silu(gate) * up of the fused gate|up rows") {
    GPU_OR_SKIP();
    SEEDED_RNG();
    const int32_t n = 4, n_ff = 1000;
    for (Dt dt : kDts) {
        INFO("dt " << dt_name(dt));
        std::vector<float> gu = rng.floats(size_t(n) * 2 * n_ff, -8.0f, 8.0f);
        // gates far out in both tails: exp overflows there and must not turn into NaN
        gu[3] = -100.0f;
        gu[5] = 100.0f;
        gu[size_t(2 * n_ff) + 11] = -60.0f;
        DeviceArray<float> d_gu(gu);
        DeviceArray<uint16_t> d_out(size_t(n) * n_ff);
        d_out.poison();
        LAUNCH_OK(K::silu_mul(dt, d_gu.get(), n, n_ff, d_out.get(), nullptr));
        std::vector<double> ref(size_t(n) * n_ff);
        for (int32_t t = 0; t < n; ++t)
            for (int32_t i = 0; i < n_ff; ++i) {
                const double g = gu[size_t(t) * 2 * n_ff + i], u = gu[size_t(t) * 2 * n_ff + n_ff + i];
                ref[size_t(t) * n_ff + i] = g / (1.0 + std::exp(-g)) * u;
            }
        check_close(widen(dt, d_out.download()), ref, tol16(dt));
    }
}

TEST_CASE("convert_f32: round to nearest even, bit for bit") {
    GPU_OR_SKIP();
    SEEDED_RNG();
    // More elements than the grid-stride launch has threads (65536 blocks of 256).
    const int64_t n = 65536LL * 256 + 4099;
    std::vector<float> in(static_cast<size_t>(n));
    // magnitudes 2^-40..2^40: fp16 underflow, subnormals, normals and overflow to inf
    for (float& x : in)
        x = std::ldexp(rng.uniform(1.0f, 2.0f), rng.index(81) - 40) * (rng.index(2) ? 1.0f : -1.0f);
    const std::vector<float> specials = {
        0.0f, -0.0f, INFINITY, -INFINITY, 65504.0f, 65519.99f, 65520.0f, -65520.0f,
        std::ldexp(1.0f, -24), std::ldexp(1.0f, -25), std::ldexp(1.0001f, -25), 1e-8f,
        FLT_MAX, -FLT_MAX, FLT_MIN, FLT_MIN / 4,  // the last an fp32 subnormal
        1.0f + std::ldexp(1.0f, -11), 1.0f + 3 * std::ldexp(1.0f, -11),  // fp16 ties
        1.0f + std::ldexp(1.0f, -8), 1.0f + 3 * std::ldexp(1.0f, -8)};   // bf16 ties
    std::copy(specials.begin(), specials.end(), in.begin());
    in[specials.size()] = std::numeric_limits<float>::quiet_NaN();
    DeviceArray<float> d_in(in);
    for (Dt dt : kDts) {
        INFO("dt " << dt_name(dt));
        DeviceArray<uint16_t> d_out(static_cast<size_t>(n));
        d_out.poison();
        LAUNCH_OK(K::convert_f32(dt, d_in.get(), n, d_out.get(), nullptr));
        std::vector<uint16_t> out = d_out.download(), ref(in.size());
        for (size_t i = 0; i < ref.size(); ++i) ref[i] = to_bits(dt, in[i]);
        // NaN payloads may differ: NaN only has to stay NaN
        CHECK(std::isnan(from_bits(dt, out[specials.size()])));
        out[specials.size()] = ref[specials.size()];
        for (size_t i = 0; i < specials.size(); ++i) {
            INFO("special input " << specials[i]);
            CHECK(out[i] == ref[i]);
        }
        // no input is NaN, so an unwritten (0xFFFF) element cannot match
        CHECK(count_bit_mismatches(out, ref) == 0);
    }
}

TEST_CASE("fill_random: uniform in [offset - scale, offset + scale], a function of (seed, i)") {
    GPU_OR_SKIP();
    SEEDED_RNG();
    const int64_t n = 65536LL * 256 + 12345;  // beyond one grid-stride pass
    const float scale = 0.5f, offset = 0.25f;  // both bounds exact in fp16 and bf16
    const uint64_t seed = rng.gen();
    for (Dt dt : kDts) {
        INFO("dt " << dt_name(dt) << ", seed " << seed);
        DeviceArray<uint16_t> d_a(static_cast<size_t>(n)), d_b(static_cast<size_t>(n));
        d_a.poison();
        d_b.poison();
        LAUNCH_OK(K::fill_random(dt, d_a.get(), n, seed, scale, offset, nullptr));
        LAUNCH_OK(K::fill_random(dt, d_b.get(), n, seed, scale, offset, nullptr));
        const std::vector<uint16_t> a = d_a.download();
        CHECK(count_bit_mismatches(a, d_b.download()) == 0);  // same seed, same values

        size_t out_of_range = 0;
        double sum = 0.0, sum2 = 0.0;
        int64_t hist[8] = {};
        for (uint16_t h : a) {
            const double v = from_bits(dt, h);
            if (!(v >= offset - scale && v <= offset + scale)) {  // NaN counts as out
                ++out_of_range;
                continue;
            }
            sum += v;
            sum2 += (v - offset) * (v - offset);
            ++hist[std::min(7, int((v - (offset - scale)) / (2 * scale) * 8))];
        }
        CHECK(out_of_range == 0);
        // uniform: mean offset, variance scale^2 / 3, flat histogram (statistical noise is
        // ~1e-4 here; the margins cover the rounding of the values to 16 bits)
        CHECK(std::abs(sum / double(n) - offset) < 2e-3);
        CHECK(std::abs(sum2 / double(n) / (scale * scale / 3.0) - 1.0) < 0.02);
        for (int64_t count : hist) CHECK(std::abs(double(count) / (double(n) / 8) - 1.0) < 0.1);

        // another seed: other values (equal ones only by the chance of the rounding grid)
        LAUNCH_OK(K::fill_random(dt, d_b.get(), n, seed + 1, scale, offset, nullptr));
        CHECK(count_bit_mismatches(a, d_b.download()) > size_t(n) * 95 / 100);

        // element i depends on (seed, i) alone, not on n
        DeviceArray<uint16_t> d_c(1000);
        d_c.poison();
        LAUNCH_OK(K::fill_random(dt, d_c.get(), 1000, seed, scale, offset, nullptr));
        CHECK(count_bit_mismatches(d_c.download(), std::vector<uint16_t>(a.begin(), a.begin() + 1000)) == 0);
    }
}

TEST_CASE("gather_rows: dst[i] = src[index[i]], 16-byte and 4-byte row copies") {
    GPU_OR_SKIP();
    SEEDED_RNG();
    const int32_t n_src = 50, n = 70;  // more rows out than in: indices repeat
    std::vector<int32_t> index(n);
    for (int32_t& i : index) i = rng.index(n_src);
    index[0] = n_src - 1;
    index[1] = 0;
    struct Shape {
        size_t row_bytes, dst_offset;
    };
    // 16-multiple rows aligned (uint4 copies), misaligned by 4 bytes (word copies), rows of
    // a 4-multiple only, the smallest row, and rows wider than one pass of the block.
    const Shape shapes[] = {{64, 0}, {48, 4}, {12, 0}, {4, 0}, {4112, 0}};
    const size_t guard = 64;  // bytes after the last row that must stay untouched
    for (const Shape& sh : shapes) {
        INFO("row_bytes " << sh.row_bytes << ", dst offset " << sh.dst_offset);
        std::vector<uint8_t> src(sh.row_bytes * n_src);
        for (uint8_t& b : src) b = uint8_t(rng.index(256));
        DeviceArray<uint8_t> d_src(src), d_dst(sh.dst_offset + sh.row_bytes * n + guard);
        DeviceArray<int32_t> d_index(index);
        d_dst.poison();
        LAUNCH_OK(K::gather_rows(d_src.get(), sh.row_bytes, d_index.get(), n,
                                 d_dst.get() + sh.dst_offset, nullptr));
        std::vector<uint8_t> ref(d_dst.size(), 0xFF);
        for (int32_t i = 0; i < n; ++i)
            std::memcpy(&ref[sh.dst_offset + size_t(i) * sh.row_bytes],
                        &src[size_t(index[i]) * sh.row_bytes], sh.row_bytes);
        CHECK(count_bit_mismatches(d_dst.download(), ref) == 0);
    }
    {  // rows that are not whole 4-byte words are refused
        DeviceArray<uint8_t> d_src(6 * 4), d_dst(6 * 4);
        DeviceArray<int32_t> d_index(std::vector<int32_t>{0, 1});
        CHECK(K::gather_rows(d_src.get(), 6, d_index.get(), 2, d_dst.get(), nullptr) ==
              cudaErrorInvalidValue);
    }
}

TEST_CASE("compact_rows: the kept rows of many paged caches moved in place in one launch, toward the front or the back, nothing else written") {
    GPU_OR_SKIP();
    SEEDED_RNG();
    constexpr int32_t kPageRows = K::kKvPageRows;
    // Every job is one half of a paged cache (DevicePagedCache: shuffled pages), its keys
    // (offset = lead) or its values (lead + kKvPageRows row_bytes); both halves of each cache
    // are compacted in the one launch, with keep lists of their own. 16-byte words (8 KiB: a
    // 7B cache row; 768: the bundled model's; 4112: a slice and a word more), 4-byte words
    // (rows of 20; rows of 48 at a lead of 4 bytes: the offset decides), bytes (odd rows, rows
    // of 36 at a lead of 2, of 13 at a lead of 1, 2050 over three slices, single bytes).
    struct Shape {
        size_t row_bytes, lead;
        int32_t max_rows;
    };
    const Shape shapes[] = {{8192, 0, 70},  {768, 0, 200},  {4112, 0, 100}, {20, 0, 400},
                            {48, 4, 300},   {36, 2, 200},   {7, 0, 400},     {13, 1, 300},
                            {2050, 0, 100}, {1, 0, 600}};
    // what each job keeps of the cache's n_old rows
    enum Kind { Random, None, All, DropOne, LastFew, PrefixThenRandom, kKinds };
    auto make_keep = [&](int kind, int32_t n) {
        std::vector<int32_t> keep;
        switch (kind) {
            case Random:
                for (int32_t r = 0; r < n; ++r)
                    if (rng.index(5) < 3) keep.push_back(r);
                break;
            case None: break;
            case All:
                for (int32_t r = 0; r < n; ++r) keep.push_back(r);
                break;
            case DropOne: {  // streaming: the sinks, then all but the oldest other row
                const int32_t sinks = rng.index(std::min(n, 5));
                for (int32_t r = 0; r < n; ++r)
                    if (r != sinks) keep.push_back(r);
                break;
            }
            case LastFew:  // sources far beyond their destinations: a tile's reads meet later
                           // tiles' rows, and rows of later pages move to the first
                for (int32_t r = std::max(0, n - 1 - rng.index(40)); r < n; ++r) keep.push_back(r);
                break;
            default: {
                const int32_t prefix = rng.index(n);
                for (int32_t r = 0; r < n; ++r)
                    if (r < prefix || rng.index(3) == 0) keep.push_back(r);
                break;
            }
        }
        return keep;
    };
    struct Job {
        size_t cache;
        bool value;
        std::vector<int32_t> keep;
    };
    std::vector<DevicePagedCache> caches;
    caches.reserve(std::size(shapes) * kKinds);
    std::vector<PageImage> before;  // the caches' bytes before the compaction
    std::vector<Job> jobs;
    size_t max_row_bytes = 0;
    for (const Shape& sh : shapes)
        for (int kind = 0; kind < kKinds; ++kind) {
            // LastFew's caches span more than a page (its kept rows come from the last one)
            const int32_t n_old = kind == LastFew ? kPageRows + 1 + rng.index(sh.max_rows - kPageRows)
                                                  : 1 + rng.index(sh.max_rows);
            caches.emplace_back(rng, n_old, sh.row_bytes, sh.lead);
            const DevicePagedCache& c = caches.back();
            PageImage im = c.poisoned();  // rows from n_old on, spare pages, lead, guard: poison
            for (bool value : {false, true})
                for (int32_t r = 0; r < n_old; ++r) {
                    uint8_t* p = c.row(im, value, r);
                    for (size_t b = 0; b < sh.row_bytes; ++b) p[b] = uint8_t(rng.index(256));
                }
            caches.back().upload(im);
            before.push_back(std::move(im));
            for (bool value : {false, true}) jobs.push_back({caches.size() - 1, value, make_keep(kind, n_old)});
            max_row_bytes = std::max(max_row_bytes, sh.row_bytes);
        }
    // Each job moves its kept rows to the front of the cache's rows (rows keep[i] -> i) or to
    // the back (keep[i] -> n_old - n_keep + i), by slots (gap + row); the rows that stay
    // where they are are left out of the job or, at random, kept in it. The keys' job also
    // writes the cache's new gap (unchanged to the front; n_old - n_keep more to the back).
    std::vector<int32_t> srcs;
    struct Move {
        int32_t n = 0, dst0 = 0, toward_back = 0, gap = -1;
        size_t at = 0;
    };
    std::vector<Move> moves;
    std::vector<PageImage> want = before;
    std::vector<int32_t> want_gap(caches.size());
    int32_t front_partial = 0, back_moving = 0, gap_only = 0;
    int32_t across_pages[17] = {};  // jobs that move a row to another page, by word size
    for (const Job& j : jobs) {
        const DevicePagedCache& c = caches[j.cache];
        const int32_t n_keep = int32_t(j.keep.size()), shift = c.n_rows() - n_keep;
        Move m;
        m.toward_back = int32_t(rng.index(2));
        const int32_t to = m.toward_back ? shift : 0;  // row i goes to row to + i
        int32_t lo = 0, hi = n_keep;                   // the entries that move: [lo, hi)
        while (lo < hi && j.keep[size_t(lo)] == to + lo) ++lo;
        while (hi > lo && j.keep[size_t(hi - 1)] == to + hi - 1) --hi;
        if (lo == hi) lo = hi = 0;                    // nothing moves
        if (rng.index(3) == 0) lo = 0, hi = n_keep;  // stationary entries may be in the job
        if (lo < hi) {  // the rows that stay: before the first mover, or after the last
            CHECK((m.toward_back ? lo == 0 : hi == n_keep));
            back_moving += m.toward_back;
            front_partial += !m.toward_back && lo > 0;
        }
        bool across = false;
        for (int32_t i = lo; i < hi; ++i) {
            std::memcpy(c.row(want[j.cache], j.value, to + i), c.row(before[j.cache], j.value, j.keep[size_t(i)]),
                        c.row_bytes());
            across |= (c.gap() + j.keep[size_t(i)]) / kPageRows != (c.gap() + to + i) / kPageRows;
            srcs.push_back(c.gap() + j.keep[size_t(i)]);
        }
        m.n = hi - lo;
        m.dst0 = c.gap() + to + lo;
        m.at = srcs.size() - size_t(m.n);
        if (!j.value) {
            m.gap = c.gap() + (m.toward_back ? shift : 0);
            want_gap[j.cache] = m.gap;
            gap_only += m.n == 0 && m.gap != c.gap();
        }
        moves.push_back(m);
        const uint64_t a = c.offset(j.value) | c.row_bytes();
        across_pages[a % 16 == 0 ? 16 : a % 4 == 0 ? 4 : 1] += across;
    }
    DeviceArray<int32_t> d_srcs(std::max<size_t>(srcs.size(), 1));
    if (!srcs.empty()) d_srcs.upload(srcs);
    std::vector<K::CompactJob> descs;
    for (size_t i = 0; i < jobs.size(); ++i) {
        DevicePagedCache& c = caches[jobs[i].cache];
        K::CompactJob d;
        d.table = c.table();
        d.src = d_srcs.get() + moves[i].at;
        d.offset = c.offset(jobs[i].value);
        d.row_bytes = c.row_bytes();
        d.n = moves[i].n;
        d.dst0 = moves[i].dst0;
        d.toward_back = moves[i].toward_back;
        d.gap = moves[i].gap;
        descs.push_back(d);
    }
    CHECK(front_partial > 0);
    CHECK(back_moving > 0);
    CHECK(gap_only > 0);
    CHECK(across_pages[16] > 0);  // every word size moves rows across pages
    CHECK(across_pages[4] > 0);
    CHECK(across_pages[1] > 0);
    // bytes of the caches that differ from the reference, and the jobs whose halves differ
    auto mismatches = [&]() {
        size_t bytes = 0, bad_jobs = 0;
        for (size_t c = 0; c < caches.size(); ++c) {
            const PageImage got = caches[c].download();
            bytes += count_bit_mismatches(got, want[c]);
            for (bool value : {false, true}) {
                const std::vector<uint8_t> g = caches[c].rows<uint8_t>(got, value, 0, caches[c].n_rows()),
                                           w = caches[c].rows<uint8_t>(want[c], value, 0, caches[c].n_rows());
                bad_jobs += g != w;
            }
        }
        INFO(bad_jobs << " of " << jobs.size() << " jobs' rows differ");
        CHECK(bytes == 0);
        size_t bad_gaps = 0;
        for (size_t c = 0; c < caches.size(); ++c) bad_gaps += caches[c].device_gap() != want_gap[c];
        CHECK(bad_gaps == 0);
    };
    DeviceArray<K::CompactJob> d_jobs(descs);
    INFO(jobs.size() << " jobs, max row_bytes " << max_row_bytes);
    LAUNCH_OK(K::compact_rows(d_jobs.get(), int32_t(descs.size()), max_row_bytes, nullptr));
    mismatches();

    // a launch sized for narrower rows (one column slice per job) strides over the rest
    for (size_t c = 0; c < caches.size(); ++c) {
        caches[c].upload(before[c]);
        DeviceArray<void*> gap_entry(std::vector<void*>{reinterpret_cast<void*>(uintptr_t(caches[c].gap()))});
        CHECK(cudaMemcpy(caches[c].table(), gap_entry.get(), sizeof(void*), cudaMemcpyDeviceToDevice) == cudaSuccess);
    }
    LAUNCH_OK(K::compact_rows(d_jobs.get(), int32_t(descs.size()), 1, nullptr));
    mismatches();

    CHECK(K::compact_rows(nullptr, 0, 0, nullptr) == cudaSuccess);
    CHECK(K::compact_rows(d_jobs.get(), -1, max_row_bytes, nullptr) == cudaErrorInvalidValue);
    CHECK(K::compact_rows(nullptr, 1, max_row_bytes, nullptr) == cudaErrorInvalidValue);
    CHECK(K::compact_rows(d_jobs.get(), 1, 0, nullptr) == cudaErrorInvalidValue);
}

TEST_CASE("sample_rows, greedy: index of the row maximum, the lowest one on ties") {
    GPU_OR_SKIP();
    SEEDED_RNG();
    const int32_t n_rows = 9;
    for (int32_t n_vocab : {1, 10, 1000, 32003}) {
        INFO("n_vocab " << n_vocab);
        std::vector<float> logits(size_t(n_rows) * n_vocab);
        for (int32_t r = 0; r < n_rows; ++r) {
            float* row = &logits[size_t(r) * n_vocab];
            for (int32_t i = 0; i < n_vocab; ++i) row[i] = rng.uniform(-10.0f, 10.0f);
            const int32_t p = rng.index(n_vocab);
            auto set = [&](int64_t i, float v) {
                if (i >= 0 && i < n_vocab) row[i] = v;
            };
            switch (r) {
                case 0: set(p, 20.0f); break;  // one clear maximum
                case 1:                        // ties at random positions
                    for (int k = 0; k < 4; ++k) set(rng.index(n_vocab), 20.0f);
                    break;
                case 2: std::fill(row, row + n_vocab, 3.5f); break;  // all equal
                case 3: set(n_vocab - 1, 20.0f); break;              // the last index
                case 4: set(p, 20.0f), set(p + 1024, 20.0f); break;  // one thread's two keys
                case 5: set(p, 20.0f), set(p + 1, 20.0f); break;     // neighbouring lanes
                case 6: set(p, 20.0f), set(p + 32 * 5, 20.0f); break;  // different warps
                case 7:  // far negative with -inf entries
                    for (int32_t i = 0; i < n_vocab; ++i)
                        row[i] = i % 3 == 0 ? -INFINITY : rng.uniform(-3e38f, -1e38f);
                    set(p, -5e37f);
                    break;
                default: set(0, 20.0f), set(n_vocab - 1, 20.0f); break;  // first and last
            }
        }
        DeviceArray<float> d_logits(logits);
        std::vector<K::SampleRow> rows(static_cast<size_t>(n_rows));  // temperature 0: greedy
        for (int32_t r = 0; r < n_rows; ++r) rows[size_t(r)].logits = d_logits.get() + size_t(r) * n_vocab;
        DeviceArray<K::SampleRow> d_rows(rows);
        DeviceArray<int32_t> d_out(n_rows);
        d_out.poison();
        LAUNCH_OK(K::sample_rows(d_rows.get(), n_rows, n_vocab, d_out.get(), nullptr));
        const std::vector<int32_t> out = d_out.download();
        for (int32_t r = 0; r < n_rows; ++r) {
            const float* row = &logits[size_t(r) * n_vocab];
            int32_t best = 0;
            for (int32_t i = 1; i < n_vocab; ++i)
                if (row[i] > row[best]) best = i;
            INFO("row " << r);
            CHECK(out[r] == best);
        }
    }
}

// ---- sampling -------------------------------------------------------------------------------

namespace {

// The CPU sampler's view of one row, sorted in full: what its token is (draw_from_prefix over
// the whole candidate set), and what the best kSampleCandidates alone decide (the kernel's
// answer: that token or -1).
struct SampleRef {
    int32_t full = -1, prefix = -1;
    std::vector<int32_t> ids;  // the set, best first
    std::vector<double> w;     // their weights
    double sum = 0.0;          // the CPU's sum (best first with top-k, else in id order)
    int32_t prefix_with_sum(double s, const pyr::SamplingParams& p, double u) const {
        const auto m = int32_t(std::min<size_t>(ids.size(), K::kSampleCandidates));
        std::vector<double> probs(static_cast<size_t>(m));
        for (int32_t i = 0; i < m; ++i) probs[size_t(i)] = w[size_t(i)] / s;
        return pyr::draw_from_prefix(probs.data(), ids.data(), m, size_t(m) == ids.size(), u,
                                     p.top_p, p.min_p);
    }
};

SampleRef sample_reference(const pyr::SamplingParams& p, std::vector<float> l,
                           const std::vector<int32_t>& penalized, double u) {
    const auto n = int32_t(l.size());
    for (int32_t t : penalized) {
        float& x = l[size_t(t)];
        x = x > 0 ? x / p.repeat_penalty : x * p.repeat_penalty;
    }
    for (float& x : l)
        if (x != x) x = -INFINITY;
    SampleRef r;
    r.ids.resize(size_t(n));
    for (int32_t i = 0; i < n; ++i) r.ids[size_t(i)] = i;
    std::sort(r.ids.begin(), r.ids.end(), [&](int32_t a, int32_t b) {
        return l[size_t(a)] > l[size_t(b)] || (l[size_t(a)] == l[size_t(b)] && a < b);
    });
    const bool top_k = p.top_k > 0 && p.top_k < n;
    if (top_k) r.ids.resize(size_t(p.top_k));
    const double mx = l[size_t(r.ids[0])], t = p.temperature;
    auto weight = [&](int32_t id) { return std::exp((double(l[size_t(id)]) - mx) / t); };
    for (int32_t id : r.ids) r.w.push_back(weight(id));
    if (top_k)
        for (double x : r.w) r.sum += x;
    else
        for (int32_t i = 0; i < n; ++i) r.sum += weight(i);
    std::vector<double> probs;
    for (double x : r.w) probs.push_back(x / r.sum);
    r.full = pyr::draw_from_prefix(probs.data(), r.ids.data(), int32_t(r.ids.size()), true, u,
                                   p.top_p, p.min_p);
    r.prefix = r.prefix_with_sum(r.sum, p, u);
    return r;
}

pyr::SamplingParams sampling(float temperature, int32_t top_k, float top_p, float min_p,
                             float penalty = 1.0f, int32_t last_n = 64) {
    pyr::SamplingParams p;
    p.temperature = temperature, p.top_k = top_k, p.top_p = top_p, p.min_p = min_p;
    p.repeat_penalty = penalty, p.repeat_last_n = last_n;
    return p;
}

}  // namespace

TEST_CASE("sample_rows: the CPU sampler's token in every mode; -1 only where the best 1024 cannot decide") {
    GPU_OR_SKIP();
    SEEDED_RNG();
    // settings; the history's length picks the penalty list's (short: 64 of 200, long: 3000)
    struct Setting {
        pyr::SamplingParams p;
        int32_t history;
    };
    const std::vector<Setting> settings = {
        {sampling(0.0f, 0, 1.0f, 0.0f), 0},               // greedy
        {sampling(0.0f, 40, 0.9f, 0.1f, 1.3f, 0), 3000},  // greedy, long penalty list
        {sampling(0.8f, 0, 1.0f, 0.0f), 0},               // temperature only
        {sampling(1.0f, 1, 1.0f, 0.0f), 0},               // top-k 1
        {sampling(0.8f, 40, 0.95f, 0.05f), 200},          // the defaults
        {sampling(1.0f, 1000, 1.0f, 0.0f), 0},
        {sampling(1.3f, 1000, 0.9f, 0.0f, 1.3f), 200},
        {sampling(1.0f, 1500, 1.0f, 0.0f), 0},            // k past the candidates
        {sampling(0.7f, 1500, 0.95f, 0.02f), 0},
        {sampling(1.0f, 0, 0.5f, 0.0f), 0},               // top-p
        {sampling(0.7f, 0, 0.95f, 0.0f), 0},
        {sampling(1.0f, 0, 1.0f, 0.05f), 0},              // min-p
        {sampling(1.0f, 0, 0.95f, 0.05f, 1.3f), 200},     // penalty, short list
        {sampling(2.0f, 0, 0.9f, 0.0f, 1.3f, 0), 3000},   // penalty, long list
        {sampling(0.6f, 40, 1.0f, 0.0f, 1.3f, 0), 3000},
        {sampling(1.0f, 1 << 20, 1.0f, 0.0f), 0},         // k >= n_vocab: off
    };
    enum Logits { kPeaked, kFlat, kTies, kKinds };
    int32_t minus_ones = 0, near_ties = 0, rows_total = 0;
    for (int32_t n_vocab : {32000, 1000, 1537, 33, 1}) {
        INFO("n_vocab " << n_vocab);
        const auto nv = size_t(n_vocab);
        std::vector<float> logits;
        std::vector<int32_t> lists;
        struct Row {
            pyr::SamplingParams p;
            std::vector<int32_t> history;
            pyr::SampleDraw draw;
            size_t list_at = 0;
            int kind = 0;
        };
        std::vector<Row> rows;
        for (int kind = 0; kind < kKinds; ++kind)
            for (size_t s = 0; s < settings.size(); ++s) {
                Row row;
                row.p = settings[s].p;
                row.p.seed = rng.gen();
                row.kind = kind;
                std::vector<float> l(nv);
                switch (kind) {
                    case kPeaked:  // a few clear favourites over a wide spread
                        for (float& x : l) x = rng.uniform(-12.0f, 4.0f);
                        for (int j = 0; j < 4; ++j) l[size_t(rng.index(n_vocab))] = rng.uniform(8.0f, 12.0f);
                        break;
                    case kFlat:  // the mass spread over the whole vocabulary
                        for (float& x : l) x = rng.uniform(-0.5f, 0.5f);
                        break;
                    default:  // coarse values (ties), and -inf, NaN, -0, +0, sometimes +inf
                        for (float& x : l) x = std::round(rng.uniform(-16.0f, 16.0f)) / 4.0f;
                        for (int j = 0; j < 6; ++j) {
                            l[size_t(rng.index(n_vocab))] = -INFINITY;
                            l[size_t(rng.index(n_vocab))] = std::nanf("");
                            l[size_t(rng.index(n_vocab))] = -0.0f;
                            l[size_t(rng.index(n_vocab))] = 0.0f;
                        }
                        if (s % 3 == 1) l[size_t(rng.index(n_vocab))] = INFINITY;
                        break;
                }
                // histories lean to the best tokens, so that the penalty changes the order
                for (int32_t j = 0; j < settings[s].history; ++j) {
                    int32_t t = rng.index(n_vocab);
                    if (j % 4 == 0) t = int32_t(std::max_element(l.begin(), l.end()) - l.begin());
                    if (j % 97 == 0) t = n_vocab + rng.index(5);  // out of range: skipped
                    row.history.push_back(t);
                }
                pyr::Sampler sampler(row.p);
                row.draw = sampler.peek(row.history, n_vocab);
                row.list_at = lists.size();
                lists.insert(lists.end(), row.draw.penalized.begin(), row.draw.penalized.end());
                logits.insert(logits.end(), l.begin(), l.end());
                rows.push_back(std::move(row));
            }
        const auto n_rows = int32_t(rows.size());
        DeviceArray<float> d_logits(logits);
        DeviceArray<int32_t> d_lists(std::max<size_t>(lists.size(), 1));
        if (!lists.empty()) d_lists.upload(lists);
        std::vector<K::SampleRow> desc(static_cast<size_t>(n_rows));
        for (int32_t r = 0; r < n_rows; ++r) {
            const Row& row = rows[size_t(r)];
            K::SampleRow& d = desc[size_t(r)];
            d.logits = d_logits.get() + size_t(r) * nv;
            d.temperature = row.p.temperature, d.top_k = row.p.top_k;
            d.top_p = row.p.top_p, d.min_p = row.p.min_p, d.repeat_penalty = row.p.repeat_penalty;
            d.penalized = d_lists.get() + row.list_at;
            d.n_penalized = int32_t(row.draw.penalized.size());
            d.u = row.draw.u;
        }
        DeviceArray<K::SampleRow> d_rows(desc);
        DeviceArray<int32_t> d_out(static_cast<size_t>(n_rows));
        d_out.poison();
        LAUNCH_OK(K::sample_rows(d_rows.get(), n_rows, n_vocab, d_out.get(), nullptr));
        const std::vector<int32_t> out = d_out.download();
        for (int32_t r = 0; r < n_rows; ++r) {
            const Row& row = rows[size_t(r)];
            const std::vector<float> l(logits.begin() + ptrdiff_t(size_t(r) * nv),
                                       logits.begin() + ptrdiff_t(size_t(r + 1) * nv));
            pyr::Sampler sampler(row.p);
            const int32_t want = sampler.sample_with(l.data(), n_vocab, row.draw);
            INFO("row " << r << " (logits kind " << row.kind << "): temperature "
                        << row.p.temperature << ", top_k " << row.p.top_k << ", top_p "
                        << row.p.top_p << ", min_p " << row.p.min_p << ", penalty "
                        << row.p.repeat_penalty << " on " << row.draw.penalized.size()
                        << " ids, u " << row.draw.u << "; kernel " << out[size_t(r)]
                        << ", CPU " << want);
            ++rows_total;
            if (row.p.temperature <= 0.0f) {  // greedy: exact
                CHECK(out[size_t(r)] == want);
                continue;
            }
            const SampleRef ref = sample_reference(row.p, l, row.draw.penalized, row.draw.u);
            REQUIRE(ref.full == want);  // the rule: the whole sorted set gives the CPU's token
            const bool top_k = row.p.top_k > 0 && row.p.top_k < n_vocab;
            const bool exact = top_k && row.p.top_k <= K::kSampleCandidates;
            if (out[size_t(r)] == -1) {
                ++minus_ones;
                CHECK_MESSAGE(!exact, "-1 where the candidates are the whole set");
                CHECK_MESSAGE(n_vocab > K::kSampleCandidates, "-1 with every token a candidate");
            }
            if (out[size_t(r)] == ref.prefix) continue;
            // The only allowed difference: the kernel's sum over the whole set (a tree, not the
            // CPU's id order) differs in its last bits and u lies on a boundary between two
            // tokens, where a sum a few ulps off picks the neighbour.
            const bool near_tie = !exact && (ref.prefix_with_sum(ref.sum * (1 + 1e-12), row.p, row.draw.u) == out[size_t(r)] ||
                                             ref.prefix_with_sum(ref.sum * (1 - 1e-12), row.p, row.draw.u) == out[size_t(r)]);
            near_ties += near_tie;
            CHECK_MESSAGE(near_tie, "kernel " << out[size_t(r)] << ", the best 1024 decide "
                                              << ref.prefix);
        }
    }
    MESSAGE(rows_total << " rows: " << minus_ones << " left to the host (-1), " << near_ties
                       << " near-tie differences (expected 0 on random data)");
    CHECK(minus_ones > 0);  // the flat rows without top-k: the host's case was exercised
    CHECK(near_ties == 0);
}

TEST_CASE("sample_rows: bad arguments are refused, no rows is a no-op") {
    GPU_OR_SKIP();
    DeviceArray<K::SampleRow> d_rows(std::vector<K::SampleRow>(1));
    DeviceArray<int32_t> d_out(1);
    CHECK(K::sample_rows(d_rows.get(), -1, 100, d_out.get(), nullptr) == cudaErrorInvalidValue);
    CHECK(K::sample_rows(d_rows.get(), 1, 0, d_out.get(), nullptr) == cudaErrorInvalidValue);
    CHECK(K::sample_rows(d_rows.get(), 1, K::kSampleMaxVocab + 1, d_out.get(), nullptr) ==
          cudaErrorInvalidValue);
    CHECK(K::sample_rows(nullptr, 1, 100, d_out.get(), nullptr) == cudaErrorInvalidValue);
    CHECK(K::sample_rows(d_rows.get(), 0, 100, d_out.get(), nullptr) == cudaSuccess);
}

// The largest vocabulary the penalty bitmap allows, with a penalty on its last id.
TEST_CASE("sample_rows: the largest vocabulary, penalized ids at its end") {
    GPU_OR_SKIP();
    SEEDED_RNG();
    const int32_t n_vocab = K::kSampleMaxVocab;
    std::vector<float> l = rng.floats(size_t(n_vocab), -4.0f, 4.0f);
    l[size_t(n_vocab - 1)] = 30.0f, l[size_t(n_vocab - 2)] = 29.0f;
    const std::vector<int32_t> pen = {n_vocab - 1};  // 30 / 1.3 < 29: the runner-up wins
    DeviceArray<float> d_l(l);
    DeviceArray<int32_t> d_pen(pen);
    std::vector<K::SampleRow> desc(2);
    for (K::SampleRow& d : desc) d.logits = d_l.get(), d.penalized = d_pen.get(), d.n_penalized = 1, d.repeat_penalty = 1.3f;
    desc[1].temperature = 0.5f, desc[1].top_k = 2, desc[1].u = 0.0;
    DeviceArray<K::SampleRow> d_rows(desc);
    DeviceArray<int32_t> d_out(2);
    d_out.poison();
    LAUNCH_OK(K::sample_rows(d_rows.get(), 2, n_vocab, d_out.get(), nullptr));
    const std::vector<int32_t> out = d_out.download();
    CHECK(out[0] == n_vocab - 2);
    CHECK(out[1] == n_vocab - 2);
}

// ---- gemv ---------------------------------------------------------------------------------

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
    {  // more tokens than kGemvMaxTokens are refused
        DeviceArray<uint16_t> d_W(64 * 64), d_a(64 * 9);
        DeviceArray<float> d_y(64 * 9);
        CHECK(K::gemv(Dt::F16, d_W.get(), 64, 64, d_a.get(), K::kGemvMaxTokens + 1, d_y.get(),
                      64, 0.0f, nullptr) == cudaErrorInvalidValue);
    }
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
    {  // more tokens than kGemvMaxTokens, negative cols: refused
        DeviceArray<uint16_t> d_W(2 * 64 * 64), d_a(64 * 9), d_h(64 * 9);
        CHECK(K::gemv_swiglu(Dt::F16, d_W.get(), 64, 64, d_a.get(), K::kGemvMaxTokens + 1, d_h.get(),
                             nullptr) == cudaErrorInvalidValue);
        CHECK(K::gemv_swiglu(Dt::BF16, d_W.get(), 64, -8, d_a.get(), 1, d_h.get(), nullptr) ==
              cudaErrorInvalidValue);
    }
}

// ---- rope_store -------------------------------------------------------------------------

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

// ---- attention ----------------------------------------------------------------------------

namespace {

// One sequence of an attention batch: host inputs as the kernel sees them.
struct HostAttnSeq {
    int32_t n_q = 0, n_kv = 0, q_stride = 0;
    int32_t scores_from = -1;         // raw scores wanted for queries scores_from..; -1: none
    std::vector<float> q;             // (n_q, q_stride) fp32
    std::vector<uint16_t> k, v;       // (n_kv, kv_dim) 16-bit bits
};

HostAttnSeq random_attn_seq(Rng& rng, Dt dt, int32_t n_q, int32_t n_kv, int32_t n_head,
                            int32_t n_head_kv, int32_t hd, int32_t scores_from) {
    HostAttnSeq s;
    s.n_q = n_q;
    s.n_kv = n_kv;
    s.scores_from = scores_from;
    // queries are rows of the fused q|k|v projection: their stride is wider than q
    s.q_stride = (n_head + 2 * n_head_kv) * hd;
    s.q = rng.floats(size_t(n_q) * s.q_stride, -2.0f, 2.0f);
    s.k = rng.bits16(dt, size_t(n_kv) * n_head_kv * hd, -2.0f, 2.0f);
    s.v = rng.bits16(dt, size_t(n_kv) * n_head_kv * hd, -1.0f, 1.0f);
    return s;
}

// Its device buffers. The cache is paged (DevicePagedCache: shuffled pages, all poison but
// the sequence's rows), with rows beyond n_kv filled with NaN: reading (and weighting by
// zero) a key or value the sequence does not have would show in the output. `capacity`
// (>= n_kv; 0: n_kv) is the bound the launch is given when the true count comes from the
// device (AttnBatch::kv_len): the cache's rows and the scores' row stride.
struct DeviceAttnSeq {
    static constexpr int32_t kSpareRows = 3;
    int32_t cap;
    DeviceArray<float> q;
    DevicePagedCache cache;
    DeviceArray<uint16_t> out;
    DeviceArray<float> lse, scores;

    // gap: the cache's (DevicePagedCache; random when negative). The decode kernel's tiles
    // follow the cache's slots, so two runs give the same bits only with the same gap.
    DeviceAttnSeq(Rng& rng, const HostAttnSeq& h, int32_t n_head, int32_t n_head_kv, int32_t hd,
                  int32_t capacity = 0, int32_t gap = -1)
        : cap(std::max(capacity, h.n_kv)),
          q(h.q),
          cache(rng, cap + kSpareRows, size_t(n_head_kv) * hd * 2, 0, gap),
          out(size_t(h.n_q) * n_head * hd),
          lse(size_t(h.n_q) * n_head),
          scores(h.scores_from < 0 ? 0 : size_t(h.n_q - h.scores_from) * n_head * cap) {
        PageImage im = cache.poisoned();
        cache.set_rows(im, false, 0, h.k);
        cache.set_rows(im, true, 0, h.v);
        cache.upload(im);
        out.poison();
        lse.poison();
        scores.poison();
    }
    K::AttnSeq view(const HostAttnSeq& h) const {
        K::AttnSeq s;
        s.q = q.get();
        s.q_stride = h.q_stride;
        s.n_q = h.n_q;
        s.pages = cache.pages();
        s.n_kv = cap;
        s.out = out.get();
        s.lse = lse.get();
        if (h.scores_from >= 0) {
            s.scores = scores.get();
            s.scores_from = h.scores_from;
        }
        return s;
    }
};

// The reference in double: scores (n_q, n_head, n_kv) = q.k log2(e) / sqrt(hd) and the
// probabilities of their causal softmax (both 0 for keys a query cannot see), out
// (n_q, n_head * hd) and lse (n_q, n_head) = log2 sum_j 2^score_j.
struct AttnRef {
    std::vector<double> scores, probs, out, lse;
};

AttnRef attention_ref(Dt dt, const HostAttnSeq& s, int32_t n_head, int32_t n_head_kv, int32_t hd) {
    const int32_t group = n_head / n_head_kv, kv_dim = n_head_kv * hd;
    const double log2e = 1.0 / std::log(2.0);
    AttnRef ref;
    ref.scores.assign(size_t(s.n_q) * n_head * s.n_kv, 0.0);
    ref.probs.assign(size_t(s.n_q) * n_head * s.n_kv, 0.0);
    ref.out.assign(size_t(s.n_q) * n_head * hd, 0.0);
    ref.lse.assign(size_t(s.n_q) * n_head, 0.0);
    const std::vector<double> k = widen(dt, s.k), v = widen(dt, s.v);
    for (int32_t i = 0; i < s.n_q; ++i)
        for (int32_t h = 0; h < n_head; ++h) {
            const int32_t last = s.n_kv - s.n_q + i;  // the last key query i sees
            const float* q = &s.q[size_t(i) * s.q_stride + size_t(h) * hd];
            const size_t kv_off = size_t(h / group) * hd;
            double* score = &ref.scores[(size_t(i) * n_head + h) * s.n_kv];
            double mx = -INFINITY;
            for (int32_t j = 0; j <= last; ++j) {
                double dot = 0.0;
                for (int32_t d = 0; d < hd; ++d) dot += q[d] * k[size_t(j) * kv_dim + kv_off + d];
                score[j] = dot * log2e / std::sqrt(double(hd));
                mx = std::max(mx, score[j]);
            }
            double sum = 0.0;
            for (int32_t j = 0; j <= last; ++j) sum += std::exp2(score[j] - mx);
            ref.lse[size_t(i) * n_head + h] = mx + std::log2(sum);
            double* p = &ref.probs[(size_t(i) * n_head + h) * s.n_kv];
            double* o = &ref.out[size_t(i) * n_head * hd + size_t(h) * hd];
            for (int32_t j = 0; j <= last; ++j) {
                p[j] = std::exp2(score[j] - mx) / sum;
                for (int32_t d = 0; d < hd; ++d) o[d] += p[j] * v[size_t(j) * kv_dim + kv_off + d];
            }
        }
    return ref;
}

// The raw scores attention() wrote for the keys each observed query sees (the others are
// unspecified), in (query, head, key) order.
std::vector<float> visible_scores(const HostAttnSeq& h, const DeviceAttnSeq& d, int32_t n_head) {
    std::vector<float> got;
    if (h.scores_from < 0) return got;
    const std::vector<float> scores = d.scores.download();
    for (int32_t i = h.scores_from; i < h.n_q; ++i)
        for (int32_t hh = 0; hh < n_head; ++hh)
            for (int32_t j = 0; j <= h.n_kv - h.n_q + i; ++j)
                got.push_back(scores[(size_t(i - h.scores_from) * n_head + hh) * d.cap + j]);
    return got;
}

// Checks what attention() wrote for one sequence against the reference: out, lse and the
// raw scores of the keys each observed query sees.
void check_attention(Dt dt, const HostAttnSeq& h, const DeviceAttnSeq& d, const AttnRef& ref,
                     int32_t n_head) {
    check_close(widen(dt, d.out.download()), ref.out, tol16(dt));
    const std::vector<float> lse = d.lse.download();
    double worst = 0.0;
    for (size_t i = 0; i < lse.size(); ++i)
        worst = std::isfinite(lse[i]) ? std::max(worst, std::abs(lse[i] - ref.lse[i])) : INFINITY;
    CHECK_MESSAGE(worst < 1e-3, "lse off by " << worst);
    if (h.scores_from < 0) return;
    std::vector<double> want;
    for (int32_t i = h.scores_from; i < h.n_q; ++i)
        for (int32_t hh = 0; hh < n_head; ++hh)
            for (int32_t j = 0; j <= h.n_kv - h.n_q + i; ++j)
                want.push_back(ref.scores[(size_t(i) * n_head + hh) * h.n_kv + j]);
    INFO("raw scores of queries " << h.scores_from << "..");
    check_close(widen(visible_scores(h, d, n_head)), want, 1e-5);
}

struct SeqShape {
    int32_t n_q, n_kv;
};

}  // namespace

TEST_CASE("tensor_cores: the device computes with the register layout the kernels assume") {
    GPU_OR_SKIP();
    CHECK(K::kernels_runnable() == cudaSuccess);
    // every device the GPU tests run on has them (sm_80+; the sim computes them itself); a
    // wrong transcription of the layout in common.cuh shows here as LayoutMismatch
    for (Dt dt : kDts) {
        INFO("dt " << dt_name(dt));
        const K::TensorCores t = K::tensor_cores(dt);
        CHECK_MESSAGE(t == K::TensorCores::Usable, K::tensor_cores_name(t));
        CHECK(K::tensor_cores(dt) == t);  // asked once, then remembered
    }
}

TEST_CASE("attention: causal softmax(q k / sqrt(d)) v of a ragged batch, lse and scores") {
    GPU_OR_SKIP();
    SEEDED_RNG();
    struct Heads {
        int32_t n_head, n_head_kv;
    };
    const Heads heads[] = {{8, 2}, {4, 4}};  // GQA, MHA
    struct Batch {
        const char* name;
        std::vector<SeqShape> seqs;
    };
    // attention() takes its decode kernel when every sequence has fewer than 8 queries, and
    // its tensor-core kernel (64 queries, 64 keys a block step) from 16 queries on where it can
    const Batch batches[] = {
        {"decode", {{1, 1}, {1, 300}, {3, 40}, {7, 7}, {2, 129}}},
        {"prefill", {{37, 37}, {20, 133}, {8, 8}, {9, 300}}},
        {"mixed", {{1, 1}, {1, 300}, {3, 40}, {37, 37}, {20, 133}}},
        {"long prefill", {{130, 130}, {70, 201}, {16, 16}, {1, 65}, {64, 64}}},
    };
    // 36 is not a multiple of 8 (element-wise dot products), 80 not of 32 (partial lanes)
    for (int32_t hd : {32, 36, 64, 80, 128, 256})
        for (const Heads& hs : heads)
            for (const Batch& b : batches)
                for (Dt dt : kDts)
                    for (bool tensor_cores : {false, true}) {
                    int32_t max_q = 0;
                    for (const SeqShape& sh : b.seqs) max_q = std::max(max_q, sh.n_q);
                    const bool on_tc = K::attention_on_tensor_cores(dt, max_q, hd, tensor_cores);
                    // every device the tests run on has tensor cores (sm_80+, or the sim's)
                    CHECK(on_tc == (tensor_cores && max_q >= 16 && (hd == 64 || hd == 128)));
                    if (tensor_cores && !on_tc) continue;  // the same launch as without
                    INFO("dt " << dt_name(dt) << ", head_dim " << hd << ", heads " << hs.n_head
                               << "/" << hs.n_head_kv << ", batch " << b.name
                               << (on_tc ? ", tensor cores" : ""));
                    std::vector<HostAttnSeq> host;
                    std::vector<DeviceAttnSeq> dev;
                    dev.reserve(b.seqs.size());
                    K::AttnBatch batch;
                    batch.n_seq = int32_t(b.seqs.size());
                    for (size_t s = 0; s < b.seqs.size(); ++s) {
                        // raw scores from every other sequence, of its second half of queries
                        const int32_t scores_from = s % 2 ? b.seqs[s].n_q / 2 : -1;
                        host.push_back(random_attn_seq(rng, dt, b.seqs[s].n_q, b.seqs[s].n_kv,
                                                       hs.n_head, hs.n_head_kv, hd, scores_from));
                        dev.emplace_back(rng, host.back(), hs.n_head, hs.n_head_kv, hd);
                        batch.seq[s] = dev.back().view(host.back());
                    }
                    LAUNCH_OK(K::attention(dt, batch, hs.n_head, hs.n_head_kv, hd, nullptr, {},
                                           tensor_cores));
                    for (size_t s = 0; s < host.size(); ++s) {
                        INFO("sequence " << s << " (n_q " << host[s].n_q << ", n_kv " << host[s].n_kv << ")");
                        check_attention(dt, host[s], dev[s],
                                        attention_ref(dt, host[s], hs.n_head, hs.n_head_kv, hd),
                                        hs.n_head);
                    }
                }
}

TEST_CASE("attention: true key counts read on the device (kv_len) under a larger launch bound") {
    GPU_OR_SKIP();
    SEEDED_RNG();
    // Each cache is given room for more keys than it has (the rows beyond hold NaN), the
    // launch that bound and the true counts on the device: the plain run's bits must come out.
    const std::vector<SeqShape> batches[] = {
        {{1, 1}, {1, 300}, {3, 40}, {7, 7}, {2, 129}},  // decode kernel
        {{37, 37}, {20, 133}, {1, 1}, {9, 300}},         // prefill kernel (tensor cores at 128)
    };
    const int32_t extra[] = {1, 31, 32, 100, 5};  // capacity - n_kv: within and past tiles
    struct Heads {
        int32_t n_head, n_head_kv;
    };
    for (int32_t hd : {36, 128})
        for (const Heads& hs : {Heads{8, 2}, Heads{4, 4}})
            for (const std::vector<SeqShape>& shapes : batches)
                for (Dt dt : kDts)
                    for (bool tensor_cores : {false, true}) {
                    if (tensor_cores && hd != 128) continue;  // the same launch as without
                    INFO("dt " << dt_name(dt) << ", head_dim " << hd << ", heads " << hs.n_head
                               << "/" << hs.n_head_kv << ", " << shapes.size() << " sequences"
                               << (tensor_cores ? ", tensor cores where it can" : ""));
                    std::vector<HostAttnSeq> host;
                    std::vector<DeviceAttnSeq> plain, bounded;
                    plain.reserve(shapes.size());
                    bounded.reserve(shapes.size());
                    K::AttnBatch b_plain, b_bounded;
                    b_plain.n_seq = b_bounded.n_seq = int32_t(shapes.size());
                    std::vector<int32_t> lens;
                    for (size_t s = 0; s < shapes.size(); ++s) {
                        const int32_t scores_from = s % 2 ? 0 : shapes[s].n_q - 1;
                        host.push_back(random_attn_seq(rng, dt, shapes[s].n_q, shapes[s].n_kv,
                                                       hs.n_head, hs.n_head_kv, hd, scores_from));
                        const int32_t gap = rng.index(K::kKvPageRows);
                        plain.emplace_back(rng, host.back(), hs.n_head, hs.n_head_kv, hd, 0, gap);
                        bounded.emplace_back(rng, host.back(), hs.n_head, hs.n_head_kv, hd,
                                             shapes[s].n_kv + extra[s % 5], gap);
                        b_plain.seq[s] = plain.back().view(host.back());
                        b_bounded.seq[s] = bounded.back().view(host.back());
                        lens.push_back(shapes[s].n_kv);
                    }
                    DeviceArray<int32_t> d_lens(lens);
                    b_bounded.kv_len = d_lens.get();
                    LAUNCH_OK(K::attention(dt, b_plain, hs.n_head, hs.n_head_kv, hd, nullptr, {},
                                           tensor_cores));
                    LAUNCH_OK(K::attention(dt, b_bounded, hs.n_head, hs.n_head_kv, hd, nullptr, {},
                                           tensor_cores));
                    for (size_t s = 0; s < host.size(); ++s) {
                        INFO("sequence " << s << " (n_q " << host[s].n_q << ", n_kv " << host[s].n_kv
                                         << ", bound " << bounded[s].cap << ")");
                        check_attention(dt, host[s], bounded[s],
                                        attention_ref(dt, host[s], hs.n_head, hs.n_head_kv, hd),
                                        hs.n_head);
                        CHECK(count_bit_mismatches(bounded[s].out.download(), plain[s].out.download()) == 0);
                        CHECK(count_bit_mismatches(bounded[s].lse.download(), plain[s].lse.download()) == 0);
                        CHECK(count_bit_mismatches(visible_scores(host[s], bounded[s], hs.n_head),
                                                   visible_scores(host[s], plain[s], hs.n_head)) == 0);
                    }
                }
}

TEST_CASE("attention: decode split over blocks (AttnSplit) merges its partial softmaxes") {
    GPU_OR_SKIP();
    SEEDED_RNG();
    // A one-key cache (every split but the first empty), tile tails, a sequence without a
    // query, and caches of 22 tiles (16 and 7 splits leave the last ones empty).
    const std::vector<SeqShape> shapes = {{1, 1}, {1, 300}, {1, 33}, {0, 5}, {1, 700}, {1, 64}};
    const int32_t extra[] = {1, 31, 32, 100, 5, 300};  // capacity - n_kv with kv_len
    struct Heads {
        int32_t n_head, n_head_kv;
    };
    for (int32_t hd : {36, 64, 128})
        for (const Heads& hs : {Heads{8, 2}, Heads{4, 4}})
            for (Dt dt : kDts)
                for (int32_t n_split : {2, 3, 7, 16})
                    for (bool bounded : {false, true}) {
                        INFO("dt " << dt_name(dt) << ", head_dim " << hd << ", heads " << hs.n_head
                                   << "/" << hs.n_head_kv << ", " << n_split << " splits"
                                   << std::string(bounded ? ", kv_len under a larger bound" : ""));
                        std::vector<HostAttnSeq> host;
                        std::vector<DeviceAttnSeq> dev;
                        dev.reserve(shapes.size());
                        K::AttnBatch batch;
                        batch.n_seq = int32_t(shapes.size());
                        std::vector<int32_t> lens;
                        for (size_t s = 0; s < shapes.size(); ++s) {
                            host.push_back(random_attn_seq(rng, dt, shapes[s].n_q, shapes[s].n_kv, hs.n_head,
                                                           hs.n_head_kv, hd, s % 2 ? 0 : -1));
                            dev.emplace_back(rng, host.back(), hs.n_head, hs.n_head_kv, hd,
                                             bounded ? shapes[s].n_kv + extra[s] : 0);
                            batch.seq[s] = dev.back().view(host.back());
                            lens.push_back(shapes[s].n_kv);
                        }
                        DeviceArray<int32_t> d_lens(lens);
                        if (bounded) batch.kv_len = d_lens.get();
                        DeviceArray<float> partial(
                            K::attention_split_floats(batch.n_seq, hs.n_head, hd, n_split));
                        partial.poison();
                        LAUNCH_OK(K::attention(dt, batch, hs.n_head, hs.n_head_kv, hd, nullptr,
                                               K::AttnSplit{n_split, partial.get()}));
                        for (size_t s = 0; s < host.size(); ++s) {
                            INFO("sequence " << s << " (n_q " << host[s].n_q << ", n_kv " << host[s].n_kv
                                             << ", bound " << dev[s].cap << ")");
                            check_attention(dt, host[s], dev[s],
                                            attention_ref(dt, host[s], hs.n_head, hs.n_head_kv, hd),
                                            hs.n_head);
                        }
                    }
}

TEST_CASE("attention: a decode block computes a KV head's group of query heads, the per-head blocks' bits") {
    // attention_decode_head_blocks: grouped where 2..8 query heads share a KV head and
    // head_dim is 33..128
    CHECK(K::attention_decode_head_blocks(32, 8, 128) == 8);   // LLaMA-3-8B
    CHECK(K::attention_decode_head_blocks(32, 8, 128, false) == 32);
    CHECK(K::attention_decode_head_blocks(6, 2, 64) == 2);     // the bundled model
    CHECK(K::attention_decode_head_blocks(64, 8, 128) == 8);
    CHECK(K::attention_decode_head_blocks(28, 4, 128) == 4);   // groups of 7
    CHECK(K::attention_decode_head_blocks(32, 32, 128) == 32); // no groups (MHA)
    CHECK(K::attention_decode_head_blocks(36, 4, 128) == 36);  // groups of 9
    CHECK(K::attention_decode_head_blocks(8, 2, 32) == 8);     // head_dim 32
    CHECK(K::attention_decode_head_blocks(8, 2, 256) == 8);    // head_dim 256
    CHECK(K::attention_decode_head_blocks(8, 3, 128) == 8);    // not a grouping at all

    GPU_OR_SKIP();
    SEEDED_RNG();
    struct Heads {
        int32_t n_head, n_head_kv;
    };
    // groups of 2, 3 and 4 (blocks of 4 rows, some unused), 7 and 8 (blocks of 8)
    const Heads heads[] = {{4, 2}, {6, 2}, {8, 2}, {7, 1}, {16, 2}};
    // a plain decode launch may hold up to 7 queries a sequence; a split one at most 1
    const std::vector<SeqShape> plain_shapes = {{1, 1}, {1, 300}, {3, 40}, {0, 9}, {7, 7}, {2, 129}};
    const std::vector<SeqShape> split_shapes = {{1, 1}, {1, 300}, {1, 33}, {0, 5}, {1, 700}};
    const int32_t extra[] = {1, 31, 32, 100, 5, 64};  // capacity - n_kv, under kv_len
    for (int32_t hd : {36, 64, 128})
        for (const Heads& hs : heads)
            for (Dt dt : kDts)
                for (int32_t n_split : {1, 3}) {
                    const bool bounded = n_split > 1;
                    const std::vector<SeqShape>& shapes = n_split > 1 ? split_shapes : plain_shapes;
                    INFO("dt " << dt_name(dt) << ", head_dim " << hd << ", heads " << hs.n_head
                               << "/" << hs.n_head_kv << ", " << n_split << " splits"
                               << std::string(bounded ? ", kv_len under a larger bound" : ""));
                    CHECK(K::attention_decode_head_blocks(hs.n_head, hs.n_head_kv, hd) == hs.n_head_kv);
                    std::vector<HostAttnSeq> host;
                    std::vector<DeviceAttnSeq> grouped, per_head;
                    grouped.reserve(shapes.size());
                    per_head.reserve(shapes.size());
                    K::AttnBatch b_grouped, b_per_head;
                    b_grouped.n_seq = b_per_head.n_seq = int32_t(shapes.size());
                    std::vector<int32_t> lens;
                    for (size_t s = 0; s < shapes.size(); ++s) {
                        // raw scores of every other sequence (the observed decode rows)
                        const int32_t scores_from = s % 2 ? 0 : -1;
                        host.push_back(random_attn_seq(rng, dt, shapes[s].n_q, shapes[s].n_kv,
                                                       hs.n_head, hs.n_head_kv, hd, scores_from));
                        const int32_t cap = bounded ? shapes[s].n_kv + extra[s] : 0;
                        const int32_t gap = rng.index(K::kKvPageRows);
                        grouped.emplace_back(rng, host.back(), hs.n_head, hs.n_head_kv, hd, cap, gap);
                        per_head.emplace_back(rng, host.back(), hs.n_head, hs.n_head_kv, hd, cap, gap);
                        b_grouped.seq[s] = grouped.back().view(host.back());
                        b_per_head.seq[s] = per_head.back().view(host.back());
                        lens.push_back(shapes[s].n_kv);
                    }
                    DeviceArray<int32_t> d_lens(lens);
                    if (bounded) b_grouped.kv_len = b_per_head.kv_len = d_lens.get();
                    DeviceArray<float> partial(
                        K::attention_split_floats(int32_t(shapes.size()), hs.n_head, hd, n_split));
                    partial.poison();
                    const K::AttnSplit split{n_split, n_split > 1 ? partial.get() : nullptr};
                    LAUNCH_OK(K::attention(dt, b_grouped, hs.n_head, hs.n_head_kv, hd, nullptr, split,
                                           true, true));
                    partial.poison();
                    LAUNCH_OK(K::attention(dt, b_per_head, hs.n_head, hs.n_head_kv, hd, nullptr, split,
                                           true, false));
                    for (size_t s = 0; s < host.size(); ++s) {
                        INFO("sequence " << s << " (n_q " << host[s].n_q << ", n_kv " << host[s].n_kv << ")");
                        check_attention(dt, host[s], grouped[s],
                                        attention_ref(dt, host[s], hs.n_head, hs.n_head_kv, hd),
                                        hs.n_head);
                        CHECK(count_bit_mismatches(grouped[s].out.download(), per_head[s].out.download()) == 0);
                        CHECK(count_bit_mismatches(grouped[s].lse.download(), per_head[s].lse.download()) == 0);
                        CHECK(count_bit_mismatches(visible_scores(host[s], grouped[s], hs.n_head),
                                                   visible_scores(host[s], per_head[s], hs.n_head)) == 0);
                    }
                }
}

TEST_CASE("attention: the decode split's choice and refusals") {
    // attention_splits: the 7B decode shapes on an H100 (132 SMs)
    CHECK(K::attention_splits(1, 32, 768, 132) == 3);    // >= 256 keys a split
    CHECK(K::attention_splits(1, 32, 512, 132) == 2);
    CHECK(K::attention_splits(1, 32, 4096, 132) == 8);   // about 2 blocks per SM
    CHECK(K::attention_splits(1, 32, 255, 132) == 1);
    CHECK(K::attention_splits(1, 8, 1 << 20, 132) == K::kMaxAttnSplits);
    CHECK(K::attention_splits(4, 32, 4096, 132) == 2);   // 128 blocks: not quite full
    CHECK(K::attention_splits(5, 32, 4096, 132) == 1);   // 160 blocks fill the device
    for (int32_t n_sm : {1, 8, 108, 132})
        for (int32_t n_seq : {1, 2, 3, 7, 64})
            for (int32_t n_head : {1, 8, 32, 40, 64})
                for (int32_t max_kv : {0, 1, 255, 256, 511, 768, 4096, 1 << 20}) {
                    INFO(n_seq << " sequences, " << n_head << " heads, " << max_kv << " keys, "
                                << n_sm << " SMs");
                    const int32_t n = K::attention_splits(n_seq, n_head, max_kv, n_sm);
                    CHECK(n >= 1);
                    CHECK(n <= K::kMaxAttnSplits);
                    if (n > 1) {
                        CHECK(n * 256 <= max_kv);
                        CHECK(n * n_seq * n_head <= 2 * n_sm);
                    }
                    if (n_seq * n_head >= n_sm) CHECK(n == 1);
                }
    CHECK(K::attention_split_floats(2, 32, 128, 3) == size_t(2) * 32 * 3 * 130);
    CHECK(K::attention_split_floats(2, 32, 128, 1) == 0);

    GPU_OR_SKIP();
    SEEDED_RNG();
    const Dt dt = Dt::F16;
    const int32_t n_head = 4, hd = 64;
    const HostAttnSeq one = random_attn_seq(rng, dt, 1, 40, n_head, n_head, hd, -1);
    const HostAttnSeq two = random_attn_seq(rng, dt, 2, 40, n_head, n_head, hd, -1);
    const DeviceAttnSeq d_one(rng, one, n_head, n_head, hd), d_two(rng, two, n_head, n_head, hd);
    DeviceArray<float> partial(K::attention_split_floats(2, n_head, hd, K::kMaxAttnSplits + 1));
    K::AttnBatch decode, mixed;
    decode.n_seq = 1;
    decode.seq[0] = d_one.view(one);
    mixed.n_seq = 2;
    mixed.seq[0] = d_one.view(one);
    mixed.seq[1] = d_two.view(two);
    auto run = [&](const K::AttnBatch& b, int32_t n_split, float* p) {
        return K::attention(dt, b, n_head, n_head, hd, nullptr, K::AttnSplit{n_split, p});
    };
    CHECK(run(mixed, 2, partial.get()) == cudaErrorInvalidValue);  // a sequence with 2 queries
    CHECK(run(decode, 2, nullptr) == cudaErrorInvalidValue);       // no workspace
    CHECK(run(decode, 0, partial.get()) == cudaErrorInvalidValue);
    CHECK(run(decode, K::kMaxAttnSplits + 1, partial.get()) == cudaErrorInvalidValue);
    CHECK(cudaGetLastError() == cudaSuccess);  // refused before any launch
    LAUNCH_OK(run(mixed, 1, nullptr));  // no split: no workspace needed
    LAUNCH_OK(run(decode, K::kMaxAttnSplits, partial.get()));
    check_attention(dt, one, d_one, attention_ref(dt, one, n_head, n_head, hd), n_head);
}

TEST_CASE("attention_rows_mma: observed rows recomputed on the tensor cores, attention_rows' bits") {
    GPU_OR_SKIP();
    SEEDED_RNG();
    struct Config {
        int32_t n_head, n_head_kv, hd;
    };
    // 2 row blocks and 5 key tiles (the first sequence), a short one; GQA 4 and 3, MHA
    const std::vector<SeqShape> shapes = {{150, 300}, {40, 40}};
    const int32_t observed[] = {70, 10};
    for (const Config& cf : {Config{8, 2, 64}, Config{6, 2, 64}, Config{4, 4, 128}})
        for (Dt dt : kDts) {
            INFO("dt " << dt_name(dt) << ", heads " << cf.n_head << "/" << cf.n_head_kv
                       << ", head_dim " << cf.hd);
            REQUIRE(K::attention_rows_mma_supported(dt, cf.hd));
            std::vector<HostAttnSeq> host;
            std::vector<DeviceAttnSeq> dev;
            dev.reserve(shapes.size());
            K::AttnBatch batch;
            batch.n_seq = int32_t(shapes.size());
            K::RowsBatch from_scores;
            K::RowsMmaBatch from_q;
            from_scores.n_seq = from_q.n_seq = batch.n_seq;
            std::vector<DeviceArray<float>> rows_scores, rows_q;
            for (size_t s = 0; s < shapes.size(); ++s) {
                const int32_t n_q = shapes[s].n_q, n_kv = shapes[s].n_kv, n_rows = observed[s];
                host.push_back(random_attn_seq(rng, dt, n_q, n_kv, cf.n_head, cf.n_head_kv, cf.hd,
                                               n_q - n_rows));
                dev.emplace_back(rng, host.back(), cf.n_head, cf.n_head_kv, cf.hd);
                batch.seq[s] = dev.back().view(host.back());
                rows_scores.emplace_back(size_t(n_rows) * n_kv);
                rows_q.emplace_back(size_t(n_rows) * n_kv);
                rows_scores.back().poison();
                rows_q.back().poison();
                const int32_t first_limit = n_kv - n_q + (n_q - n_rows);
                const float* lse = dev.back().lse.get() + size_t(n_q - n_rows) * cf.n_head;
                from_scores.seq[s] = {dev.back().scores.get(), lse, rows_scores.back().get(), n_rows,
                                      n_kv, first_limit, nullptr};
                K::RowsMmaSeq& r = from_q.seq[s];
                r.q = dev.back().q.get() + size_t(n_q - n_rows) * host.back().q_stride;
                r.q_stride = host.back().q_stride;
                r.pages = dev.back().cache.pages();
                r.lse = lse;
                r.rows = rows_q.back().get();
                r.n_rows = n_rows;
                r.n_kv = n_kv;
                r.first_limit = first_limit;
            }
            REQUIRE(K::attention_on_tensor_cores(dt, 150, cf.hd));
            LAUNCH_OK(K::attention(dt, batch, cf.n_head, cf.n_head_kv, cf.hd, nullptr));
            LAUNCH_OK(K::attention_rows(from_scores, cf.n_head, nullptr));
            LAUNCH_OK(K::attention_rows_mma(dt, from_q, cf.n_head, cf.n_head_kv, cf.hd, nullptr));
            for (size_t s = 0; s < shapes.size(); ++s) {
                INFO("sequence " << s);
                const HostAttnSeq& h = host[s];
                const std::vector<float> got = rows_q[s].download();
                CHECK(count_bit_mismatches(got, rows_scores[s].download()) == 0);
                const AttnRef ref = attention_ref(dt, h, cf.n_head, cf.n_head_kv, cf.hd);
                std::vector<double> want(got.size(), 0.0);
                for (int32_t r = 0; r < observed[s]; ++r)
                    for (int32_t hh = 0; hh < cf.n_head; ++hh)
                        for (int32_t j = 0; j < h.n_kv; ++j)
                            want[size_t(r) * h.n_kv + j] +=
                                ref.probs[(size_t(h.scores_from + r) * cf.n_head + hh) * h.n_kv + j] / cf.n_head;
                check_close(widen(got), want, 1e-3);
                size_t nonzero_masked = 0;  // exact zeros where the query cannot see the key
                for (int32_t r = 0; r < observed[s]; ++r)
                    for (int32_t j = h.n_kv - h.n_q + h.scores_from + r + 1; j < h.n_kv; ++j)
                        nonzero_masked += got[size_t(r) * h.n_kv + j] != 0.0f;
                CHECK(nonzero_masked == 0);
            }
        }
    K::RowsMmaBatch none;
    CHECK(K::attention_rows_mma(Dt::F16, none, 4, 4, 80, nullptr) == cudaErrorInvalidValue);
    CHECK(!K::attention_rows_mma_supported(Dt::F16, 80));
}

TEST_CASE("attention_rows, attention_col_sums: head-averaged probabilities for KV policies") {
    GPU_OR_SKIP();
    SEEDED_RNG();
    const int32_t n_q = 50, n_kv = 150, rows_from = 40, n_rows = n_q - rows_from;
    struct Config {
        int32_t n_head, n_head_kv, hd;
    };
    const Config configs[] = {{8, 2, 64}, {4, 4, 80}, {8, 2, 36}};
    const double tol = 1e-3;
    for (const Config& cf : configs)
        for (Dt dt : kDts) {
            INFO("dt " << dt_name(dt) << ", heads " << cf.n_head << "/" << cf.n_head_kv
                       << ", head_dim " << cf.hd);
            // attention() first: the observations are computed from its lse and scores
            const HostAttnSeq host =
                random_attn_seq(rng, dt, n_q, n_kv, cf.n_head, cf.n_head_kv, cf.hd, rows_from);
            const DeviceAttnSeq dev(rng, host, cf.n_head, cf.n_head_kv, cf.hd);
            K::AttnBatch batch;
            batch.n_seq = 1;
            batch.seq[0] = dev.view(host);
            LAUNCH_OK(K::attention(dt, batch, cf.n_head, cf.n_head_kv, cf.hd, nullptr));
            const AttnRef ref = attention_ref(dt, host, cf.n_head, cf.n_head_kv, cf.hd);
            check_attention(dt, host, dev, ref, cf.n_head);

            std::vector<double> rows_ref(size_t(n_rows) * n_kv, 0.0), cols_ref(size_t(n_kv), 0.0);
            for (int32_t i = 0; i < n_q; ++i)
                for (int32_t h = 0; h < cf.n_head; ++h)
                    for (int32_t j = 0; j < n_kv; ++j) {
                        const double p = ref.probs[(size_t(i) * cf.n_head + h) * n_kv + j] / cf.n_head;
                        cols_ref[j] += p;
                        if (i >= rows_from) rows_ref[size_t(i - rows_from) * n_kv + j] += p;
                    }

            {  // rows of the last queries, from the scores and their lse
                DeviceArray<float> d_rows(size_t(n_rows) * n_kv);
                d_rows.poison();
                const int32_t first_limit = n_kv - n_q + rows_from;
                K::RowsBatch rb;
                rb.n_seq = 1;
                rb.seq[0] = {dev.scores.get(), dev.lse.get() + size_t(rows_from) * cf.n_head,
                             d_rows.get(), n_rows, n_kv, first_limit, nullptr};
                LAUNCH_OK(K::attention_rows(rb, cf.n_head, nullptr));
                const std::vector<float> rows = d_rows.download();
                check_close(widen(rows), rows_ref, tol);
                // exact zeros where a query cannot see the key (the softmax is causal)
                size_t nonzero_masked = 0;
                for (int32_t r = 0; r < n_rows; ++r)
                    for (int32_t j = first_limit + r + 1; j < n_kv; ++j)
                        nonzero_masked += rows[size_t(r) * n_kv + j] != 0.0f;
                CHECK(nonzero_masked == 0);

                // the same with the true key count on the device, n_kv a larger bound (the
                // stride of scores and rows): the plain rows' bits, zeros past the true count;
                // in one launch with the plain sequence again (a batch of unequal shapes)
                const int32_t cap = n_kv + 45;
                const DeviceAttnSeq bounded(rng, host, cf.n_head, cf.n_head_kv, cf.hd, cap, dev.cache.gap());
                DeviceArray<int32_t> d_len(std::vector<int32_t>{n_kv});
                K::AttnBatch bb;
                bb.n_seq = 1;
                bb.seq[0] = bounded.view(host);
                bb.kv_len = d_len.get();
                LAUNCH_OK(K::attention(dt, bb, cf.n_head, cf.n_head_kv, cf.hd, nullptr));
                DeviceArray<float> d_rows_b(size_t(n_rows) * cap), d_rows_again(d_rows.size());
                d_rows_b.poison();
                d_rows_again.poison();
                K::RowsBatch both;
                both.n_seq = 2;
                both.seq[0] = {bounded.scores.get(), bounded.lse.get() + size_t(rows_from) * cf.n_head,
                               d_rows_b.get(), n_rows, cap, cap - n_q + rows_from, d_len.get()};
                both.seq[1] = rb.seq[0];
                both.seq[1].rows = d_rows_again.get();
                LAUNCH_OK(K::attention_rows(both, cf.n_head, nullptr));
                CHECK(count_bit_mismatches(d_rows_again.download(), rows) == 0);
                const std::vector<float> rows_b = d_rows_b.download();
                std::vector<float> head, tail;
                for (int32_t r = 0; r < n_rows; ++r)
                    for (int32_t j = 0; j < cap; ++j)
                        (j < n_kv ? head : tail).push_back(rows_b[size_t(r) * cap + j]);
                CHECK(count_bit_mismatches(head, rows) == 0);
                CHECK(tail == std::vector<float>(tail.size(), 0.0f));
            }
            // column sums over all queries, zeroed beforehand: on the CUDA cores, and on the
            // tensor cores where they can (head_dim 64 here)
            for (bool tensor_cores : {false, true}) {
                INFO((tensor_cores ? "tensor cores where they can" : "CUDA cores"));
                DeviceArray<float> d_cols(static_cast<size_t>(n_kv));
                d_cols.zero();
                LAUNCH_OK(K::attention_col_sums(dt, batch.seq[0], cf.n_head, cf.n_head_kv, cf.hd,
                                                d_cols.get(), nullptr, tensor_cores));
                check_close(widen(d_cols.download()), cols_ref, tol);

                // they add to what is there (the sums of earlier steps)
                const std::vector<float> before = rng.floats(size_t(n_kv), 0.0f, 3.0f);
                d_cols.upload(before);
                LAUNCH_OK(K::attention_col_sums(dt, batch.seq[0], cf.n_head, cf.n_head_kv, cf.hd,
                                                d_cols.get(), nullptr, tensor_cores));
                std::vector<double> expect(cols_ref);
                for (int32_t j = 0; j < n_kv; ++j) expect[j] += before[j];
                check_close(widen(d_cols.download()), expect, tol);
            }
        }
}
