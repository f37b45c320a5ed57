// Tests of kernels/elementwise.cu: embed, rmsnorm, add_bias, silu_mul, convert_f32,
// fill_random, gather_rows, compact_rows (kernel_test_util.h says how they test).
#include <cfloat>
#include <limits>

#include "cuda/kernel_test_util.h"

using namespace kernel_test;

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

// A prefill of 32 x 2048 tokens is 65536 rows: more than a grid's y dimension holds.
TEST_CASE("add_bias and silu_mul: more rows than a grid's y dimension (65535)") {
    GPU_OR_SKIP();
    SEEDED_RNG();
    const int32_t n = 65537, ncols = 3;
    const Dt dt = Dt::F16;
    const std::vector<float> y = rng.floats(size_t(n) * ncols, -4.0f, 4.0f);
    const std::vector<uint16_t> b = rng.bits16(dt, size_t(ncols), -1.0f, 1.0f);
    DeviceArray<float> d_y(y);
    DeviceArray<uint16_t> d_b(b);
    LAUNCH_OK(K::add_bias(dt, d_y.get(), n, ncols, ncols, d_b.get(), nullptr));
    std::vector<float> ref = y;
    for (size_t k = 0; k < ref.size(); ++k) ref[k] += from_bits(dt, b[k % ncols]);
    CHECK(count_bit_mismatches(d_y.download(), ref) == 0);

    // the sums as the fused gate|up rows of n_ff = 1: 98305 rows
    const int32_t n_ff = 1, rows = int32_t(y.size() / 2);
    DeviceArray<uint16_t> d_out(size_t(rows) * n_ff);
    d_out.poison();
    LAUNCH_OK(K::silu_mul(dt, d_y.get(), rows, n_ff, d_out.get(), nullptr));
    std::vector<double> want(static_cast<size_t>(rows));
    for (int32_t t = 0; t < rows; ++t) {
        const double g = ref[size_t(t) * 2], u = ref[size_t(t) * 2 + 1];
        want[size_t(t)] = g / (1.0 + std::exp(-g)) * u;
    }
    check_close(widen(dt, d_out.download()), want, tol16(dt));
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
