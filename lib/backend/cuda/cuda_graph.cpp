#include "backend/cuda/cuda_graph.h"

#include <string>

#include "common/log.h"

namespace pyr::cuda {

namespace {
// Graphs kept: a few batch compositions (sessions joining and leaving) alternate.
constexpr size_t kMaxGraphs = 4;
}  // namespace

StepGraphs::StepGraphs(std::shared_ptr<Context> ctx, bool enabled)
    : ctx_(std::move(ctx)), enabled_(enabled) {
    if (enabled_) PYR_CUDA_CHECK(cudaStreamCreateWithFlags(&capture_stream_, cudaStreamNonBlocking));
}

StepGraphs::~StepGraphs() {
    for (Entry& e : entries_) cudaGraphExecDestroy(e.exec);
    if (capture_stream_) cudaStreamDestroy(capture_stream_);
}

// Records what `encode` queues (nothing runs) and instantiates it. Thread-local mode: other
// threads (sessions compacting their caches) may allocate and copy meanwhile. Null when the
// instantiation ran out of device memory (worth another try later); throws on other failures.
cudaGraphExec_t StepGraphs::capture(const std::function<void(cudaStream_t)>& encode) {
    cudaGraph_t graph = nullptr;
    PYR_CUDA_CHECK(cudaStreamBeginCapture(capture_stream_, cudaStreamCaptureModeThreadLocal));
    try {
        encode(capture_stream_);
    } catch (...) {
        cudaStreamEndCapture(capture_stream_, &graph);  // ends the broken capture
        if (graph) cudaGraphDestroy(graph);
        cudaGetLastError();
        throw;
    }
    PYR_CUDA_CHECK(cudaStreamEndCapture(capture_stream_, &graph));
    cudaGraphExec_t exec = nullptr;
    const cudaError_t err = cudaGraphInstantiate(&exec, graph, 0);
    cudaGraphDestroy(graph);
    if (err == cudaErrorMemoryAllocation) {
        cudaGetLastError();
        return nullptr;
    }
    if (err != cudaSuccess) fail_cuda(err, "cudaGraphInstantiate", __FILE__, __LINE__);
    return exec;
}

void StepGraphs::run(const Key& key, const std::function<void(cudaStream_t)>& encode,
                     bool with_cublas) {
    const cudaStream_t stream = ctx_->stream();
    auto launch_directly = [&] {
        ++stats_.direct;
        encode(stream);
    };
    if (!enabled_ || (with_cublas && !cublas_enabled_)) return launch_directly();
    for (auto it = entries_.begin(); it != entries_.end(); ++it)
        if (it->key == key) {
            entries_.splice(entries_.begin(), entries_, it);
            last_key_ = key;
            ++stats_.replays;
            PYR_CUDA_CHECK(cudaGraphLaunch(entries_.front().exec, stream));
            return;
        }
    const bool seen_last_step = key == last_key_;
    last_key_ = key;
    if (capture_pause_ > 0) --capture_pause_;
    if (!seen_last_step || capture_pause_ > 0) return launch_directly();
    cudaGraphExec_t exec = nullptr;
    try {
        exec = capture(encode);
    } catch (const Error& e) {
        PYR_LOG_WARN(std::string("cuda backend: capturing a decode step as a CUDA graph failed (") +
                     e.what() + "); " + (with_cublas ? "steps with cuBLAS projections" : "steps") +
                     " are launched directly from now on");
        (with_cublas ? cublas_enabled_ : enabled_) = false;
        return launch_directly();
    }
    if (!exec) {
        // the device is full for now (other processes, the caches): free what the cached
        // graphs hold and try again later rather than give up graphs for good
        if (!warned_out_of_memory_)
            PYR_LOG_WARN("cuda backend: cudaGraphInstantiate ran out of device memory; decode steps are "
                         "launched directly and captured again after " +
                         std::to_string(kCaptureRetrySteps) + " steps");
        warned_out_of_memory_ = true;
        for (Entry& cached : entries_) cudaGraphExecDestroy(cached.exec);
        entries_.clear();
        capture_pause_ = kCaptureRetrySteps;
        return launch_directly();
    }
    entries_.push_front({key, exec});
    if (entries_.size() > kMaxGraphs) {
        cudaGraphExecDestroy(entries_.back().exec);
        entries_.pop_back();
    }
    ++stats_.captures;
    PYR_CUDA_CHECK(cudaGraphLaunch(exec, stream));
}

}  // namespace pyr::cuda
