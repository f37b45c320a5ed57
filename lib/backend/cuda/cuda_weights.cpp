// The CUDA backend's weights: uploaded from a loaded model in their own 16-bit type (F32
// converted to F16), the projections that read the same input fused into one matrix, or
// made on the device at random (benchmarks).
#include <algorithm>
#include <cmath>
#include <cstring>

#include "backend/cuda/cuda_backend.h"
#include "common/log.h"

namespace pyr::cuda {

namespace {

DType host_dtype(kernels::Dt dt) { return dt == kernels::Dt::F16 ? DType::F16 : DType::BF16; }

}  // namespace

DeviceBuffer CudaBackend::upload_concat(std::initializer_list<const Tensor*> parts) {
    int64_t total = 0;
    for (const Tensor* t : parts) {
        if (!*t) return {};  // an absent optional bias (all parts are absent together)
        total += t->rows * t->cols;
    }
    DeviceBuffer buf = ctx_->alloc(size_t(total) * 2, Use::Weights);
    int64_t offset = 0;
    std::vector<float> staging;
    // Everything on the engine's stream (the buffers are stream-ordered allocations);
    // staging from pageable memory completes before each copy call returns.
    for (const Tensor* t : parts) {
        const int64_t n = t->rows * t->cols;
        char* dst = buf.as<char>() + offset * 2;
        if (t->dtype == host_dtype(dt_)) {
            PYR_CUDA_CHECK(cudaMemcpyAsync(dst, t->data, size_t(n) * 2, cudaMemcpyHostToDevice,
                                           ctx_->stream()));
        } else {  // F32 (or the other 16-bit type): widen on the host, narrow on the device
            staging.resize(size_t(n));
            convert_to_f32(t->dtype, t->data, staging.data(), size_t(n));
            DeviceBuffer tmp = ctx_->alloc(size_t(n) * 4, Use::Scratch);
            PYR_CUDA_CHECK(cudaMemcpyAsync(tmp.get(), staging.data(), size_t(n) * 4,
                                           cudaMemcpyHostToDevice, ctx_->stream()));
            PYR_CUDA_CHECK(kernels::convert_f32(dt_, tmp.as<float>(), n, dst, ctx_->stream()));
        }
        offset += n;
    }
    return buf;
}

DeviceBuffer CudaBackend::upload_tensor(const Tensor& t) { return upload_concat({&t}); }

void CudaBackend::upload(const ModelWeights& w) {
    const ModelConfig& c = config_;
    if (int(w.layers.size()) != c.n_layer)
        fail(PYR_ERR_INVALID_ARGUMENT, "cuda backend: " + std::to_string(w.layers.size()) +
                                           " layers of weights for n_layer " + std::to_string(c.n_layer));
    PYR_LOG_INFO("cuda backend: uploading weights");
    w_.tok_embd = upload_tensor(w.tok_embd);
    w_.output_norm = upload_tensor(w.output_norm);
    if (w.output.data != w.tok_embd.data) w_.output = upload_tensor(w.output);
    for (const pyr::LayerWeights& L : w.layers) {
        LayerWeights d;
        d.attn_norm = upload_tensor(L.attn_norm);
        d.wqkv = upload_concat({&L.wq, &L.wk, &L.wv});
        d.bqkv = upload_concat({&L.bq, &L.bk, &L.bv});
        d.wo = upload_tensor(L.wo);
        d.bo = upload_tensor(L.bo);
        d.ffn_norm = upload_tensor(L.ffn_norm);
        d.w_gate_up = upload_concat({&L.w_gate, &L.w_up});
        d.b_gate_up = upload_concat({&L.b_gate, &L.b_up});
        d.w_down = upload_tensor(L.w_down);
        d.b_down = upload_tensor(L.b_down);
        w_.layers.push_back(std::move(d));
    }
    ctx_->sync();
}

void CudaBackend::randomize(uint64_t seed) {
    const ModelConfig& c = config_;
    uint64_t stream_id = 0;
    // Uniform weights scaled by 1/sqrt(fan-in) keep activations O(1); norms near 1.
    auto make = [&](int64_t rows, int64_t cols, float scale, float offset) {
        DeviceBuffer b = ctx_->alloc(size_t(rows * cols) * 2, Use::Weights);
        PYR_CUDA_CHECK(kernels::fill_random(dt_, b.get(), rows * cols, seed + 1000003 * ++stream_id,
                                            scale, offset, ctx_->stream()));
        return b;
    };
    auto matrix = [&](int64_t rows, int64_t cols) {
        return make(rows, cols, 1.0f / std::sqrt(float(cols)), 0.0f);
    };
    auto norm = [&](int64_t n) { return make(n, 1, 0.1f, 1.0f); };
    w_.tok_embd = make(c.n_vocab, c.n_embd, 1.0f, 0.0f);
    w_.output_norm = norm(c.n_embd);
    if (!c.tie_word_embeddings) w_.output = matrix(c.n_vocab, c.n_embd);
    for (int il = 0; il < c.n_layer; ++il) {
        LayerWeights d;
        d.attn_norm = norm(c.n_embd);
        d.wqkv = matrix(qkv_dim_, c.n_embd);
        d.wo = matrix(c.n_embd, q_dim_);
        d.ffn_norm = norm(c.n_embd);
        d.w_gate_up = matrix(2 * int64_t(c.n_ff), c.n_embd);
        d.w_down = matrix(c.n_embd, c.n_ff);
        w_.layers.push_back(std::move(d));
    }
    ctx_->sync();
}

}  // namespace pyr::cuda
