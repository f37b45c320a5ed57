// cuda-sim runtime: the CUDA runtime calls on host memory, and kernel launches run on the
// CPU. See cuda_sim_device.h for the execution model and README.md for its limits.
//
// A launch hands its blocks out to a pool of worker threads (PYR_SIM_WORKERS, default: the
// CPU count). A worker runs a block as one fiber per CUDA thread, cooperatively: a fiber
// runs until it exits or waits at a barrier (__syncthreads, or the per-warp barrier of a
// shuffle), and the last one to arrive releases the others. Fibers rather than OS threads:
// the kernel tests run ~10^8 CUDA threads and millions of warp shuffles, which need switches
// of nanoseconds (swapcontext makes a syscall per switch; a hand-written switch is used on
// x86-64, swapcontext elsewhere).

// first: it defines __shared__ & co. before the toolkit headers would
#include "cuda_sim_device.h"

#include <atomic>
#include <condition_variable>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <sys/mman.h>
#include <unistd.h>

#ifdef __SANITIZE_ADDRESS__
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

// The hand-written switch on x86-64 (PYR_SIM_UCONTEXT forces the portable one, to test it).
#if defined(__x86_64__) && !defined(PYR_SIM_UCONTEXT)
#define PYR_SIM_ASM_SWITCH
#else
#include <ucontext.h>
#endif

thread_local uint3 threadIdx, blockIdx, blockDim, gridDim;

namespace {

// ---- errors and device memory ----------------------------------------------------------

thread_local cudaError_t last_error = cudaSuccess;

cudaError_t fail(cudaError_t err) {
    last_error = err;
    return err;
}

// cudaMalloc'd ranges, to refuse copies and frees that do not fit one (a bug the device
// would report or corrupt memory with).
std::mutex alloc_mutex;
std::map<uintptr_t, size_t> allocations;

bool is_device_range(const void* p, size_t bytes) {
    const auto a = reinterpret_cast<uintptr_t>(p);
    std::lock_guard<std::mutex> lock(alloc_mutex);
    auto it = allocations.upper_bound(a);
    if (it == allocations.begin()) return false;
    --it;
    return a - it->first <= it->second && bytes <= it->second - (a - it->first);
}

cudaError_t bad_range(const char* call, const void* p, size_t bytes) {
    std::fprintf(stderr, "cuda-sim: %s of %zu bytes at %p: not inside one cudaMalloc'd block\n",
                 call, bytes, p);
    return fail(cudaErrorInvalidValue);
}

// ---- fibers ----------------------------------------------------------------------------

#ifdef PYR_SIM_ASM_SWITCH
// pyr_sim_switch(save, to): pushes the callee-saved registers and the SSE/x87 control words,
// stores the stack pointer in *save, and resumes the stack `to' the same way. A new fiber's
// stack is laid out so that the switch "returns" into pyr_sim_entry, which calls the
// function in r13.
extern "C" void pyr_sim_switch(void** save, void* to);
extern "C" void pyr_sim_entry();
asm(R"(
    .text
    .globl pyr_sim_switch
    .type pyr_sim_switch, @function
pyr_sim_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size pyr_sim_switch, .-pyr_sim_switch
    .globl pyr_sim_entry
    .type pyr_sim_entry, @function
pyr_sim_entry:
    callq *%r13
    ud2
    .size pyr_sim_entry, .-pyr_sim_entry
)");
#endif

struct Fiber {
    enum State : uint8_t { Fresh, Ready, AtSyncthreads, AtWarp, Done };
    State state = Fresh;
    int lane = 0, warp = 0;
    uint3 tid{};
    char* stack = nullptr;  // while started
#ifdef PYR_SIM_ASM_SWITCH
    void* sp = nullptr;  // saved while suspended
#else
    ucontext_t uc;
#endif
};

struct Warp {
    unsigned mask = 0;  // its lanes
    int lanes = 0, live = 0, arrived = 0;
    unsigned gen = 0;
    // Two slot arrays, alternating per operation: a lane can only write the next
    // operation's slots after all lanes arrived there, i.e. after they read this one's.
    uint64_t slots[2][32] = {};
};

struct Launch {
    const pyr_sim::LaunchSpec* spec;
    void (*body)(const void*);
    const void* closure;
    uint64_t serial, n_blocks;
    std::atomic<uint64_t> next_block{0};
    std::atomic<bool> failed{false};
    std::mutex fault_mutex;
    std::string fault;  // the first fault of any block
};

// A worker's state: the fibers of its current block.
struct Worker {
    uint64_t prepared_for = 0;  // launch serial the fibers are laid out for
    std::vector<Fiber> fibers;
    std::vector<Warp> warps;
    std::vector<char*> free_stacks;
    std::vector<uint4> smem;  // dynamic shared memory
    std::vector<std::pair<void*, size_t>> shared_vars;  // block_shared objects
    Launch* launch = nullptr;
    Fiber* cur = nullptr;
    int live = 0, at_syncthreads = 0;
    std::string fault;
#ifdef PYR_SIM_ASM_SWITCH
    void* sched_sp = nullptr;
#else
    ucontext_t sched_uc;
#endif
};
thread_local Worker tw;

size_t stack_bytes() {
    static const size_t bytes = [] {
        const char* env = std::getenv("PYR_SIM_STACK_KB");
        const long kb = env ? std::atol(env) : 128;
        return size_t(kb > 16 ? kb : 16) * 1024;
    }();
    return bytes;
}
const size_t kGuard = 4096;

// A stack with an inaccessible page below it: an overflow faults instead of corrupting.
char* take_stack() {
    if (!tw.free_stacks.empty()) {
        char* s = tw.free_stacks.back();
        tw.free_stacks.pop_back();
        return s;
    }
    void* p = mmap(nullptr, kGuard + stack_bytes(), PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) {
        std::fprintf(stderr, "cuda-sim: out of memory for fiber stacks\n");
        std::abort();
    }
    mprotect(p, kGuard, PROT_NONE);
    return static_cast<char*>(p) + kGuard;
}

void fiber_main();

void start(Fiber& f) {
    f.stack = take_stack();
#ifdef PYR_SIM_ASM_SWITCH
    // the frame pyr_sim_switch pops: control words, r15, r14, r13 (= entry), r12, rbx,
    // rbp, return address; 16-byte aligned at the call in pyr_sim_entry
    const uintptr_t top = (reinterpret_cast<uintptr_t>(f.stack) + stack_bytes()) & ~uintptr_t(15);
    uint64_t* frame = reinterpret_cast<uint64_t*>(top - 64);
#ifdef __SANITIZE_ADDRESS__
    // a reused stack still has the shadow of the frames that were left on it; the fiber's
    // own frames set theirs on entry
    __asan_unpoison_memory_region(frame, 64);
#endif
    uint32_t mxcsr;
    uint16_t fpucw;
    asm volatile("stmxcsr %0" : "=m"(mxcsr));
    asm volatile("fnstcw %0" : "=m"(fpucw));
    frame[0] = mxcsr | uint64_t(fpucw) << 32;
    frame[1] = frame[2] = frame[4] = frame[5] = frame[6] = 0;
    frame[3] = reinterpret_cast<uint64_t>(&fiber_main);
    frame[7] = reinterpret_cast<uint64_t>(&pyr_sim_entry);
    f.sp = frame;
#else
    getcontext(&f.uc);
    f.uc.uc_stack.ss_sp = f.stack;
    f.uc.uc_stack.ss_size = stack_bytes();
    f.uc.uc_link = nullptr;
    makecontext(&f.uc, &fiber_main, 0);
#endif
}

void resume(Fiber& f) {  // scheduler -> fiber
    tw.cur = &f;
    threadIdx = f.tid;
#ifdef PYR_SIM_ASM_SWITCH
    pyr_sim_switch(&tw.sched_sp, f.sp);
#else
    swapcontext(&tw.sched_uc, &f.uc);
#endif
}

void suspend(Fiber& f) {  // fiber -> scheduler
#ifdef PYR_SIM_ASM_SWITCH
    pyr_sim_switch(&f.sp, tw.sched_sp);
#else
    swapcontext(&f.uc, &tw.sched_uc);
#endif
}

// Stops the block: records why (with the thread) and never resumes the caller's fiber.
[[noreturn]] void kernel_fault(const std::string& why) {
    Fiber& f = *tw.cur;
    if (tw.fault.empty())
        tw.fault = why + " (thread " + std::to_string(f.tid.x) + "," + std::to_string(f.tid.y) +
                   "," + std::to_string(f.tid.z) + ")";
    suspend(f);
    __builtin_unreachable();
}

Fiber& current_fiber() {
    if (!tw.cur) {
        std::fprintf(stderr, "cuda-sim: a device function was called outside a kernel\n");
        std::abort();
    }
    return *tw.cur;
}

void release_syncthreads() {
    tw.at_syncthreads = 0;
    for (Fiber& g : tw.fibers)
        if (g.state == Fiber::AtSyncthreads) g.state = Fiber::Ready;
}

void release_warp(Warp& w, int warp) {
    w.arrived = 0;
    ++w.gen;
    for (int l = 0; l < w.lanes; ++l) {
        Fiber& g = tw.fibers[size_t(warp) * 32 + size_t(l)];
        if (g.state == Fiber::AtWarp) g.state = Fiber::Ready;
    }
}

void fiber_main() {
    Fiber& f = *tw.cur;
    tw.launch->body(tw.launch->closure);
    // An exited thread no longer counts at __syncthreads (as on the device); a warp
    // operation needs every lane, so one waiting for this lane is a fault.
    --tw.live;
    Warp& w = tw.warps[size_t(f.warp)];
    --w.live;
    if (w.arrived > 0) kernel_fault("a lane exited while lanes of its warp wait in a warp operation");
    if (tw.at_syncthreads > 0 && tw.at_syncthreads == tw.live) release_syncthreads();
    f.state = Fiber::Done;
    suspend(f);
    __builtin_unreachable();
}

// Lays the fibers and warps out for the launch's block shape.
void prepare(Launch& L) {
    const dim3 b = L.spec->block;
    const size_t n = size_t(b.x) * b.y * b.z;
    tw.fibers.assign(n, Fiber{});
    tw.warps.assign((n + 31) / 32, Warp{});
    for (size_t i = 0; i < n; ++i) {
        Fiber& f = tw.fibers[i];
        f.tid = uint3{unsigned(i % b.x), unsigned(i / b.x % b.y), unsigned(i / (size_t(b.x) * b.y))};
        f.lane = int(i % 32);
        f.warp = int(i / 32);
        Warp& w = tw.warps[i / 32];
        w.mask |= 1u << f.lane;
        ++w.lanes;
    }
    if (tw.smem.size() * sizeof(uint4) < L.spec->smem) tw.smem.resize((L.spec->smem + 15) / 16);
    tw.prepared_for = L.serial;
}

void abandon_block() {
    for (Fiber& f : tw.fibers)
        if (f.stack) {
            tw.free_stacks.push_back(f.stack);
            f.stack = nullptr;
        }
}

// Runs block `linear' (x fastest) to completion; false on a fault, in tw.fault.
bool run_block(Launch& L, uint64_t linear) {
    const dim3 g = L.spec->grid;
    blockIdx = uint3{unsigned(linear % g.x), unsigned(linear / g.x % g.y),
                     unsigned(linear / (uint64_t(g.x) * g.y))};
    for (Fiber& f : tw.fibers) f.state = Fiber::Fresh;
    for (Warp& w : tw.warps) {
        w.live = w.lanes;
        w.arrived = 0;
    }
    tw.live = int(tw.fibers.size());
    tw.at_syncthreads = 0;
    // shared memory starts as garbage on the device; NaN bytes here, so that a read
    // before the write shows
    if (L.spec->smem) std::memset(tw.smem.data(), 0xFF, L.spec->smem);
    for (const auto& [p, bytes] : tw.shared_vars) std::memset(p, 0xFF, bytes);
    // Odd blocks run their fibers in reverse order: a missing barrier between a write and a
    // read in another thread shows whichever thread the order puts first.
    const size_t n = tw.fibers.size();
    const bool reverse = linear & 1;
    for (;;) {
        bool ran = false;
        for (size_t k = 0; k < n; ++k) {
            Fiber& f = tw.fibers[reverse ? n - 1 - k : k];
            if (f.state == Fiber::Fresh) {
                start(f);
                f.state = Fiber::Ready;
            }
            if (f.state != Fiber::Ready) continue;
            ran = true;
            resume(f);
            if (!tw.fault.empty()) {
                abandon_block();
                return false;
            }
            if (f.state == Fiber::Done) {  // its stack serves the next fiber to start
                tw.free_stacks.push_back(f.stack);
                f.stack = nullptr;
            }
        }
        if (tw.live == 0) return true;
        if (!ran) {
            int at_sync = 0, at_warp = 0;
            for (const Fiber& f : tw.fibers) {
                at_sync += f.state == Fiber::AtSyncthreads;
                at_warp += f.state == Fiber::AtWarp;
            }
            tw.fault = "deadlock: " + std::to_string(at_sync) + " threads wait at __syncthreads, " +
                       std::to_string(at_warp) + " in warp operations (a barrier not every thread reaches)";
            abandon_block();
            return false;
        }
    }
}

void install_crash_report();

void run_blocks(Launch& L) {
    install_crash_report();
    if (tw.prepared_for != L.serial) prepare(L);
    const dim3 b = L.spec->block, g = L.spec->grid;
    blockDim = uint3{b.x, b.y, b.z};
    gridDim = uint3{g.x, g.y, g.z};
    tw.launch = &L;
    for (;;) {
        const uint64_t block = L.next_block.fetch_add(1);
        if (block >= L.n_blocks || L.failed.load()) break;
        if (!run_block(L, block)) {
            std::lock_guard<std::mutex> lock(L.fault_mutex);
            if (!L.failed.exchange(true)) {
                char where[96];
                std::snprintf(where, sizeof where, "block (%u,%u,%u): ", blockIdx.x, blockIdx.y, blockIdx.z);
                L.fault = where + tw.fault;
            }
            tw.fault.clear();
            break;
        }
    }
    tw.launch = nullptr;
    tw.cur = nullptr;
}

// ---- worker pool -----------------------------------------------------------------------

class Pool {
public:
    explicit Pool(int helpers) {
        for (int i = 0; i < helpers; ++i) threads_.emplace_back([this] { loop(); });
    }
    // The calling thread works too; returns when every worker is done with L.
    void run(Launch& L) {
        {
            std::lock_guard<std::mutex> lock(m_);
            job_ = &L;
            ++epoch_;
            pending_ = int(threads_.size());
        }
        wake_.notify_all();
        run_blocks(L);
        std::unique_lock<std::mutex> lock(m_);
        done_.wait(lock, [&] { return pending_ == 0; });
        job_ = nullptr;
    }

private:
    void loop() {
        uint64_t seen = 0;
        for (;;) {
            Launch* L;
            {
                std::unique_lock<std::mutex> lock(m_);
                wake_.wait(lock, [&] { return epoch_ != seen; });
                seen = epoch_;
                L = job_;
            }
            run_blocks(*L);
            std::lock_guard<std::mutex> lock(m_);
            if (--pending_ == 0) done_.notify_one();
        }
    }

    std::vector<std::thread> threads_;
    std::mutex m_;
    std::condition_variable wake_, done_;
    Launch* job_ = nullptr;
    uint64_t epoch_ = 0;
    int pending_ = 0;
};

int worker_count() {
    const char* env = std::getenv("PYR_SIM_WORKERS");
    int n = env ? std::atoi(env) : int(std::thread::hardware_concurrency());
    return n < 1 ? 1 : n > 64 ? 64 : n;
}

// Never destroyed: its threads wait for work until the process exits.
Pool& pool() {
    static Pool* p = new Pool(worker_count() - 1);
    return *p;
}

// ---- crash reports -----------------------------------------------------------------------

// A fault in a kernel (bad pointer, misaligned vector access, fiber stack overflow; an
// ASan report) kills the process as on the host, but first says which kernel, block and
// thread it was.
void say_where(const char* what, const char* why) {
    if (!tw.launch || !tw.cur) return;
    const Fiber& f = *tw.cur;
    char msg[512];
    const int n = std::snprintf(msg, sizeof msg,
                                "cuda-sim: %s in kernel %s, block (%u,%u,%u), thread (%u,%u,%u)%s\n",
                                what, tw.launch->spec->name, blockIdx.x, blockIdx.y, blockIdx.z,
                                f.tid.x, f.tid.y, f.tid.z, why);
    if (n > 0) (void)!write(2, msg, size_t(n));
}

#ifdef __SANITIZE_ADDRESS__
void install_crash_report() {
    static std::once_flag once;
    std::call_once(once, [] { __sanitizer_set_death_callback([] { say_where("the error above", ""); }); });
}
#else
const int kFatal[] = {SIGSEGV, SIGBUS, SIGFPE, SIGILL};
struct sigaction previous_action[4];  // doctest's: it names the test case that crashed

void on_fatal_signal(int sig, siginfo_t* info, void*) {
    const auto addr = reinterpret_cast<uintptr_t>(info->si_addr);
    const auto guard = tw.cur ? reinterpret_cast<uintptr_t>(tw.cur->stack) - kGuard : 0;
    char what[96];
    std::snprintf(what, sizeof what, "signal %d (%s) at %p", sig, strsignal(sig), info->si_addr);
    say_where(what, guard && addr >= guard && addr < guard + kGuard
                        ? ": fiber stack overflow, raise PYR_SIM_STACK_KB" : "");
    // the previous handler gets the signal once this one returns
    for (size_t i = 0; i < 4; ++i)
        if (kFatal[i] == sig) sigaction(sig, &previous_action[i], nullptr);
    raise(sig);
}

// Handlers run on an alternate stack: a fiber stack overflow leaves none to run on.
void install_crash_report() {
    thread_local bool installed = false;
    if (installed) return;
    installed = true;
    stack_t ss{};
    ss.ss_size = 64 * 1024;
    ss.ss_sp = mmap(nullptr, ss.ss_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (ss.ss_sp == MAP_FAILED || sigaltstack(&ss, nullptr) != 0) return;
    static std::once_flag once;
    std::call_once(once, [] {
        struct sigaction sa {};
        sa.sa_sigaction = on_fatal_signal;
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
        for (size_t i = 0; i < 4; ++i) sigaction(kFatal[i], &sa, &previous_action[i]);
    });
}
#endif

std::atomic<uint64_t> launch_serial{0};
std::mutex launch_mutex;  // one launch at a time, as on one stream

}  // namespace

// ---- device side -------------------------------------------------------------------------

void __syncthreads() {
    Fiber& f = current_fiber();
    if (++tw.at_syncthreads == tw.live) {  // the last to arrive goes on at once
        release_syncthreads();
        return;
    }
    f.state = Fiber::AtSyncthreads;
    suspend(f);
}

namespace pyr_sim {

Exchange warp_exchange(unsigned mask, uint64_t v) {
    Fiber& f = current_fiber();
    Warp& w = tw.warps[size_t(f.warp)];
    if (mask != w.mask) {
        char why[128];
        std::snprintf(why, sizeof why, "warp operation with mask 0x%08x in a warp of lanes 0x%08x "
                      "(only whole-warp masks are simulated)", mask, w.mask);
        kernel_fault(why);
    }
    if (w.live != w.lanes) kernel_fault("warp operation after a lane of the warp exited");
    uint64_t* slots = w.slots[w.gen & 1];
    slots[f.lane] = v;
    if (++w.arrived == w.live) {
        release_warp(w, f.warp);
    } else {
        f.state = Fiber::AtWarp;
        suspend(f);
    }
    return {slots, f.lane};
}

void* dynamic_smem() { return tw.smem.data(); }

void register_shared(void* p, size_t bytes) {
    std::memset(p, 0xFF, bytes);  // this block too
    tw.shared_vars.emplace_back(p, bytes);
}

void run_launch(const LaunchSpec& spec, void (*body)(const void*), const void* closure) {
    const dim3 g = spec.grid, b = spec.block;
    const uint64_t threads = uint64_t(b.x) * b.y * b.z;
    // the device's limits (compute capability 8.x/9.x)
    if (threads == 0 || threads > 1024 || b.z > 64 || g.x == 0 || g.y == 0 || g.z == 0 ||
        g.x > 0x7fffffffu || g.y > 65535 || g.z > 65535) {
        fail(cudaErrorInvalidConfiguration);
        return;
    }
    if (spec.smem > 48 * 1024) {  // more needs cudaFuncSetAttribute, which is not simulated
        fail(cudaErrorInvalidValue);
        return;
    }
    std::lock_guard<std::mutex> lock(launch_mutex);
    Launch L;
    L.spec = &spec;
    L.body = body;
    L.closure = closure;
    L.serial = ++launch_serial;
    L.n_blocks = uint64_t(g.x) * g.y * g.z;
    pool().run(L);
    if (L.failed) {
        std::fprintf(stderr, "cuda-sim: kernel %s failed: %s\n", spec.name, L.fault.c_str());
        fail(cudaErrorLaunchFailure);
    }
}

}  // namespace pyr_sim

// ---- host API ----------------------------------------------------------------------------

cudaError_t cudaGetDeviceCount(int* count) {
    *count = 1;
    return cudaSuccess;
}
cudaError_t cudaSetDevice(int device) { return device == 0 ? cudaSuccess : fail(cudaErrorInvalidValue); }
cudaError_t cudaGetDevice(int* device) {
    *device = 0;
    return cudaSuccess;
}
cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
cudaError_t cudaGetLastError() {
    const cudaError_t e = last_error;
    last_error = cudaSuccess;
    return e;
}
cudaError_t cudaPeekAtLastError() { return last_error; }

// The errors the sim produces; the toolkit's tables live in libcudart.
const char* cudaGetErrorName(cudaError_t err) {
    switch (err) {
        case cudaSuccess: return "cudaSuccess";
        case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
        case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
        case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
        case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
        default: return "cudaError (not produced by cuda-sim)";
    }
}
const char* cudaGetErrorString(cudaError_t err) {
    switch (err) {
        case cudaSuccess: return "no error";
        case cudaErrorInvalidValue: return "invalid argument";
        case cudaErrorMemoryAllocation: return "out of memory";
        case cudaErrorInvalidConfiguration: return "invalid configuration argument";
        case cudaErrorLaunchFailure: return "unspecified launch failure (cuda-sim: see stderr)";
        default: return "unknown error (not produced by cuda-sim)";
    }
}

cudaError_t cudaMalloc(void** ptr, size_t bytes) {
    // 256-byte aligned as cudaMalloc's, exactly `bytes' long (ASan reports reads past it),
    // and filled with 0xFF bytes (NaN in fp32, fp16 and bf16) where the device leaves garbage
    void* p = nullptr;
    if (posix_memalign(&p, 256, bytes ? bytes : 1) != 0) return fail(cudaErrorMemoryAllocation);
    std::memset(p, 0xFF, bytes);
    {
        std::lock_guard<std::mutex> lock(alloc_mutex);
        allocations[reinterpret_cast<uintptr_t>(p)] = bytes;
    }
    *ptr = p;
    return cudaSuccess;
}

cudaError_t cudaFree(void* ptr) {
    if (!ptr) return cudaSuccess;
    {
        std::lock_guard<std::mutex> lock(alloc_mutex);
        if (allocations.erase(reinterpret_cast<uintptr_t>(ptr)) == 0) {
            std::fprintf(stderr, "cuda-sim: cudaFree(%p): not a cudaMalloc'd pointer\n", ptr);
            return fail(cudaErrorInvalidValue);
        }
    }
    std::free(ptr);
    return cudaSuccess;
}

cudaError_t cudaMallocAsync(void** ptr, size_t bytes, cudaStream_t) { return cudaMalloc(ptr, bytes); }
cudaError_t cudaFreeAsync(void* ptr, cudaStream_t) { return cudaFree(ptr); }

cudaError_t cudaMallocHost(void** ptr, size_t bytes) {
    *ptr = std::malloc(bytes ? bytes : 1);
    return *ptr ? cudaSuccess : fail(cudaErrorMemoryAllocation);
}
cudaError_t cudaFreeHost(void* ptr) {
    std::free(ptr);
    return cudaSuccess;
}

cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind) {
    if (bytes == 0) return cudaSuccess;
    const bool dst_dev = kind == cudaMemcpyHostToDevice || kind == cudaMemcpyDeviceToDevice;
    const bool src_dev = kind == cudaMemcpyDeviceToHost || kind == cudaMemcpyDeviceToDevice;
    if (dst_dev && !is_device_range(dst, bytes)) return bad_range("cudaMemcpy to", dst, bytes);
    if (src_dev && !is_device_range(src, bytes)) return bad_range("cudaMemcpy from", src, bytes);
    std::memmove(dst, src, bytes);
    return cudaSuccess;
}
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind,
                            cudaStream_t) {
    return cudaMemcpy(dst, src, bytes, kind);
}

cudaError_t cudaMemset(void* ptr, int value, size_t bytes) {
    if (bytes == 0) return cudaSuccess;
    if (!is_device_range(ptr, bytes)) return bad_range("cudaMemset", ptr, bytes);
    std::memset(ptr, value, bytes);
    return cudaSuccess;
}
cudaError_t cudaMemsetAsync(void* ptr, int value, size_t bytes, cudaStream_t) {
    return cudaMemset(ptr, value, bytes);
}

cudaError_t cudaStreamCreate(cudaStream_t* stream) {
    *stream = reinterpret_cast<cudaStream_t>(uintptr_t(1));  // any non-null handle
    return cudaSuccess;
}
cudaError_t cudaStreamDestroy(cudaStream_t) { return cudaSuccess; }
cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
