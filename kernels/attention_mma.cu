// Prefill attention on the tensor cores (sm_80+, head_dim 64 or 128), and the KV policies'
// observations of such a prefill. attention() and attention_col_sums() (attention.cu) hand
// launches of 16+ queries here; CPU reference: cpu::attention.
//
// attention_mma_kernel: a block owns 64 queries of one head, a warp 16 of them; the block
// stages 64 keys and values at a time in shared memory (through cp.async, a tile ahead of
// their use), and each warp computes its 16 x 64
// scores with mma_m16n8k16 (common.cuh; the keys' and values' fragments come out of shared
// memory through ldmatrix, b_fragments), keeps the online softmax of its rows in registers
// and adds P V with mma_m16n8k16 again: the scores' accumulator layout (two 8-key tiles) is
// the layout of P as the A operand of a 16-key step, so P never leaves the registers.
// The query is fp32 and the tensor cores take 16-bit operands: it goes in as two terms of T,
// hi = T(q) and lo = T(q - hi), whose sum is within 2^-22 of q for fp16 (2^-16 for bf16), so
// that scores, lse and the observed raw scores stay close to the CUDA-core kernel's fp32, on
// which the KV policies' choices depend (bf16's raw scores: within about 1e-5 of their
// size). P is rounded to T for P V (as the output will be).
#include "attention.cuh"

namespace pyr::kernels {
namespace {

using namespace attention_detail;

constexpr int kMmaQueries = 64;  // a block's queries: 4 warps of 16 rows
constexpr int kMmaKeys = 64;     // keys a tile (kKvPageRows at most: two pages, kernels.h)
constexpr int kMmaMinQueries = 16;  // attention() takes this kernel from here on

template <int HD>
constexpr int kMmaRowStride = HD + 8;  // elements; +16 bytes: conflict-free fragment loads

// Elements of a staged tile of kMmaKeys keys (or values).
template <int HD>
constexpr int kMmaTileElems = kMmaKeys * kMmaRowStride<HD>;
// Every tensor-core kernel's shared memory: two tiles (attention: keys and values; the
// observations: the keys of two KV heads, one computed while the other loads).
template <typename T, int HD>
constexpr size_t mma_smem_bytes() {
    return 2 * size_t(kMmaTileElems<HD>) * sizeof(T);
}

// Runs `body` with the constant HD bound to head_dim: 64, or else 128, the sizes the
// tensor-core kernels are built for (attention_rows_mma_supported).
#define PYR_DISPATCH_MMA_HD(head_dim, body) \
    do {                                    \
        if ((head_dim) == 64) {             \
            constexpr int HD = 64;          \
            body;                           \
        } else {                            \
            constexpr int HD = 128;         \
            body;                           \
        }                                   \
    } while (0)

// Rows base, base + 1, ... (at most kKvPageRows of them) of a paged KV cache, keys or values:
// row base + r is row(r). The tensor-core kernels' tiles start at key multiples of kMmaKeys,
// so behind a gap (kernels.h) one spans two pages, consecutive rows within each.
template <typename T>
struct KvTile {
    T* lo;
    T* hi;          // the second page's first row (lo when the tile has one page)
    int32_t split;  // rows before it are in lo's page
    int64_t row_elems;
    __device__ __forceinline__ T* row(int32_t r) const {
        return r < split ? lo + r * row_elems : hi + (r - split) * row_elems;
    }
};
// The tile of rows from base; rows from `end` on are not read (their page may be absent).
template <typename T>
__device__ __forceinline__ KvTile<T> kv_tile(KvPages table, int32_t base, int32_t end,
                                             int64_t row_elems, bool value) {
    const int32_t s = kv_gap(table) + base, split = kKvPageRows - s % kKvPageRows;
    T* lo = kv_slot<T>(table, s, row_elems, value);
    T* hi = base + split < end ? kv_slot<T>(table, s + split, row_elems, value) : lo;
    return {lo, hi, split, row_elems};
}

// Queues the copy of keys (or values) [base, base + kMmaKeys) of KV head kvh into dst
// (kMmaKeys, LD) through cp.async, base < end; rows from `end' on become zeros (a value row
// of NaN weighted by 0 would still poison P V). The caller commits the group and waits for
// it (cp_async_commit, cp_async_wait, then a __syncthreads) before the tile is read.
template <typename T, int HD>
__device__ __forceinline__ void stage_tile(KvPages pages, int32_t base, int32_t end, int kvh,
                                           int64_t kv_dim, bool value, T* dst) {
    static_assert(kMmaKeys <= kKvPageRows, "a tile must span at most two pages");
    constexpr int LD = kMmaRowStride<HD>, kVecs = HD / 8;  // 16-byte vectors a row
    const KvTile<const T> tile = kv_tile<const T>(pages, base, end, kv_dim, value);
    for (int i = threadIdx.x; i < kMmaKeys * kVecs; i += blockDim.x) {
        const int r = i / kVecs, c = (i % kVecs) * 8;
        const bool in = base + r < end;
        cp_async16(dst + r * LD + c, (in ? tile.row(r) : tile.row(0)) + kvh * HD + c, in);
    }
}

// A warp's 16 query rows (row i at q + i * q_stride, head_dim HD, fp32; rows from n_rows
// on are zeros) as A fragments of T: qa[0] = T(q), qa[1] = T(q - qa[0]) (see above).
template <typename T, int HD>
__device__ __forceinline__ void query_fragments(const float* q, int64_t q_stride, int32_t n_rows,
                                                uint32_t (&qa)[2][HD / 16][4]) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int kk = 0; kk < HD / 16; ++kk)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int32_t row = a_row(lane, j);
            float x[2] = {0.0f, 0.0f};
            if (row < n_rows) {
                const float* e = q + row * q_stride + kk * 16 + a_col(lane, j);
                x[0] = e[0];
                x[1] = e[1];
            }
            const T hi0 = from_f32<T>(x[0]), hi1 = from_f32<T>(x[1]);
            qa[0][kk][j] = pack2(hi0, hi1);
            qa[1][kk][j] = pack2(from_f32<T>(x[0] - to_f32(hi0)), from_f32<T>(x[1] - to_f32(hi1)));
        }
}

// s = q k (unscaled) of a warp's 16 rows and the kMmaKeys staged keys Ks (kMmaKeys, LD):
// s[n][i] is key 8 n + c_col(lane, i) of row c_row(lane, i). The lo term goes first.
template <typename T, int HD>
__device__ __forceinline__ void tile_scores(const uint32_t (&qa)[2][HD / 16][4], const T* Ks,
                                            float (&s)[kMmaKeys / 8][4]) {
    constexpr int LD = kMmaRowStride<HD>;
#pragma unroll
    for (int n = 0; n < kMmaKeys / 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < HD / 16; ++kk)
#pragma unroll
        for (int n = 0; n < kMmaKeys / 8; n += 2) {
            uint32_t b[4];  // B[d][j] = K[j][d]: keys 8 n .. 8 n + 15, dims 16 kk ..
            b_fragments<false, T, LD>(Ks, n * 8, kk * 16, b);
            mma_m16n8k16<T>(s[n], qa[1][kk], b);
            mma_m16n8k16<T>(s[n], qa[0][kk], b);
            mma_m16n8k16<T>(s[n + 1], qa[1][kk], b + 2);
            mma_m16n8k16<T>(s[n + 1], qa[0][kk], b + 2);
        }
}

// One tile's online softmax for a warp's rows (this lane holds two, r = 0, 1: accumulator
// elements 2r, 2r + 1): the unscaled scores s of keys base + 8 n + c_col(lane, 2r + c)
// become probabilities exp2(s * qscale - m) (0 where the row cannot see the key), the rows'
// running max m and sum l take the tile in, and the output accumulators o are rescaled to
// the new max. A row's 64 keys lie with 4 lanes (lane ^ 1, lane ^ 2). An observed row's raw
// scores are written on the way.
template <int kDimTiles>
__device__ __forceinline__ void softmax_tile(float (&s)[kMmaKeys / 8][4], int32_t base, float qscale,
                                             const bool (&valid)[2], const int32_t (&last)[2],
                                             float* const (&observed)[2], float (&m)[2], float (&l)[2],
                                             float (&o)[kDimTiles][4]) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float mx = -INFINITY;
#pragma unroll
        for (int n = 0; n < kMmaKeys / 8; ++n)
#pragma unroll
            for (int c = 0; c < 2; ++c) {
                const int32_t j = base + n * 8 + c_col(lane, 2 * r + c);
                float v = __fmul_rn(s[n][2 * r + c], qscale);  // rounded: see probs_over_heads
                if (!valid[r] || j > last[r]) v = -INFINITY;
                else if (observed[r]) observed[r][j] = v;
                s[n][2 * r + c] = v;
                mx = fmaxf(mx, v);
            }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_new = fmaxf(m[r], mx);
        const float ref = m_new == -INFINITY ? 0.0f : m_new;  // no -inf - -inf
        float sum = 0.0f;
#pragma unroll
        for (int n = 0; n < kMmaKeys / 8; ++n)
#pragma unroll
            for (int c = 0; c < 2; ++c) {
                const float p = exp2f(s[n][2 * r + c] - ref);
                s[n][2 * r + c] = p;
                sum += p;
            }
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        sum += __shfl_xor_sync(0xffffffffu, sum, 2);
        const float corr = exp2f(m[r] - ref);
        l[r] = l[r] * corr + sum;
        m[r] = m_new;
#pragma unroll
        for (int n = 0; n < kDimTiles; ++n) {
            o[n][2 * r] *= corr;
            o[n][2 * r + 1] *= corr;
        }
    }
}

// o += P V over a tile, 16 keys a step: the probabilities' key tiles 2 ks and 2 ks + 1 are
// the step's A fragment (they never leave the registers), the staged values Vs its B.
template <typename T, int HD>
__device__ __forceinline__ void add_pv(const float (&p)[kMmaKeys / 8][4], const T* Vs,
                                       float (&o)[HD / 8][4]) {
#pragma unroll
    for (int ks = 0; ks < kMmaKeys / 16; ++ks) {
        uint32_t pa[4];
        a_from_accumulators<T>(p[2 * ks], p[2 * ks + 1], pa);
#pragma unroll
        for (int n = 0; n < HD / 8; n += 2) {
            uint32_t b[4];  // B[j][d] = V[j][d]: keys 16 ks .. 16 ks + 15, dims 8 n ..
            b_fragments<true, T, kMmaRowStride<HD>>(Vs, ks * 16, n * 8, b);
            mma_m16n8k16<T>(o[n], pa, b);
            mma_m16n8k16<T>(o[n + 1], pa, b + 2);
        }
    }
}

template <typename T, int HD>
__global__ void __launch_bounds__(128)
attention_mma_kernel(AttnBatch batch, int32_t n_head, int32_t n_head_kv, float qscale) {
    static_assert(HD % 16 == 0, "16-dim steps");
    constexpr int kSteps = HD / 16, kDimTiles = HD / 8, kKeyTiles = kMmaKeys / 8;
    let_next_grid_start();  // o_proj follows
    const AttnSeq& sq = batch.seq[blockIdx.z];
    const int32_t q0 = int32_t(blockIdx.x) * kMmaQueries;
    if (q0 >= sq.n_q) return;
    const int32_t nq = min(kMmaQueries, sq.n_q - q0);
    const int h = blockIdx.y, kvh = h / (n_head / n_head_kv);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int64_t kv_dim = int64_t(n_head_kv) * HD;
    const int32_t n_kv = true_kv_len(batch);
    const int32_t first_limit = n_kv - sq.n_q + q0;  // last key query q0 sees
    const int32_t kend = first_limit + nq;           // keys [0, kend) matter to the block
    // this warp's rows: block rows w0 .. w0 + 15, the keys [0, w_end) matter to them; this
    // lane's accumulators hold two of them, r = 0, 1 (elements 2r, 2r + 1: c_row(lane, 2r))
    const int32_t w0 = warp * 16, w_nq = max(0, min(16, nq - w0));
    const int32_t w_end = w_nq > 0 ? first_limit + w0 + w_nq : 0;
    bool valid[2];
    int32_t last[2];   // the last key each row sees
    float* observed[2];  // the row's raw scores, when asked for
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int32_t row = w0 + c_row(lane, 2 * r);
        valid[r] = row < nq;
        last[r] = first_limit + row;
        observed[r] = sq.scores && valid[r] && q0 + row >= sq.scores_from
                          ? sq.scores + (int64_t(q0 + row - sq.scores_from) * n_head + h) * sq.n_kv
                          : nullptr;
    }

    // the query rows as A fragments, hi and lo terms (zero rows past the block's queries)
    uint32_t qa[2][kSteps][4];
    query_fragments<T, HD>(sq.q + int64_t(q0 + w0) * sq.q_stride + h * HD, sq.q_stride, w_nq, qa);

    extern __shared__ float smem[];
    T* Ks = reinterpret_cast<T*>(smem);  // (kMmaKeys, LD)
    T* Vs = Ks + kMmaTileElems<HD>;      // (kMmaKeys, LD)

    float o[kDimTiles][4];  // output accumulators: dims 8 n + c_col(lane, i)
#pragma unroll
    for (int n = 0; n < kDimTiles; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};  // the rows' running max, sum

    // The tiles' keys and values arrive through cp.async, each a group of its own, one tile
    // ahead: the next keys load while this tile's P V runs, the next values while the next
    // q k and softmax run. A thread's groups: K0 V0 | K1 V1 | ..., so the wait for a tile's
    // keys (or values) leaves the one newer group in flight. Every warp takes part in the
    // copies and barriers, also past its causal horizon.
    stage_tile<T, HD>(sq.pages, 0, kend, kvh, kv_dim, false, Ks);
    cp_async_commit();
    stage_tile<T, HD>(sq.pages, 0, kend, kvh, kv_dim, true, Vs);
    cp_async_commit();
    for (int32_t base = 0; base < kend; base += kMmaKeys) {
        const int32_t next = base + kMmaKeys;
        const bool active = base < w_end;  // before this warp's causal horizon
        cp_async_wait<1>();  // this tile's keys
        __syncthreads();

        float s[kKeyTiles][4];  // this tile's scores, then probabilities
        if (active) {  // (warp-uniform)
            tile_scores<T, HD>(qa, Ks, s);  // keys base + 8 n + c_col(lane, i)
            softmax_tile<kDimTiles>(s, base, qscale, valid, last, observed, m, l, o);
        }

        __syncthreads();  // every warp is done with the keys: the next ones may come in
        if (next < kend) stage_tile<T, HD>(sq.pages, next, kend, kvh, kv_dim, false, Ks);
        cp_async_commit();  // (empty after the last tile: the count of groups stays regular)
        cp_async_wait<1>();  // this tile's values
        __syncthreads();

        if (active) add_pv<T, HD>(s, Vs, o);
        __syncthreads();  // every warp is done with the values: the next ones may come in
        if (next < kend) stage_tile<T, HD>(sq.pages, next, kend, kvh, kv_dim, true, Vs);
        cp_async_commit();
    }

    // out = o / l, lse = m + log2 l
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        if (!valid[r]) continue;
        const int32_t q = q0 + w0 + c_row(lane, 2 * r);
        T* out = static_cast<T*>(sq.out) + int64_t(q) * n_head * HD + h * HD + c_col(lane, 2 * r);
#pragma unroll
        for (int n = 0; n < kDimTiles; ++n)
            *reinterpret_cast<uint32_t*>(out + n * 8) =
                pack2(from_f32<T>(o[n][2 * r] / l[r]), from_f32<T>(o[n][2 * r + 1] / l[r]));
        if (c_col(lane, 0) == 0 && sq.lse) sq.lse[int64_t(q) * n_head + h] = m[r] + log2f(l[r]);
    }
}

// The probabilities exp2(q k * qscale - lse) of a block's rows (up to kMmaQueries: row i's
// query at q + i * q_stride, its lse at lse + i * n_head, it sees keys <= first_last + i)
// and the keys [base, base + kMmaKeys), summed over every head in order into this warp's
// acc (the accumulator layout: row c_row(lane, i) of the warp's 16, key base + 8 n +
// c_col(lane, i)). q k is tile_scores', as attention_mma_kernel makes it. The block stages
// each KV head's keys (those before `end') in Ks, two tiles: the next head's arrive through
// cp.async while this one's are used. Every thread of the block must call it.
template <typename T, int HD>
__device__ __forceinline__ void probs_over_heads(const float* q, int32_t q_stride, const float* lse,
                                                 KvPages pages, int32_t base, int32_t end,
                                                 int32_t n_rows, int32_t first_last, int32_t n_head,
                                                 int32_t n_head_kv, float qscale, T* Ks,
                                                 float (&acc)[kMmaKeys / 8][4]) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int32_t w0 = warp * 16, w_rows = max(0, min(16, n_rows - w0));
    const int64_t kv_dim = int64_t(n_head_kv) * HD;
    const int group = n_head / n_head_kv;
#pragma unroll
    for (int n = 0; n < kMmaKeys / 8; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
    if (base >= end) return;  // no key seen: zeros (block-uniform)
    // head kvh's keys in tile kvh % 2; a thread's cp.async groups: head 0, head 1, ...
    stage_tile<T, HD>(pages, base, end, 0, kv_dim, false, Ks);
    cp_async_commit();
    for (int kvh = 0; kvh < n_head_kv; ++kvh) {
        if (kvh + 1 < n_head_kv)
            stage_tile<T, HD>(pages, base, end, kvh + 1, kv_dim, false,
                              Ks + ((kvh + 1) & 1) * kMmaTileElems<HD>);
        cp_async_commit();  // (empty after the last head: the count of groups stays regular)
        cp_async_wait<1>();  // head kvh's keys
        __syncthreads();
        const T* keys = Ks + (kvh & 1) * kMmaTileElems<HD>;
        for (int h = kvh * group; h < (kvh + 1) * group && w_rows > 0; ++h) {
            uint32_t qa[2][HD / 16][4];
            query_fragments<T, HD>(q + int64_t(w0) * q_stride + h * HD, q_stride, w_rows, qa);
            float s[kMmaKeys / 8][4];
            tile_scores<T, HD>(qa, keys, s);
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int32_t row = w0 + c_row(lane, i);
                if (row >= n_rows) continue;
                const float row_lse = lse[int64_t(row) * n_head + h];
#pragma unroll
                for (int n = 0; n < kMmaKeys / 8; ++n)
                    if (base + n * 8 + c_col(lane, i) <= first_last + row)
                        // the product rounded before the subtraction (no fused multiply-add,
                        // which nvcc would make of it): the stored raw score minus lse, as
                        // attention_rows computes
                        acc[n][i] += exp2f(__fsub_rn(__fmul_rn(s[n][i], qscale), row_lse));
            }
        }
        __syncthreads();  // every warp is done with head kvh's keys: head kvh + 2's go there
    }
}

// rows_mma_kernel: the observed rows of attention_rows, recomputed instead of read from
// stored raw scores: a block owns 64 rows and one tile of 64 keys; the heads are summed in
// order, as rows_kernel sums them, so the bits are those of attention_mma_kernel's scores
// through rows_kernel.
template <typename T, int HD>
__global__ void __launch_bounds__(128)
rows_mma_kernel(RowsMmaBatch batch, int32_t n_head, int32_t n_head_kv, float qscale) {
    const RowsMmaSeq& sq = batch.seq[blockIdx.z];
    const int32_t base = int32_t(blockIdx.x) * kMmaKeys, r0 = int32_t(blockIdx.y) * kMmaQueries;
    if (base >= sq.n_kv || r0 >= sq.n_rows) return;
    const int32_t nr = min(kMmaQueries, sq.n_rows - r0);
    const int lane = threadIdx.x & 31, w0 = (threadIdx.x >> 5) * 16;
    extern __shared__ float smem[];
    float acc[kMmaKeys / 8][4];
    probs_over_heads<T, HD>(sq.q + int64_t(r0) * sq.q_stride, sq.q_stride, sq.lse + int64_t(r0) * n_head,
                            sq.pages, base, min(sq.n_kv, sq.first_limit + r0 + nr), nr,
                            sq.first_limit + r0, n_head, n_head_kv, qscale,
                            reinterpret_cast<T*>(smem), acc);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int32_t row = w0 + c_row(lane, i);
        if (row >= nr) continue;
#pragma unroll
        for (int n = 0; n < kMmaKeys / 8; ++n) {
            const int32_t j = base + n * 8 + c_col(lane, i);
            if (j < sq.n_kv) sq.rows[int64_t(r0 + row) * sq.n_kv + j] = acc[n][i] / float(n_head);
        }
    }
}

// col_sums_mma_kernel: attention_col_sums on the tensor cores: a block owns 64 queries and
// one tile of 64 keys, sums the probabilities over its queries and every head, and writes
// its 64 sums to its row of partial (n_kv wide; attention_col_sums adds the rows up).
template <typename T, int HD>
__global__ void __launch_bounds__(128)
col_sums_mma_kernel(AttnSeq sq, int32_t n_head, int32_t n_head_kv, float qscale, float* partial) {
    constexpr int kKeyTiles = kMmaKeys / 8;
    const int32_t base = int32_t(blockIdx.x) * kMmaKeys, q0 = int32_t(blockIdx.y) * kMmaQueries;
    if (base >= sq.n_kv || q0 >= sq.n_q) return;
    const int32_t nq = min(kMmaQueries, sq.n_q - q0);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int32_t first_last = sq.n_kv - sq.n_q + q0;  // last key query q0 sees
    extern __shared__ float smem[];
    float acc[kKeyTiles][4];
    probs_over_heads<T, HD>(sq.q + int64_t(q0) * sq.q_stride, sq.q_stride, sq.lse + int64_t(q0) * n_head,
                            sq.pages, base, min(sq.n_kv, first_last + nq), nq, first_last, n_head,
                            n_head_kv, qscale, reinterpret_cast<T*>(smem), acc);
    // the block's sum per key: this lane's two rows, the 8 lanes holding the same keys
    // (lane bits 2-4), then the 4 warps
    float col[kKeyTiles][2];
#pragma unroll
    for (int n = 0; n < kKeyTiles; ++n)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
            float v = acc[n][c] + acc[n][2 + c];
#pragma unroll
            for (int o = 4; o < 32; o <<= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
            col[n][c] = v;
        }
    __syncthreads();  // the key tile is done with: its space holds the warps' sums
    float* part = smem;  // (4 warps, kMmaKeys)
    if (lane < 4)
#pragma unroll
        for (int n = 0; n < kKeyTiles; ++n)
#pragma unroll
            for (int c = 0; c < 2; ++c) part[warp * kMmaKeys + n * 8 + c_col(lane, c)] = col[n][c];
    __syncthreads();
    for (int i = threadIdx.x; i < kMmaKeys; i += blockDim.x) {
        const float v = part[i] + part[kMmaKeys + i] + part[2 * kMmaKeys + i] + part[3 * kMmaKeys + i];
        if (base + i < sq.n_kv) partial[int64_t(blockIdx.y) * sq.n_kv + base + i] = v;
    }
}

template <typename T, int HD>
cudaError_t launch_attention_mma(const AttnBatch& batch, int32_t max_q, int32_t n_head,
                                 int32_t n_head_kv, cudaStream_t stream) {
    const dim3 grid(unsigned((max_q + kMmaQueries - 1) / kMmaQueries), unsigned(n_head),
                    unsigned(batch.n_seq));
    attention_mma_kernel<T, HD><<<grid, 128, mma_smem_bytes<T, HD>(), stream>>>(
        batch, n_head, n_head_kv, query_scale(HD));
    return cudaGetLastError();
}

}  // namespace

// The head sizes the tensor-core kernels are built for (PYR_DISPATCH_MMA_HD), on a device
// whose tensor cores passed their check: every tensor-core path asks this.
bool attention_rows_mma_supported(Dt dt, int32_t head_dim) {
    return (head_dim == 64 || head_dim == 128) && tensor_cores(dt) == TensorCores::Usable;
}

bool attention_on_tensor_cores(Dt dt, int32_t max_q, int32_t head_dim, bool allow_tensor_cores) {
    return allow_tensor_cores && max_q >= kMmaMinQueries && attention_rows_mma_supported(dt, head_dim);
}

cudaError_t attention_rows_mma(Dt dt, const RowsMmaBatch& batch, int32_t n_head, int32_t n_head_kv,
                               int32_t head_dim, cudaStream_t stream) {
    if (batch.n_seq < 0 || batch.n_seq > kMaxBatch || n_head <= 0 || n_head_kv <= 0 ||
        n_head % n_head_kv != 0 || !attention_rows_mma_supported(dt, head_dim))
        return cudaErrorInvalidValue;
    int32_t max_rows, max_kv;
    rows_shape(batch, max_rows, max_kv);
    if (max_rows <= 0 || max_kv <= 0) return cudaSuccess;
    const dim3 grid(blocks_for(max_kv, kMmaKeys), blocks_for(max_rows, kMmaQueries), unsigned(batch.n_seq));
    PYR_DISPATCH_DT(dt, PYR_DISPATCH_MMA_HD(head_dim, (rows_mma_kernel<T, HD><<<grid, 128, mma_smem_bytes<T, HD>(), stream>>>(
                                                          batch, n_head, n_head_kv, query_scale(HD)))));
    return cudaGetLastError();
}

namespace attention_detail {

cudaError_t attention_mma(Dt dt, const AttnBatch& batch, int32_t max_q, int32_t n_head,
                          int32_t n_head_kv, int32_t head_dim, cudaStream_t stream) {
    PYR_DISPATCH_DT(dt, PYR_DISPATCH_MMA_HD(head_dim, return (launch_attention_mma<T, HD>(
                                                          batch, max_q, n_head, n_head_kv, stream))));
    return cudaErrorInvalidValue;
}

cudaError_t col_sums_mma(Dt dt, const AttnSeq& seq, int32_t n_head, int32_t n_head_kv,
                         int32_t head_dim, float* partial, cudaStream_t stream) {
    static_assert(kMmaQueries == kColSumQueries, "a block's queries are a row of partial");
    const dim3 grid(blocks_for(seq.n_kv, kMmaKeys), blocks_for(seq.n_q, kMmaQueries));
    PYR_DISPATCH_DT(dt, PYR_DISPATCH_MMA_HD(head_dim, (col_sums_mma_kernel<T, HD><<<grid, 128, mma_smem_bytes<T, HD>(), stream>>>(
                                                          seq, n_head, n_head_kv, query_scale(HD), partial))));
    return cudaGetLastError();
}

}  // namespace attention_detail
}  // namespace pyr::kernels
