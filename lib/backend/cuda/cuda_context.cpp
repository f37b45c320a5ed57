#include "backend/cuda/cuda_context.h"

#include <algorithm>

#include "common/log.h"
#include "kernels/kernels.h"

// The architectures the kernels were built for (CMake sets it; tools/cuda_sim does not).
#ifndef PYR_CUDA_ARCHITECTURES
#define PYR_CUDA_ARCHITECTURES "?"
#endif

namespace pyr::cuda {

void fail_cuda(cudaError_t err, const char* what, const char* file, int line) {
    cudaGetLastError();  // clear a sticky launch error so later calls report their own
    const pyr_status st = err == cudaErrorMemoryAllocation ? PYR_ERR_OUT_OF_MEMORY : PYR_ERR_INTERNAL;
    fail(st, std::string("CUDA error ") + cudaGetErrorName(err) + " (" + cudaGetErrorString(err) +
                 ") in " + what + " at " + file + ":" + std::to_string(line));
}

void fail_cublas(cublasStatus_t st, const char* what, const char* file, int line) {
    fail(st == CUBLAS_STATUS_ALLOC_FAILED ? PYR_ERR_OUT_OF_MEMORY : PYR_ERR_INTERNAL,
         std::string("cuBLAS error ") + cublasGetStatusString(st) + " in " + what + " at " +
             file + ":" + std::to_string(line));
}

DeviceGuard::DeviceGuard(int device) {
    int current = -1;
    PYR_CUDA_CHECK(cudaGetDevice(&current));
    if (current == device) return;
    PYR_CUDA_CHECK(cudaSetDevice(device));
    previous_ = current;
}

DeviceGuard::DeviceGuard(int device, std::nothrow_t) noexcept {
    int current = -1;
    if (cudaGetDevice(&current) != cudaSuccess || current == device) return;
    if (cudaSetDevice(device) == cudaSuccess) previous_ = current;
}

DeviceGuard::~DeviceGuard() {
    if (previous_ >= 0) cudaSetDevice(previous_);
}

int device_count() {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        cudaGetLastError();
        return 0;
    }
    return n;
}

std::shared_ptr<Context> Context::open(int index, uint64_t max_bytes) {
    const int n = device_count();
    if (index < 0 || index >= n)
        fail(PYR_ERR_UNSUPPORTED, "device cuda:" + std::to_string(index) + ": " +
                                      (n == 0 ? std::string("no CUDA device is present (or no driver)")
                                              : "only " + std::to_string(n) + " CUDA device(s) found"));
    auto ctx = std::shared_ptr<Context>(new Context());
    ctx->device_ = index;
    const DeviceGuard on_device(index);
    cudaDeviceProp prop{};
    PYR_CUDA_CHECK(cudaGetDeviceProperties(&prop, index));
    if (prop.major < 7)
        fail(PYR_ERR_UNSUPPORTED, std::string("device cuda:") + std::to_string(index) + " (" +
                                      prop.name + ") has compute capability " +
                                      std::to_string(prop.major) + "." + std::to_string(prop.minor) +
                                      "; pyramid needs 7.0 or newer");
    if (const cudaError_t e = kernels::kernels_runnable(); e != cudaSuccess) {
        const std::string cc = std::to_string(prop.major) + std::to_string(prop.minor);
        fail(PYR_ERR_UNSUPPORTED,
             std::string("device cuda:") + std::to_string(index) + " (" + prop.name +
                 ", compute capability " + std::to_string(prop.major) + "." +
                 std::to_string(prop.minor) + "): this build of pyramid has no CUDA kernels it can run (" +
                 cudaGetErrorString(e) + "; built for CUDA architectures " PYR_CUDA_ARCHITECTURES
                 "); rebuild with -DCMAKE_CUDA_ARCHITECTURES=" + cc + ", or use the CPU");
    }
    ctx->name_ = prop.name;
    ctx->sm_count_ = prop.multiProcessorCount;
    size_t free_b = 0, total_b = 0;
    PYR_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
    ctx->budget_ = max_bytes ? max_bytes : uint64_t(total_b);
    // what cuBLAS recommends, but no more than 1/64 of a tight budget (cuBLAS then takes
    // algorithms that fit), 256-byte aligned
    const uint64_t ws = std::min<uint64_t>(uint64_t(prop.major >= 9 ? 32 : 4) << 20, ctx->budget_ / 64);
    ctx->gemm_ws_bytes_ = size_t(ws & ~uint64_t(255));
    // A stream-ordered pool of the engine's own that keeps freed blocks instead of returning
    // them at each sync (KV compaction and growing scratch allocate and free every few
    // steps), and gives everything back when the engine closes; the device's default pool,
    // which the application may use too, is left as it is.
    cudaMemPoolProps props{};
    props.allocType = cudaMemAllocationTypePinned;
    props.location.type = cudaMemLocationTypeDevice;
    props.location.id = index;
    PYR_CUDA_CHECK(cudaMemPoolCreate(&ctx->pool_, &props));
    uint64_t keep_all = UINT64_MAX;
    PYR_CUDA_CHECK(cudaMemPoolSetAttribute(ctx->pool_, cudaMemPoolAttrReleaseThreshold, &keep_all));
    PYR_CUDA_CHECK(cudaStreamCreateWithFlags(&ctx->stream_, cudaStreamNonBlocking));
    PYR_CUBLAS_CHECK(cublasCreate(&ctx->cublas_));
    PYR_CUBLAS_CHECK(cublasSetStream(ctx->cublas_, ctx->stream_));
    if (ctx->gemm_ws_bytes_ > 0) ctx->gemm_ws_ = ctx->raw_alloc(ctx->gemm_ws_bytes_, Use::Scratch);
    PYR_LOG_INFO("cuda:" + std::to_string(index) + " " + ctx->name_ + ", " +
                 std::to_string(free_b >> 20) + " MiB free, budget " +
                 std::to_string(ctx->budget_ >> 20) + " MiB");
    return ctx;
}

Context::~Context() {
    const DeviceGuard on_device(device_, std::nothrow);
    if (stream_) cudaStreamSynchronize(stream_);
    if (cublas_) cublasDestroy(cublas_);
    if (gemm_ws_) raw_free(gemm_ws_, gemm_ws_bytes_, Use::Scratch);  // stream-ordered
    if (stream_) cudaStreamDestroy(stream_);  // returns at once; the free still runs
    // its memory goes back to the device once the frees still queued have run
    if (pool_) cudaMemPoolDestroy(pool_);
}

void Context::sync() const { PYR_CUDA_CHECK(cudaStreamSynchronize(stream_)); }

MemoryUse Context::memory() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return use_;
}

static uint64_t& counter(MemoryUse& u, Use use) {
    return use == Use::Weights ? u.weights : use == Use::Kv ? u.kv : u.scratch;
}

void* Context::raw_alloc(size_t bytes, Use use) {
    {
        std::lock_guard<std::mutex> lock(mutex_);
        if (use_.total() + bytes > budget_)
            fail(PYR_ERR_OUT_OF_MEMORY,
                 "device memory budget exceeded: " + std::to_string(bytes) + " more bytes for " +
                     (use == Use::Weights ? "weights" : use == Use::Kv ? "the KV cache" : "scratch") +
                     " on top of " + std::to_string(use_.total()) + " in use (weights " +
                     std::to_string(use_.weights) + ", KV " + std::to_string(use_.kv) +
                     ", scratch " + std::to_string(use_.scratch) + ") would pass the budget of " +
                     std::to_string(budget_) + " (max_device_bytes)");
        counter(use_, use) += bytes;
        use_.peak = std::max(use_.peak, use_.total());
    }
    void* p = nullptr;
    const DeviceGuard on_device(device_, std::nothrow);  // a failure shows in the allocation
    // Stream-ordered: freeing does not stall the device, and a freed block is reused in order.
    const cudaError_t err = cudaMallocFromPoolAsync(&p, bytes, pool_, stream_);
    if (err != cudaSuccess) {
        cudaGetLastError();
        std::lock_guard<std::mutex> lock(mutex_);
        counter(use_, use) -= bytes;
        fail(err == cudaErrorMemoryAllocation ? PYR_ERR_OUT_OF_MEMORY : PYR_ERR_INTERNAL,
             "cudaMallocFromPoolAsync of " + std::to_string(bytes) + " bytes failed: " +
                 cudaGetErrorString(err));
    }
    return p;
}

void Context::raw_free(void* p, size_t bytes, Use use) noexcept {
    const DeviceGuard on_device(device_, std::nothrow);
    cudaFreeAsync(p, stream_);
    std::lock_guard<std::mutex> lock(mutex_);
    counter(use_, use) -= bytes;
}

DeviceBuffer::DeviceBuffer(std::shared_ptr<Context> ctx, size_t bytes, Use use)
    : ctx_(std::move(ctx)), bytes_(bytes), use_(use) {
    if (bytes_ > 0) ptr_ = ctx_->raw_alloc(bytes_, use_);
}

DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& o) noexcept {
    if (this != &o) {
        reset();
        ctx_ = std::move(o.ctx_);
        ptr_ = o.ptr_;
        bytes_ = o.bytes_;
        use_ = o.use_;
        o.ptr_ = nullptr;
        o.bytes_ = 0;
    }
    return *this;
}

void DeviceBuffer::reset() {
    if (ptr_) ctx_->raw_free(ptr_, bytes_, use_);
    ptr_ = nullptr;
    bytes_ = 0;
}

PinnedBuffer::PinnedBuffer(size_t bytes) : bytes_(bytes) {
    if (bytes_ == 0) return;
    const cudaError_t err = cudaHostAlloc(&ptr_, bytes_, cudaHostAllocDefault);
    if (err != cudaSuccess) {
        ptr_ = nullptr;
        bytes_ = 0;
        cudaGetLastError();
        fail(err == cudaErrorMemoryAllocation ? PYR_ERR_OUT_OF_MEMORY : PYR_ERR_INTERNAL,
             "cudaHostAlloc of " + std::to_string(bytes) + " bytes of page-locked memory failed: " +
                 cudaGetErrorString(err));
    }
}

PinnedBuffer& PinnedBuffer::operator=(PinnedBuffer&& o) noexcept {
    if (this != &o) {
        if (ptr_) cudaFreeHost(ptr_);
        ptr_ = o.ptr_;
        bytes_ = o.bytes_;
        o.ptr_ = nullptr;
        o.bytes_ = 0;
    }
    return *this;
}

PinnedBuffer::~PinnedBuffer() {
    if (ptr_) cudaFreeHost(ptr_);
}

void PinnedBuffer::reserve(size_t bytes) {
    if (bytes <= bytes_) return;
    const size_t grown = std::max(bytes, 2 * bytes_);
    *this = PinnedBuffer();  // free first: the old contents are not needed
    *this = PinnedBuffer(grown);
}

Event::Event() { PYR_CUDA_CHECK(cudaEventCreateWithFlags(&event_, cudaEventDisableTiming)); }

Event::~Event() {
    if (event_) cudaEventDestroy(event_);
}

void Event::record(cudaStream_t stream) { PYR_CUDA_CHECK(cudaEventRecord(event_, stream)); }

void Event::wait() const { PYR_CUDA_CHECK(cudaEventSynchronize(event_)); }

bool Event::done() const {
    const cudaError_t err = cudaEventQuery(event_);
    if (err == cudaErrorNotReady) {
        cudaGetLastError();  // not an error: clear it
        return false;
    }
    PYR_CUDA_CHECK(err);
    return true;
}

}  // namespace pyr::cuda
