// Launch functions of the CUDA kernels (kernels/*.cu). Each takes device pointers, sizes
// and a stream, nothing else, queues its work and returns the launch's status
// (cudaGetLastError); the host side (lib/backend/cuda/) turns a failure into pyr::Error.
// Every kernel has its CPU reference in lib/backend/cpu/cpu_ops.h.
//
// Element types: weights, the activations fed to matrix products and the KV cache are in the
// model's 16-bit type `Dt` (F16 or BF16); the residual stream, projection outputs, RoPE and
// every accumulation are fp32. Matrices are row-major; "rows" of activations are tokens.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

namespace pyr::kernels {

enum class Dt { F16, BF16 };
inline size_t dt_size(Dt) { return 2; }

// x[t, :] = table[tokens[t], :] as fp32. table (n_vocab, n_embd) Dt; x (n, n_embd).
cudaError_t embed(Dt dt, const void* table, const int32_t* tokens, int32_t n, int32_t n_embd,
                  float* x, cudaStream_t stream);

// out[t, :] = Dt(x[t, :] / sqrt(mean(x[t, :]^2) + eps) * w). x (n, dim) fp32, w (dim) Dt,
// dim >= 1. Vector accesses when dim % 4 == 0 and x is 16-byte, w and out 8-byte aligned.
cudaError_t rmsnorm(Dt dt, const float* x, int32_t n, int32_t dim, const void* w, float eps,
                    void* out, cudaStream_t stream);

// y[t, :ncols] += b (ncols) Dt, for rows t < n of y with row stride ld.
cudaError_t add_bias(Dt dt, float* y, int32_t n, int32_t ncols, int32_t ld, const void* b,
                     cudaStream_t stream);

// out[t, i] = Dt(silu(gu[t, i]) * gu[t, n_ff + i]): gu (n, 2 n_ff) fp32 is the fused
// gate|up projection; out (n, n_ff).
cudaError_t silu_mul(Dt dt, const float* gu, int32_t n, int32_t n_ff, void* out,
                     cudaStream_t stream);

// y[t, r] = sum_c W[r, c] a[t, c] + beta * y[t, r] for t < n, r < rows, fp32 accumulation.
// W (rows, cols) Dt, a (n, cols) Dt, y (n, ld) fp32. For few tokens (n <= kGemvMaxTokens):
// one pass over W at memory speed. beta is 0 or 1 (1 fuses the residual add). When cols is a
// multiple of 8, W and a must be 16-byte aligned (cudaErrorMisalignedAddress otherwise): the
// rows are read 16 bytes at a time. The same holds for gemv_swiglu.
constexpr int kGemvMaxTokens = 8;
// Whether gemv and gemv_swiglu launch early on the current device (programmatic dependent
// launch, common.cuh): compute capability 9.0 or newer, the kernels built for it, no refused
// launch so far, and not turned off with PYRAMID_PDL=0. Always false on tools/cuda_sim.
bool early_launches(Dt dt);
cudaError_t gemv(Dt dt, const void* W, int32_t rows, int32_t cols, const void* a, int32_t n,
                 float* y, int32_t ld, float beta, cudaStream_t stream);
// The MLP's gate|up projection and SwiGLU in one pass, for n <= kGemvMaxTokens tokens:
// h[t, i] = Dt(silu(g) * u), g = W[i, :] . a[t, :], u = W[n_ff + i, :] . a[t, :] for t < n,
// i < n_ff. W (2 n_ff, cols) Dt is the fused gate|up matrix, a (n, cols) Dt, h (n, n_ff) Dt.
// The same bits as gemv (beta 0) into fp32 (n, 2 n_ff) followed by silu_mul.
cudaError_t gemv_swiglu(Dt dt, const void* W_gate_up, int32_t n_ff, int32_t cols, const void* a,
                        int32_t n, void* h, cudaStream_t stream);

// The KV caches are paged (one cache per (sequence, layer), lib/backend/cuda/): a page holds
// kKvPageRows slots of keys followed by kKvPageRows slots of values, a slot being kv_dim =
// n_head_kv * head_dim elements of Dt. A cache is a device array, its page table: entry 0
// holds, as an integer, the cache's gap (gap >= 0: the slots before its first row; the
// pages wholly within it may be gone, their entries stale), entries 1.. its pages in order;
// slot s is slot s % kKvPageRows of page s / kKvPageRows, and row j of the cache is slot
// gap + j. A cache grows and shrinks by whole pages, so ragged caches waste under two pages
// each; the gap lets a cache drop rows at its front by moving the few rows before them
// (StreamingLLM's sinks) instead of all those after them. The table's address never changes
// (a CUDA graph replays while the cache grows and shrinks). kKvPageRows consecutive rows of
// a cache span at most two pages.
constexpr int32_t kKvPageRows = 64;
using KvPages = void* const*;  // device array: the cache's gap, then its pages

// RoPE (HF rotate-half) and the KV append for a batch of sequences, one launch. qkv (N,
// q_dim + 2 kv_dim) fp32 is the fused projection of all N tokens (sequence s owns rows
// [row0[s], row0[s+1]), row0[0] = 0, non-decreasing). Rotates q in place and writes rotated k
// and v as Dt to sequence s's cache rows [slot0[s], slot0[s] + its tokens). cos, sin (N,
// head_dim/2). head_dim even; any n_head, n_head_kv.
constexpr int kMaxBatch = 64;  // sequences per launch (descriptors travel by value); the
                                // backend launches a larger batch in parts
struct RopeStoreBatch {
    int32_t n_seq = 0;
    int32_t row0[kMaxBatch + 1] = {};
    KvPages pages[kMaxBatch] = {};  // sequence s's cache (pages covering its new rows)
    int32_t slot0[kMaxBatch] = {};
    // optional device array (n_seq): each sequence's cache length AFTER this append; when
    // set, sequence s's first slot is read on the device as kv_len[s] - (row0[s+1] - row0[s])
    // and slot0 is ignored (CUDA graphs replay a step whose lengths change)
    const int32_t* kv_len = nullptr;
};
cudaError_t rope_store(Dt dt, float* qkv, const RopeStoreBatch& batch, int32_t n_head,
                       int32_t n_head_kv, int32_t head_dim, const float* cos, const float* sin,
                       cudaStream_t stream);

// Causal attention of one sequence's n_q queries over its n_kv cached keys, the queries
// being the last n_q of them: query i sees keys j <= n_kv - n_q + i. Never materialises
// the score matrix (online softmax over key tiles).
struct AttnSeq {
    const float* q = nullptr;  // (n_q, q_stride) fp32, already rotated; head h at h*head_dim
    int32_t q_stride = 0;
    int32_t n_q = 0;
    KvPages pages = nullptr;   // the cache: pages covering the keys and values it reads
                               // (n_kv rows, or the true count of kv_len below)
    int32_t n_kv = 0;
    void* out = nullptr;       // (n_q, n_head*head_dim) Dt
    float* lse = nullptr;      // (n_q, n_head) log2-sum-exp2 of the scaled scores, for observe
    float* scores = nullptr;   // optional: raw scores (log2 units) of queries scores_from..,
    int32_t scores_from = 0;   // (n_q - scores_from, n_head, n_kv); keys a query cannot see
                               // hold -inf or are left unwritten (read only the visible ones)
};
struct AttnBatch {
    int32_t n_seq = 0;
    AttnSeq seq[kMaxBatch];
    // Optional device array (n_seq): sequence s's true key count, read on the device (a
    // captured CUDA graph replays its launch arguments while the caches grow).
    // seq[s].n_kv is then an upper bound (e.g. the cache capacity) that shapes the launch
    // and is the row stride of `scores`; queries stay the last n_q of the kv_len[s] keys
    // (n_q <= kv_len[s] <= n_kv; the kernel clamps to that range).
    const int32_t* kv_len = nullptr;
};
// Decode split: when every sequence has at most one query, each (sequence, head)'s keys
// may be split over n_split blocks (whole 32-key tiles each, a split past the true count
// walks none), whose partial softmaxes a second launch merges: more blocks than
// n_seq * n_head where that leaves the device idle. partial: a device workspace of
// attention_split_floats(n_seq, n_head, head_dim, n_split) floats (not kept). The caller
// chooses n_split (attention_splits) and passes it explicitly, so that a captured graph
// replays the same shape; n_split = 1 is the one-launch kernel.
constexpr int32_t kMaxAttnSplits = 16;
struct AttnSplit {
    int32_t n_split = 1;
    float* partial = nullptr;
};
// The blocks a decode launch (fewer than 8 queries a sequence) gives each query along the
// heads: one per KV head where it groups them (group_heads, grouped-query attention with 2
// to 8 query heads a KV head, head_dim 33..128): such a block computes its group's query
// heads over each key and value it loads, so the cache is read once, not once per query
// head; otherwise one per query head. The same results, bit for bit, either way.
int32_t attention_decode_head_blocks(int32_t n_head, int32_t n_head_kv, int32_t head_dim,
                                     bool group_heads = true);
// n_split for a decode batch: about 2 blocks per SM in all, each split at least 256 keys of
// max_kv (the launch's bound: with graphs, the caches' capacity), at most kMaxAttnSplits;
// 1 when n_seq * head_blocks blocks (attention_decode_head_blocks) already fill the n_sm SMs.
int32_t attention_splits(int32_t n_seq, int32_t head_blocks, int32_t max_kv, int32_t n_sm);
size_t attention_split_floats(int32_t n_seq, int32_t n_head, int32_t head_dim, int32_t n_split);

// head_dim: even, <= 256. Query head h reads KV head h / (n_head / n_head_kv).
// split.n_split must be in [1, kMaxAttnSplits]; n_split > 1 needs split.partial and at most
// one query per sequence (cudaErrorInvalidValue otherwise).
// allow_tensor_cores: a launch where some sequence has 16 or more queries (a prefill) runs
// on the tensor cores when head_dim is 64 or 128 and tensor_cores(dt) is Usable
// (attention_on_tensor_cores says), otherwise, or with false, on the CUDA cores. The same
// results within rounding: the fp32 query enters the tensor cores as two 16-bit terms, so
// scores and lse keep nearly fp32 accuracy (22 bits of the query with fp16, 16 with bf16);
// the probabilities meet V rounded to Dt.
// group_heads: a decode launch groups the query heads of a KV head in one block where
// attention_decode_head_blocks(..., true) says so (false: a block per query head).
cudaError_t attention(Dt dt, const AttnBatch& batch, int32_t n_head, int32_t n_head_kv,
                      int32_t head_dim, cudaStream_t stream, const AttnSplit& split = {},
                      bool allow_tensor_cores = true, bool group_heads = true);
// Whether attention() runs a launch whose longest sequence has max_q queries on the tensor
// cores of the current device.
bool attention_on_tensor_cores(Dt dt, int32_t max_q, int32_t head_dim,
                               bool allow_tensor_cores = true);

// Whether the library's kernels can run on the current device (device.cu): cudaSuccess, or
// the runtime's refusal when the build has no code for its architecture (no matching
// binary, nor PTX it can compile).
cudaError_t kernels_runnable();

// The current device's tensor cores for the kernels that use them (device.cu): Usable
// when its compute capability is 8.0 or newer, the kernels are built for it, and a check
// run on it once per (device, Dt) finds the register layout common.cuh assumes (exact
// products of small integers; a few microseconds, one small allocation outside any budget).
// Absent: too old a device or build. LayoutMismatch: the check's products came out wrong.
// Unchecked: the check could not run (asked again next time).
enum class TensorCores { Usable, Absent, LayoutMismatch, Unchecked };
TensorCores tensor_cores(Dt dt);
const char* tensor_cores_name(TensorCores t);

// What KV policies observe (kv_policy.h), exact softmax probabilities averaged over the
// query heads, from what attention() stored:
// attention_rows: for each sequence of the batch (one launch), rows (n_rows, n_kv) of n_rows
// consecutive queries from their raw scores (n_rows, n_head, n_kv) and lse (n_rows, n_head);
// row r sees keys j <= first_limit + r (first_limit = n_kv - n_q + the first row's query
// index), 0 elsewhere. kv_len (optional): a device pointer to ONE value, the sequence's true
// key count; n_kv is then the row stride of scores and of rows and bounds the launch,
// first_limit is taken relative to the true count (first_limit + (*kv_len - n_kv)) and
// rows[r, j] = 0 for j >= *kv_len.
struct RowsSeq {
    const float* scores = nullptr;
    const float* lse = nullptr;
    float* rows = nullptr;
    int32_t n_rows = 0, n_kv = 0, first_limit = 0;
    const int32_t* kv_len = nullptr;
};
struct RowsBatch {
    int32_t n_seq = 0;
    RowsSeq seq[kMaxBatch];
};
cudaError_t attention_rows(const RowsBatch& batch, int32_t n_head, cudaStream_t stream);
// attention_rows_mma: the same rows without raw scores stored for them (AttnSeq::scores
// unset): recomputed from the queries, the cache and lse on the tensor cores, bit for bit
// what attention() on the tensor cores and attention_rows give. A prefill's observation
// then takes n_rows * n_kv floats instead of n_head times more (pyramid observes the last
// fifth of a prompt: 7B at 4096 tokens, 430 MB of raw scores). Only where
// attention_rows_mma_supported (cudaErrorInvalidValue otherwise).
struct RowsMmaSeq {
    const float* q = nullptr;    // (n_rows, q_stride) fp32, rotated: the observed queries
    int32_t q_stride = 0;
    KvPages pages = nullptr;     // the cache (n_kv rows)
    const float* lse = nullptr;  // (n_rows, n_head), from attention()
    float* rows = nullptr;       // (n_rows, n_kv)
    int32_t n_rows = 0, n_kv = 0, first_limit = 0;  // row r sees keys <= first_limit + r
};
struct RowsMmaBatch {
    int32_t n_seq = 0;
    RowsMmaSeq seq[kMaxBatch];
};
bool attention_rows_mma_supported(Dt dt, int32_t head_dim);
cudaError_t attention_rows_mma(Dt dt, const RowsMmaBatch& batch, int32_t n_head, int32_t n_head_kv,
                               int32_t head_dim, cudaStream_t stream);
// attention_col_sums: col_sums (n_kv), zeroed beforehand, += the probabilities summed over
// all of the sequence's queries (recomputed from q, k and lse), on the cores that made its
// lse: launch_max_q is the longest sequence's query count in that attention() launch (0:
// the sequence's own), which attention_on_tensor_cores decides by. Each block of
// kColSumQueries queries writes its sums to a row of `partial` (device,
// attention_col_sums_partial_floats), which are then added in order: the same bits every
// run (float atomics would add in the blocks' order of finishing).
constexpr int32_t kColSumQueries = 64;
size_t attention_col_sums_partial_floats(int32_t n_q, int32_t n_kv);
cudaError_t attention_col_sums(Dt dt, const AttnSeq& seq, int32_t n_head, int32_t n_head_kv,
                               int32_t head_dim, float* col_sums, float* partial,
                               cudaStream_t stream, bool allow_tensor_cores = true,
                               int32_t launch_max_q = 0);

// dst[i, :] = src[index[i], :] for i < n, rows of row_bytes (a multiple of 4): the rows of a
// shrinking prefill, the last tokens' rows for the output head. src and dst must not overlap.
cudaError_t gather_rows(const void* src, size_t row_bytes, const int32_t* index, int32_t n,
                        void* dst, cudaStream_t stream);

// Moves of rows within many paged KV caches, in place, in one launch (the caches' retain):
// for each job, slot src[i] (device memory, n entries, strictly ascending) moves to slot
// dst0 + i for i < n, either every row toward the front (src[i] >= dst0 + i; done in
// ascending order) or, with toward_back, every row toward the back (src[i] <= dst0 + i;
// descending). Slot s is at byte offset + (s % kKvPageRows) * row_bytes of the table's page
// s / kKvPageRows (offset 0: the keys of a KV cache, kKvPageRows * row_bytes: its values);
// the table's gap entry is not read, and gap >= 0 writes it (the cache's new gap). Only the
// dst slots and the gap entry are written. Pages are 16-byte aligned (as cudaMalloc gives);
// any row_bytes: 16-byte words when row_bytes and offset are multiples of 16, else 4-byte
// words, else bytes. Jobs must not share slots, nor two jobs write one table's gap.
// jobs: a device array of n_jobs. max_row_bytes (> 0) sizes the launch: one block per
// 1 KiB column slice of such rows per job (wider rows are still done, by fewer blocks).
struct CompactJob {
    void** table = nullptr;        // device: the cache's page table (see KvPages)
    const int32_t* src = nullptr;  // device
    uint64_t offset = 0;           // bytes into each page
    uint64_t row_bytes = 0;
    int32_t n = 0, dst0 = 0;
    int32_t toward_back = 0;       // 1: the rows move toward the back
    int32_t gap = -1;              // >= 0: written to the table's gap entry
};
cudaError_t compact_rows(const CompactJob* jobs, int32_t n_jobs, size_t max_row_bytes,
                         cudaStream_t stream);

// out[i] = Dt(in[i]) for i < n (F32 checkpoints are converted on the device).
cudaError_t convert_f32(Dt dt, const float* in, int64_t n, void* out, cudaStream_t stream);

// out[i] = Dt(offset + scale * u) with u uniform in [-1, 1) from a counter hash of
// (seed, i): random weights of real shapes for benchmarks.
cudaError_t fill_random(Dt dt, void* out, int64_t n, uint64_t seed, float scale, float offset,
                        cudaStream_t stream);

// Token sampling on the device: the token pyr::Sampler::sample_with (lib/engine/sampler.h)
// picks from the same logits and SampleDraw (repetition penalty, then greedy,
// or top-k -> softmax(logit / temperature) -> min-p -> top-p -> a draw best first; the draw
// is the shared draw_from_prefix of lib/engine/sampling_rules.h).
// One row to sample: the raw logits and the sampler's settings (lib/engine/sampler.h).
struct SampleRow {
    const float* logits = nullptr;         // device, (n_vocab) raw logits
    float temperature = 0;                 // <= 0: greedy
    int32_t top_k = 0;                     // 0 or >= n_vocab: off
    float top_p = 1, min_p = 0, repeat_penalty = 1;
    const int32_t* penalized = nullptr;    // device, n_penalized distinct ids in [0, n_vocab)
    int32_t n_penalized = 0;
    double u = 0;                          // SampleDraw::u
};
constexpr int kSampleCandidates = 1024;
// out[r] = the token Sampler::sample_with(rows[r]'s logits, n_vocab, draw) picks, or -1
// when that depends on candidates past the best kSampleCandidates (then the host samples
// from the logits with the same u). rows and out are device arrays of n_rows.
// Exact for greedy. For top-k with k <= kSampleCandidates the arithmetic is the host's, in
// its order, but exp is CUDA's (within an ulp of the host's libm); otherwise the softmax's
// sum over the whole set is also a block reduction whose last bits may differ from the
// CPU's id-order sum. Either way a different token only when u falls on a boundary.
// n_vocab in [1, kSampleMaxVocab] (a bitmap of the penalized ids in shared memory), n_rows
// >= 0; cudaErrorInvalidValue otherwise.
constexpr int32_t kSampleMaxVocab = 48 * 1024 * 8;  // 393216
cudaError_t sample_rows(const SampleRow* rows, int32_t n_rows, int32_t n_vocab, int32_t* out,
                        cudaStream_t stream);

}  // namespace pyr::kernels
