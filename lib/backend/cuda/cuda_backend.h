// The CUDA backend: the LLaMA forward pass on an NVIDIA GPU for a batch of sequences (one
// stream; projections through cuda_linear, everything else through kernels/), in files by
// part: cuda_backend.cpp (construction, scratch, the forward pass and its end),
// cuda_weights.cpp, cuda_observe.cpp (the KV policies' measurements and decisions),
// cuda_decode.cpp (decode steps, CUDA graphs); the KV storage is cuda_kv_storage.h.
#pragma once

#include <memory>
#include <mutex>
#include <vector>

#include "backend/backend.h"
#include "backend/cuda/cuda_context.h"
#include "backend/cuda/cuda_graph.h"
#include "backend/cuda/cuda_kv_storage.h"
#include "kernels/kernels.h"

namespace pyr::cuda {

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
        DeviceBuffer col_partial;  // H2O's column sums per block of queries (one at a time)
        DeviceBuffer sample_rows, sampled, penalized;  // sampling: descriptors, tokens, ids
        int32_t n_rows = 0;  // rows the token buffers hold
        size_t obs_floats = 0;  // the others' sizes: their bytes() (grow_scratch)
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
              attn(size_t(n_seq)), launch_max_q(size_t(n_seq), 1), reqs(size_t(n_seq)),
              obs_rows(size_t(n_seq), 0) {}
        int n_seq() const { return int(attn.size()); }
        std::vector<int32_t> row0;            // sequence s has rows [row0[s], row0[s+1])
        std::vector<kernels::KvPages> pages;  // its cache's page table
        std::vector<int32_t> slot0;           // its first new cache slot
        const int32_t* kv_len = nullptr;      // device (n_seq): cache lengths (decode plans)
        std::vector<kernels::AttnSeq> attn;
        // the most queries of a sequence in s's attention launch (kMaxBatch sequences a
        // launch; 1 in a decode step), which decides the launch's cores
        // (kernels::attention_on_tensor_cores)
        std::vector<int32_t> launch_max_q;
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
    void allocate_rows(int32_t n_rows);  // the per-row buffers, for exactly n_rows
    void grow_scratch(DeviceBuffer& b, size_t bytes);
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
    static int32_t decode_bound(int32_t capacity);

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
    bool group_heads_ = true;  // PYRAMID_GROUPED_DECODE=0: a decode block per query head
    bool kv_back_moves_ = true;  // PYRAMID_KV_BACK_MOVES=0: KV rows only move to the front
    uint64_t device_samples_ = 0, undecided_samples_ = 0;  // BackendStats
    uint64_t prefill_attention_tc_ = 0, prefill_attention_cc_ = 0;  // BackendStats
};

}  // namespace pyr::cuda
