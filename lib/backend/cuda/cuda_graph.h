// Decode steps replayed as CUDA graphs. A batch-1 decode step of a 7B model is ~290 kernel
// launches of a few microseconds each; replaying them as one graph takes the launch gaps and
// the host's launch calls out of the step. A step's work is described by a key (every
// pointer and size its launches use; what changes each step, like the cache lengths, is read
// by the kernels from device memory): a key seen in two consecutive steps is captured, and
// replayed while later steps have the same key. A key seen once (the first step after the
// batch changed or a cache's length bound doubled) is launched directly, never captured in
// vain; the KV policies' moves keep the keys (the page tables stay where they are).
#pragma once

#include <cstdint>
#include <functional>
#include <list>
#include <memory>
#include <vector>

#include "backend/cuda/cuda_context.h"

namespace pyr::cuda {

class StepGraphs {
public:
    using Key = std::vector<uint64_t>;
    struct Stats {
        uint64_t captures = 0, replays = 0, direct = 0;
    };

    // `enabled` false: every step is launched directly (PYRAMID_CUDA_GRAPHS=0).
    StepGraphs(std::shared_ptr<Context> ctx, bool enabled);
    ~StepGraphs();
    StepGraphs(const StepGraphs&) = delete;
    StepGraphs& operator=(const StepGraphs&) = delete;

    // Queues the step's work on the context's stream: replays the graph of `key`, or
    // captures `encode` into one, or calls encode(ctx.stream()) directly. `encode` queues all
    // of its work on the stream it is given and must neither allocate nor wait (it may run
    // inside a capture). `with_cublas`: the step's projections are cuBLAS calls (batches
    // past the gemv kernel's tokens). A failed capture runs the step directly. When the
    // graph's instantiation ran out of device memory (it allocates, outside max_device_bytes)
    // the cached graphs are given back and steps are captured again kCaptureRetrySteps steps
    // later; any other failure turns graphs off, with a warning, for such steps (with_cublas)
    // or for all.
    static constexpr uint64_t kCaptureRetrySteps = 64;
    void run(const Key& key, const std::function<void(cudaStream_t)>& encode, bool with_cublas);

    bool enabled() const { return enabled_; }
    const Stats& stats() const { return stats_; }

private:
    struct Entry {
        Key key;
        cudaGraphExec_t exec = nullptr;
    };
    cudaGraphExec_t capture(const std::function<void(cudaStream_t)>& encode);

    std::shared_ptr<Context> ctx_;
    bool enabled_;
    bool cublas_enabled_ = true;             // false after a step with cuBLAS failed to capture
    uint64_t capture_pause_ = 0;             // steps left before capturing again after running out of memory
    bool warned_out_of_memory_ = false;
    cudaStream_t capture_stream_ = nullptr;  // private: no other thread's work can join a capture
    std::list<Entry> entries_;               // most recently used first
    Key last_key_;
    Stats stats_;
};

}  // namespace pyr::cuda
