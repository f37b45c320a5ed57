// The CUDA backend: the LLaMA forward pass on an NVIDIA GPU for a batch of sequences (one
// stream; projections through cuda_linear, everything else through kernels/) and its KV
// storage: per (session, layer) paged caches in the model's 16-bit type, ragged -- each
// layer grows and shrinks on its own, by whole pages (kernels::kKvPageRows tokens), at
// either end.
#pragma once

#include <memory>
#include <mutex>
#include <optional>
#include <unordered_map>
#include <vector>

#include "backend/backend.h"
#include "backend/cuda/cuda_context.h"
#include "backend/cuda/cuda_graph.h"
#include "kernels/kernels.h"

namespace pyr::cuda {

// The KV caches' moves of rows in place (CudaKvStorage::retain), queued and run together by
// flush(): one upload of the jobs and their source lists from pinned memory, one launch
// (kernels::compact_rows, which also writes each cache's new gap into its page table), then
// the pages the moves emptied are freed (stream order: after the launch). The page tables
// keep their addresses, so a decode step's CUDA graph (keyed by them) replays after a move.
// One per backend, shared with every storage it makes; storages are pruned and destroyed by
// session threads while the engine's forward may run on another thread, so a mutex guards
// it. The backend flushes at the start of forward (what the policies' after_step queued) and
// after each of its retain loops.
class KvCompactor {
public:
    explicit KvCompactor(std::shared_ptr<Context> ctx)
        : ctx_(std::move(ctx)), uploaded_(std::make_unique<Event>()) {}

    // Queues: of the cache `table`'s rows (from slot `gap` on, keys and values of row_bytes),
    // rows keep[i] (ascending, within them) move to slots new_gap + i, every one toward the
    // front (new_gap + i <= gap + keep[i]) or, with toward_back, toward the back; the table's
    // gap becomes new_gap.
    // `emptied` (pages that hold no kept row afterwards) are freed once the move is queued. A
    // job pending for the same table is composed with this one (both in one job: they must
    // move the same way, pending() says which). Device memory for the job is taken now (an
    // out-of-memory error leaves nothing queued and `emptied` as it was).
    void add(const void* owner, void** table, size_t row_bytes, int32_t gap,
             const std::vector<int32_t>& keep, int32_t new_gap, bool toward_back,
             std::vector<DeviceBuffer>&& emptied);
    // The way the job pending for `table` moves its rows (true: toward the back), if any.
    std::optional<bool> pending(kernels::KvPages table);
    // Forgets owner's jobs (its pages are being freed).
    void drop(const void* owner);
    // Queues the pending jobs on the context's stream (the calling thread's device must be
    // the context's).
    void flush();

private:
    struct Job {
        const void* owner;
        void** table;
        size_t row_bytes;
        int32_t gap_before;        // the table's gap before the job
        int32_t dst0;              // the new gap: row i goes to slot dst0 + i
        bool toward_back;
        std::vector<int32_t> src;  // row i's slot before the job
        std::vector<DeviceBuffer> emptied;  // freed after the launch
    };
    // The entries of a job whose rows move ([lo, hi) of src), or none.
    static std::pair<int32_t, int32_t> moving(const Job& j);
    size_t bytes_for(size_t n_jobs, size_t n_src) const;
    void remove(size_t i);  // jobs_[i], the mutex held

    std::shared_ptr<Context> ctx_;
    std::mutex mutex_;
    std::vector<Job> jobs_;
    std::unordered_map<kernels::KvPages, size_t> index_;  // table -> its job in jobs_
    size_t n_src_ = 0;  // entries of the jobs' source lists
    PinnedBuffer host_;       // the jobs and source lists of the flushes in flight
    size_t host_used_ = 0;    // bytes of host_ whose copies may still be queued
    DeviceBuffer device_;     // the last flush's device copy, read by its launch
    std::unique_ptr<Event> uploaded_;  // recorded after the last flush's copy
};

class CudaKvStorage final : public KvStorage {
public:
    // back_moves false: a retain always moves the kept rows toward the front (for comparing)
    CudaKvStorage(std::shared_ptr<Context> ctx, std::shared_ptr<KvCompactor> compactor,
                  kernels::Dt dt, int n_layer, int32_t n_ctx, int32_t kv_dim, bool back_moves = true);
    ~CudaKvStorage() override;

    uint64_t bytes_per_token() const override { return 2 * uint64_t(kv_dim_) * 2; }
    // Moves the kept rows in place, toward the front or the back of the layer's rows,
    // whichever moves fewer (a job for the compactor; the host view changes now), and gives
    // back the pages that no longer hold any.
    void retain(int il, const std::vector<int32_t>& keep) override;
    void truncate(int il, int32_t n) override;
    uint64_t rows_moved() const override { return rows_moved_; }

    // Makes room for n_total rows in layer il: the pages that cover them. Returns the first
    // entry of host_table(il) that changed (table_entries(il) when none): the caller uploads
    // entries [that, table_entries(il)) to table(il) before a launch reads them. Flushes the
    // compactor first if the layer has a job pending (appends must follow it); past the
    // table's end, drops the entries of the pages wholly in the gap (the table shifts) and,
    // if still short, moves the rows to the front of their first page (queued and flushed).
    int32_t reserve(int il, int32_t n_total);
    void set_size(int il, int32_t n) { layers_[size_t(il)].size = n; }
    int32_t size(int il) const { return layers_[size_t(il)].size; }
    // Rows the layer can hold without a new page.
    int32_t capacity(int il) const {
        const Layer& l = layers_[size_t(il)];
        return int32_t(l.pages.size()) * kernels::kKvPageRows - l.gap();
    }
    // Layer il's page table (kernels.h: KvPages) on the device (its address never changes)
    // and on the host, and its entries in use.
    void** table(int il) const { return tables_.as<void*>() + int64_t(il) * (1 + max_pages_); }
    void* const* host_table(int il) const { return layers_[size_t(il)].table.data(); }
    int32_t table_entries(int il) const { return int32_t(layers_[size_t(il)].table.size()); }
    int32_t kv_dim() const { return kv_dim_; }
    // What a storage holds when all its layers are full (Backend::kv_storage_bytes).
    static uint64_t bytes_when_full(int n_layer, int32_t n_ctx, int32_t kv_dim);
    // The session's last logits when its step sampled on the device and left them there
    // (allocated on first use; Backend::read_logits copies them out). Null until then.
    float* last_logits(int32_t n_vocab);
    const float* last_logits() const { return last_logits_.as<float>(); }

private:
    struct Layer {
        // page i holds slots [i, i + 1) * kKvPageRows; pages wholly in the gap are empty
        std::vector<DeviceBuffer> pages;
        std::vector<void*> table{nullptr};  // as the device table holds it: the gap, the pages
        int32_t size = 0;
        int32_t stale_from = 1;  // entries of `table` from here on may differ on the device
        int32_t gap() const { return int32_t(reinterpret_cast<uintptr_t>(table[0])); }
        void set_gap(int32_t g) { table[0] = reinterpret_cast<void*>(uintptr_t(g)); }
    };
    static size_t page_bytes(int32_t kv_dim) { return 2 * size_t(kernels::kKvPageRows) * size_t(kv_dim) * 2; }
    static int32_t pages_for(int32_t n) { return (n + kernels::kKvPageRows - 1) / kernels::kKvPageRows; }
    void drop_gap_pages(Layer& layer);  // the table shifts

    std::shared_ptr<Context> ctx_;
    std::shared_ptr<KvCompactor> compactor_;
    kernels::Dt dt_;
    std::vector<Layer> layers_;
    int32_t n_ctx_, kv_dim_, max_pages_;
    bool back_moves_;
    uint64_t rows_moved_ = 0;
    DeviceBuffer tables_;  // (n_layer, 1 + max_pages_): each layer's gap, then its pages
    DeviceBuffer last_logits_;
};

class CudaBackend final : public Backend {
public:
    // Weights from a loaded model (F16 and BF16 stay as they are; F32 becomes F16).
    CudaBackend(std::shared_ptr<Context> ctx, std::shared_ptr<const Model> model);
    // Random weights of the config's shapes in `dt`, made on the device (benchmarks).
    CudaBackend(std::shared_ptr<Context> ctx, const ModelConfig& config, kernels::Dt dt,
                uint64_t seed);

    std::string device_name() const override { return "cuda:" + std::to_string(ctx_->device()); }
    std::unique_ptr<KvStorage> new_kv_storage(int32_t n_ctx) override;
    uint64_t kv_storage_bytes(int32_t n_ctx) const override;
    void forward(SequenceStep* batch, int n_seq) override;
    DeviceMemory device_memory() const override;
    BackendStats stats() const override;
    bool samples_on_device() const override { return sample_on_device_; }
    void read_logits(KvCache& cache, float* out) override;

private:
    struct LayerWeights {
        DeviceBuffer attn_norm, wqkv, bqkv, wo, bo, ffn_norm, w_gate_up, b_gate_up, w_down, b_down;
    };
    struct Weights {
        DeviceBuffer tok_embd, output_norm, output;  // output empty: tied to tok_embd
        std::vector<LayerWeights> layers;
    };
    struct Scratch {
        DeviceBuffer tokens, cos, sin, x, xn, qkv, att, lse, gu, h, x_tmp, cos_tmp, sin_tmp;
        DeviceBuffer rows_index, kv_len, obs, scores, logits, attn_partial;
        DeviceBuffer sample_rows, sampled, penalized;  // sampling: descriptors, tokens, ids
        int32_t n_rows = 0;  // rows the token buffers hold
        size_t kv_len_n = 0, obs_floats = 0, score_floats = 0, n_logits = 0, partial_floats = 0;
        size_t n_sample_rows = 0, n_penalized = 0;
    };
    // One sequence's tokens while they go through the layers.
    struct InFlight {
        int32_t row0 = 0, n = 0;          // rows [row0, row0 + n) of the batch buffers
        std::vector<int32_t> positions;   // of the rows still in flight
        bool first_prefill = false;
    };
    // One layer's launches over the batch: where each sequence's tokens and cache are. Any
    // number of sequences: the per-sequence kernels take kernels::kMaxBatch of them a launch
    // (attention_block, launch_rows), the projections all rows at once.
    struct LayerBatch {
        explicit LayerBatch(int n_seq)
            : row0(size_t(n_seq) + 1, 0), pages(size_t(n_seq)), slot0(size_t(n_seq), 0),
              attn(size_t(n_seq)), reqs(size_t(n_seq)), obs_rows(size_t(n_seq), 0) {}
        int n_seq() const { return int(attn.size()); }
        std::vector<int32_t> row0;            // sequence s has rows [row0[s], row0[s+1])
        std::vector<kernels::KvPages> pages;  // its cache's page table
        std::vector<int32_t> slot0;           // its first new cache slot
        const int32_t* kv_len = nullptr;      // device (n_seq): cache lengths (decode plans)
        std::vector<kernels::AttnSeq> attn;
        kernels::AttnSplit split;              // decode: each head's keys over several blocks
        std::vector<ObservationRequest> reqs;  // what each sequence's policy observes here
        // the attention rows it observes: from the raw scores attention() keeps (attn[s].scores)
        // or, where there are none, recomputed on the tensor cores (attention_rows_mma)
        std::vector<int32_t> obs_rows;
    };
    // An observation measured on the device, handed to the policy when it has arrived on
    // the host: in a first prefill during the same layer, otherwise after the step.
    struct Measured {
        int seq, il;
        int32_t n_rows, n_keys;
        size_t rows_off, sums_off;  // floats into the observation buffer; SIZE_MAX: none
    };
    struct DecodePlan;

    void init_common();
    void upload(const ModelWeights& w);
    void randomize(uint64_t seed);
    DeviceBuffer upload_tensor(const Tensor& t);
    DeviceBuffer upload_concat(std::initializer_list<const Tensor*> parts);
    void ensure_scratch(int32_t n_rows, int n_seq);
    void ensure_obs(size_t floats, size_t keep);
    void ensure_scores(size_t floats);
    int32_t attn_splits(int n_seq, int32_t max_bound) const;
    float* ensure_attn_partial(int n_seq, int32_t n_split);
    template <typename T> void stage_upload(void* dst, const T* src, size_t n);

    void forward_batch(SequenceStep* steps, int n_seq);
    LayerBatch describe_layer(int il, SequenceStep* steps, const std::vector<InFlight>& seqs);
    void reserve_kv(CudaKvStorage& kv, int il, int32_t n_total);
    void place_sequence(LayerBatch& lb, int s, int32_t row0, int32_t n, kernels::KvPages pages,
                        int32_t n_kv) const;
    void attention_block(int il, const LayerBatch& lb, int32_t n_rows, cudaStream_t st);
    void launch_rows(const std::vector<kernels::RowsSeq>& rows, cudaStream_t st) const;
    void launch_rows_mma(const std::vector<kernels::RowsMmaSeq>& rows, cudaStream_t st) const;
    void mlp_block(int il, int32_t n_rows, cudaStream_t st);
    void output_head(const float* x, int32_t n_out, cudaStream_t st);
    std::vector<Measured> measure_layer(int il, SequenceStep* steps, const LayerBatch& lb,
                                        const std::vector<InFlight>& seqs,
                                        std::vector<Measured>& deferred, size_t& obs_used);
    void decide_layer(SequenceStep* steps, const std::vector<Measured>& now,
                      std::vector<InFlight>& seqs);
    void shrink_rows(std::vector<InFlight>& seqs, const std::vector<std::vector<int32_t>>& kept);
    std::vector<int32_t> sample_tokens(SequenceStep* steps, const std::vector<int32_t>& out_seqs,
                                       cudaStream_t st);
    void finish_step(SequenceStep* steps, const std::vector<int32_t>& out_seqs,
                     const std::vector<Measured>& deferred, size_t obs_floats);

    bool decode_step(SequenceStep* steps, int n_seq);
    void encode_decode(const DecodePlan& plan, cudaStream_t st);

    std::shared_ptr<Context> ctx_;
    std::shared_ptr<const Model> model_;  // keeps the host weights' owner alive
    ModelConfig config_;
    kernels::Dt dt_;
    Weights w_;
    Scratch s_;
    PinnedBuffer stage_;     // host side of the step's uploads, used from the front
    size_t stage_used_ = 0;  // bytes of stage_ whose copies may still be queued
    PinnedBuffer readback_;  // logits and observations copied back
    std::unique_ptr<Event> obs_ready_;  // a first prefill's measurements of a layer are in readback_
    std::unique_ptr<StepGraphs> graphs_;
    std::shared_ptr<KvCompactor> compactor_;
    mutable std::mutex mutex_;  // one forward at a time: the scratch is shared
    int32_t q_dim_ = 0, kv_dim_ = 0, qkv_dim_ = 0;
    bool sample_on_device_ = true;  // PYRAMID_GPU_SAMPLING=0: the host samples (comparing)
    bool attention_on_tensor_cores_ = true;  // PYRAMID_TENSOR_CORE_ATTENTION=0: CUDA cores
    bool rows_on_tensor_cores_ = false;      // a prefill's observed rows: attention_rows_mma
    bool group_heads_ = true;  // PYRAMID_GROUPED_DECODE=0: a decode block per query head
    bool kv_back_moves_ = true;  // PYRAMID_KV_BACK_MOVES=0: KV rows only move to the front
    uint64_t device_samples_ = 0, undecided_samples_ = 0;  // BackendStats
    uint64_t prefill_attention_tc_ = 0, prefill_attention_cc_ = 0;  // BackendStats
};

}  // namespace pyr::cuda
