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
#include <algorithm>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <sys/mman.h>
#include <unistd.h>

#ifdef __SANITIZE_ADDRESS__
#include <sanitizer/asan_interface.h>
#endif
#if defined(__SANITIZE_ADDRESS__) || defined(PYR_SIM_UBSAN)
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

// Whether [p, p + bytes) lies inside one of the blocks (start -> size); alloc_mutex held.
bool inside_one(const std::map<uintptr_t, size_t>& blocks, const void* p, size_t bytes) {
    const auto a = reinterpret_cast<uintptr_t>(p);
    auto it = blocks.upper_bound(a);
    if (it == blocks.begin()) return false;
    --it;
    return a - it->first <= it->second && bytes <= it->second - (a - it->first);
}

bool is_device_range(const void* p, size_t bytes) {
    std::lock_guard<std::mutex> lock(alloc_mutex);
    return inside_one(allocations, p, bytes);
}

cudaError_t bad_range(const char* call, const void* p, size_t bytes) {
    std::fprintf(stderr, "cuda-sim: %s of %zu bytes at %p: not inside one cudaMalloc'd block\n",
                 call, bytes, p);
    return fail(cudaErrorInvalidValue);
}

// ---- fibers ----------------------------------------------------------------------------

#ifdef PYR_SIM_ASM_SWITCH
// pyr_sim_switch(save, to): pushes the callee-saved registers and the SSE control word
// (MXCSR), stores the stack pointer in *save, and resumes the stack `to' the same way. A new
// fiber's stack is laid out so that the switch "returns" into pyr_sim_entry, which calls the
// function in r13. The x87 control word is left out: nothing here changes it, and its
// reload (fldcw) was the costliest instruction of a switch.
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
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
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

// A cp.async copy the thread issued and that has not landed yet (deferred blocks only).
struct AsyncCopy {
    void* dst;
    const void* src;
    int bytes, src_bytes;  // src_bytes copied, the rest zero-filled
};

struct Fiber {
    enum State : uint8_t { Fresh, Ready, AtSyncthreads, AtWarp, Done };
    State state = Fresh;
    int lane = 0, warp = 0;
    uint3 tid{};
    // cp.async: the copies since the last commit, then the committed groups, oldest first
    std::vector<AsyncCopy> copies_open;
    std::vector<std::vector<AsyncCopy>> copy_groups;
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
    size_t pos = 0;           // cur's place in the running block's order
    bool reverse = false;     // the running block's order: fibers last to first
    bool defer_copies = false;  // the running block's cp.async copies land at the wait
    char* dead_stack = nullptr;  // of the fiber that finished last, to free once off it
    int live = 0, at_syncthreads = 0;
    std::string fault;
#ifdef PYR_SIM_ASM_SWITCH
    void* sched_sp = nullptr;
#else
    ucontext_t sched_uc;
#endif
};
// A pointer, trivially initialised: reaching it is one TLS load, where a thread_local Worker
// (a dynamic initialiser) costs a call to the TU's TLS init function on every access.
// run_blocks makes it; it lives as long as the thread.
thread_local Worker* tw = nullptr;

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
    if (!tw->free_stacks.empty()) {
        char* s = tw->free_stacks.back();
        tw->free_stacks.pop_back();
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
    // the frame pyr_sim_switch pops: MXCSR, r15, r14, r13 (= entry), r12, rbx, rbp, return
    // address; 16-byte aligned at the call in pyr_sim_entry. Each stack starts at its own
    // offset below its top ("colour"): stacks are page-aligned, and the hot frames of a
    // block's fibers would otherwise all fall into the same few cache sets.
    const uintptr_t colour = (reinterpret_cast<uintptr_t>(f.stack) >> 12) % 61 * 64;
    const uintptr_t top = (reinterpret_cast<uintptr_t>(f.stack) + stack_bytes() - colour) & ~uintptr_t(15);
    uint64_t* frame = reinterpret_cast<uint64_t*>(top - 64);
#ifdef __SANITIZE_ADDRESS__
    // a reused stack still has the shadow of the frames that were left on it; the fiber's
    // own frames set theirs on entry
    __asan_unpoison_memory_region(frame, 64);
#endif
    uint32_t mxcsr;
    asm volatile("stmxcsr %0" : "=m"(mxcsr));
    frame[0] = mxcsr;
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

// The switches. A fiber that waits or finishes hands over directly to the next fiber of the
// block's order that can run (starting it if fresh): one switch per handover instead of two
// through the scheduler, which only regains control at the end of a pass over the block.

void reclaim() {  // after every switch: the finished fiber's stack is free once we are off it
    if (tw->dead_stack) {
        tw->free_stacks.push_back(tw->dead_stack);
        tw->dead_stack = nullptr;
    }
}

// The first fiber at place k or later in the block's order that can run, started if fresh;
// null if none.
Fiber* runnable_from(size_t k) {
    const size_t n = tw->fibers.size();
    for (; k < n; ++k) {
        Fiber& g = tw->fibers[tw->reverse ? n - 1 - k : k];
        if (g.state == Fiber::Fresh) {
            start(g);
            g.state = Fiber::Ready;
        }
        if (g.state == Fiber::Ready) {
            tw->pos = k;
            return &g;
        }
    }
    return nullptr;
}

void resume(Fiber& f) {  // scheduler -> fiber
    tw->cur = &f;
    threadIdx = f.tid;
#ifdef PYR_SIM_ASM_SWITCH
    pyr_sim_switch(&tw->sched_sp, f.sp);
#else
    swapcontext(&tw->sched_uc, &f.uc);
#endif
    reclaim();
}

// fiber -> the next runnable fiber of the pass, or the scheduler (at the end of the pass,
// and after a fault); returns when f runs again (never, once it is done)
void suspend(Fiber& f) {
    Fiber* next = tw->fault.empty() ? runnable_from(tw->pos + 1) : nullptr;
    if (next) {
        tw->cur = next;
        threadIdx = next->tid;
    }
#ifdef PYR_SIM_ASM_SWITCH
    pyr_sim_switch(&f.sp, next ? next->sp : tw->sched_sp);
#else
    swapcontext(&f.uc, next ? &next->uc : &tw->sched_uc);
#endif
    reclaim();
}

// Stops the block: records why (with the thread) and never resumes the caller's fiber.
[[noreturn]] void kernel_fault(const std::string& why) {
    Fiber& f = *tw->cur;
    if (tw->fault.empty())
        tw->fault = why + " (thread " + std::to_string(f.tid.x) + "," + std::to_string(f.tid.y) +
                   "," + std::to_string(f.tid.z) + ")";
    suspend(f);
    __builtin_unreachable();
}

Fiber& current_fiber() {
    if (!tw || !tw->cur) {
        std::fprintf(stderr, "cuda-sim: a device function was called outside a kernel\n");
        std::abort();
    }
    return *tw->cur;
}

void release_syncthreads() {
    tw->at_syncthreads = 0;
    for (Fiber& g : tw->fibers)
        if (g.state == Fiber::AtSyncthreads) g.state = Fiber::Ready;
}

void release_warp(Warp& w, int warp) {
    w.arrived = 0;
    ++w.gen;
    for (int l = 0; l < w.lanes; ++l) {
        Fiber& g = tw->fibers[size_t(warp) * 32 + size_t(l)];
        if (g.state == Fiber::AtWarp) g.state = Fiber::Ready;
    }
}

void fiber_main() {
    reclaim();
    Fiber& f = *tw->cur;
    tw->launch->body(tw->launch->closure);
    // An exited thread no longer counts at __syncthreads (as on the device); a warp
    // operation needs every lane, so one waiting for this lane is a fault.
    --tw->live;
    Warp& w = tw->warps[size_t(f.warp)];
    --w.live;
    if (w.arrived > 0) kernel_fault("a lane exited while lanes of its warp wait in a warp operation");
    if (tw->at_syncthreads > 0 && tw->at_syncthreads == tw->live) release_syncthreads();
    f.state = Fiber::Done;
    tw->dead_stack = f.stack;  // serves a later fiber, once the next one runs
    f.stack = nullptr;
    suspend(f);
    __builtin_unreachable();
}

// Lays the fibers and warps out for the launch's block shape.
void prepare(Launch& L) {
    const dim3 b = L.spec->block;
    const size_t n = size_t(b.x) * b.y * b.z;
    tw->fibers.assign(n, Fiber{});
    tw->warps.assign((n + 31) / 32, Warp{});
    for (size_t i = 0; i < n; ++i) {
        Fiber& f = tw->fibers[i];
        f.tid = uint3{unsigned(i % b.x), unsigned(i / b.x % b.y), unsigned(i / (size_t(b.x) * b.y))};
        f.lane = int(i % 32);
        f.warp = int(i / 32);
        Warp& w = tw->warps[i / 32];
        w.mask |= 1u << f.lane;
        ++w.lanes;
    }
    if (tw->smem.size() * sizeof(uint4) < L.spec->smem) tw->smem.resize((L.spec->smem + 15) / 16);
    tw->prepared_for = L.serial;
}

void abandon_block() {
    reclaim();
    for (Fiber& f : tw->fibers)
        if (f.stack) {
            tw->free_stacks.push_back(f.stack);
            f.stack = nullptr;
        }
}

// Runs block `linear' (x fastest) to completion; false on a fault, in tw->fault.
bool run_block(Launch& L, uint64_t linear) {
    const dim3 g = L.spec->grid;
    blockIdx = uint3{unsigned(linear % g.x), unsigned(linear / g.x % g.y),
                     unsigned(linear / (uint64_t(g.x) * g.y))};
    for (Fiber& f : tw->fibers) {
        f.state = Fiber::Fresh;
        f.copies_open.clear();
        f.copy_groups.clear();
    }
    for (Warp& w : tw->warps) {
        w.live = w.lanes;
        w.arrived = 0;
    }
    tw->live = int(tw->fibers.size());
    tw->at_syncthreads = 0;
    // shared memory starts as garbage on the device; NaN bytes here, so that a read
    // before the write shows
    if (L.spec->smem) std::memset(tw->smem.data(), 0xFF, L.spec->smem);
    for (const auto& [p, bytes] : tw->shared_vars) std::memset(p, 0xFF, bytes);
    // Odd blocks run their fibers in reverse order: a missing barrier between a write and a
    // read in another thread shows whichever thread the order puts first.
    tw->reverse = linear & 1;
    // cp.async copies land at once in blocks 0, 1, 4, 5, ... (a copy issued before the
    // barrier that ends the reads of its destination shows) and only at the thread's
    // cp_async_wait in the others (a wait missing or too lax shows), in either order.
    tw->defer_copies = (linear >> 1) & 1;
    // A pass: the first runnable fiber runs, hands over to the next and so on to the end of
    // the order, then control comes back here (or at a fault).
    for (;;) {
        Fiber* first = runnable_from(0);
        if (!first) {
            int at_sync = 0, at_warp = 0;
            for (const Fiber& f : tw->fibers) {
                at_sync += f.state == Fiber::AtSyncthreads;
                at_warp += f.state == Fiber::AtWarp;
            }
            tw->fault = "deadlock: " + std::to_string(at_sync) + " threads wait at __syncthreads, " +
                       std::to_string(at_warp) + " in warp operations (a barrier not every thread reaches)";
            abandon_block();
            return false;
        }
        resume(*first);
        if (!tw->fault.empty()) {
            abandon_block();
            return false;
        }
        if (tw->live == 0) return true;
    }
}

void install_crash_report();

// Gives a thread's Worker and its fiber stacks back when the thread ends: threads other than
// the pool's run blocks too (a test's session threads), and come and go.
struct WorkerRelease {
    ~WorkerRelease() {
        if (!tw) return;
        for (char* s : tw->free_stacks) munmap(s - kGuard, kGuard + stack_bytes());
        if (tw->dead_stack) munmap(tw->dead_stack - kGuard, kGuard + stack_bytes());
        delete tw;
        tw = nullptr;
    }
};

void run_blocks(Launch& L) {
    install_crash_report();
    if (!tw) {
        static thread_local WorkerRelease release;
        (void)release;
        tw = new Worker;
    }
    if (tw->prepared_for != L.serial) prepare(L);
    const dim3 b = L.spec->block, g = L.spec->grid;
    blockDim = uint3{b.x, b.y, b.z};
    gridDim = uint3{g.x, g.y, g.z};
    tw->launch = &L;
    for (;;) {
        const uint64_t block = L.next_block.fetch_add(1);
        if (block >= L.n_blocks || L.failed.load()) break;
        if (!run_block(L, block)) {
            std::lock_guard<std::mutex> lock(L.fault_mutex);
            if (!L.failed.exchange(true)) {
                char where[96];
                std::snprintf(where, sizeof where, "block (%u,%u,%u): ", blockIdx.x, blockIdx.y, blockIdx.z);
                L.fault = where + tw->fault;
            }
            tw->fault.clear();
            break;
        }
    }
    tw->launch = nullptr;
    tw->cur = nullptr;
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

// A fault in a kernel (bad pointer, fiber stack overflow; an ASan or UBSan report, such as a
// misaligned vector access) kills the process as on the host, but first says which kernel,
// block and thread it was.
void say_where(const char* what, const char* why) {
    if (!tw || !tw->launch || !tw->cur) return;
    const Fiber& f = *tw->cur;
    char msg[512];
    const int n = std::snprintf(msg, sizeof msg,
                                "cuda-sim: %s in kernel %s, block (%u,%u,%u), thread (%u,%u,%u)%s\n",
                                what, tw->launch->spec->name, blockIdx.x, blockIdx.y, blockIdx.z,
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
    const auto guard = tw && tw->cur ? reinterpret_cast<uintptr_t>(tw->cur->stack) - kGuard : 0;
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
#ifdef PYR_SIM_UBSAN
    static std::once_flag ubsan;
    std::call_once(ubsan, [] { __sanitizer_set_death_callback([] { say_where("the error above", ""); }); });
#endif
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
// The device: one operation at a time (a launch, a copy, a replayed graph), as if every
// stream were one queue; recursive, since a replayed graph runs its nodes' launches.
std::recursive_mutex device_mutex;

}  // namespace

// ---- device side -------------------------------------------------------------------------

void __syncthreads() {
    Fiber& f = current_fiber();
    if (++tw->at_syncthreads == tw->live) {  // the last to arrive goes on at once
        release_syncthreads();
        return;
    }
    f.state = Fiber::AtSyncthreads;
    suspend(f);
}

namespace pyr_sim {

Exchange warp_exchange(unsigned mask, uint64_t v) {
    Fiber& f = current_fiber();
    Warp& w = tw->warps[size_t(f.warp)];
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

void* dynamic_smem() { return tw->smem.data(); }

namespace {
void land(const AsyncCopy& c) {
    std::memcpy(c.dst, c.src, size_t(c.src_bytes));
    std::memset(static_cast<char*>(c.dst) + c.src_bytes, 0, size_t(c.bytes - c.src_bytes));
}
}  // namespace

void cp_async(void* dst, const void* src, int bytes, int src_bytes) {
    check_shared_rows(dst, size_t(bytes), "cp.async");
    if (reinterpret_cast<uintptr_t>(src) % size_t(bytes) != 0) kernel_fault("cp.async: a source address not aligned to its size");
    const AsyncCopy c{dst, src, bytes, src_bytes};
    if (tw->defer_copies) current_fiber().copies_open.push_back(c);
    else land(c);
}

void cp_async_commit() {
    Fiber& f = current_fiber();
    f.copy_groups.push_back(std::move(f.copies_open));
    f.copies_open.clear();
}

void cp_async_wait(int pending) {
    Fiber& f = current_fiber();
    while (int(f.copy_groups.size()) > pending) {
        for (const AsyncCopy& c : f.copy_groups.front()) land(c);
        f.copy_groups.erase(f.copy_groups.begin());
    }
}

void check_shared_rows(const void* row, size_t bytes, const char* op) {
    const auto* p = static_cast<const uint8_t*>(row);
    auto within = [&](const void* base, size_t n) {
        const auto* b = static_cast<const uint8_t*>(base);
        return p >= b && p + bytes <= b + n;
    };
    bool shared = within(tw->smem.data(), tw->launch->spec->smem);  // this launch's, not the buffer's
    for (const auto& [v, n] : tw->shared_vars) shared = shared || within(v, n);
    if (!shared) kernel_fault(std::string(op) + ": a row address outside shared memory");
    if (reinterpret_cast<uintptr_t>(row) % 16 != 0) kernel_fault(std::string(op) + ": a row address not 16-byte aligned");
}

void register_shared(void* p, size_t bytes) {
    std::memset(p, 0xFF, bytes);  // this block too
    tw->shared_vars.emplace_back(p, bytes);
}

cudaError_t run_launch(const LaunchSpec& spec, void (*body)(const void*), const void* closure) {
    const dim3 g = spec.grid;
    std::lock_guard<std::recursive_mutex> lock(device_mutex);
    Launch L;
    L.spec = &spec;
    L.body = body;
    L.closure = closure;
    L.serial = ++launch_serial;
    L.n_blocks = uint64_t(g.x) * g.y * g.z;
    pool().run(L);
    if (L.failed) {
        std::fprintf(stderr, "cuda-sim: kernel %s failed: %s\n", spec.name, L.fault.c_str());
        return cudaErrorLaunchFailure;
    }
    return cudaSuccess;
}

bool is_device_range(const void* p, size_t bytes) { return ::is_device_range(p, bytes); }

}  // namespace pyr_sim

// ---- streams, events, stream capture, graphs -------------------------------------------
//
// Work queued on a stream does not run when it is queued: it waits in the stream's queue
// until the host waits for it (cudaStreamSynchronize, cudaEventSynchronize of an event
// recorded after it, cudaDeviceSynchronize, the calls that synchronize implicitly), as if the
// device were always far behind the host. So a host that reads a result before waiting for
// it, or rewrites a pinned buffer that a queued copy still has to read, gets what a slow
// device would give it (poison, or the rewritten bytes, which the copy then reports). Streams
// are ordered with each other only as CUDA orders them: by cudaStreamWaitEvent, and the
// legacy stream (stream 0, the synchronous calls) with the blocking streams; a non-blocking
// stream's work is not run by a cudaMemcpy. PYR_SIM_EAGER=1 runs all work when it is queued
// instead (a bug that shows only without it is a missing wait).
//
// On a stream that captures, work becomes a node of the capture's graph (a copy of the
// launch's arguments, the copy's or memset's pointers and sizes), run in order at each replay
// of the graph, reading device memory as it is then. The rules of stream capture are enforced as
// CUDA documents them (cudaStreamBeginCapture, cudaThreadExchangeStreamCaptureMode, "stream
// capture" in the programming guide): a refused call returns its error, says why on stderr
// and invalidates the capture it conflicts with, whose cudaStreamEndCapture then fails.

namespace {

struct Node {  // a captured operation
    std::string what;
    std::function<cudaError_t()> run;
};
using Nodes = std::vector<std::shared_ptr<const Node>>;

struct Stream;

struct Capture {
    Stream* stream;  // where it began (the only stream of the capture: no forks are simulated)
    cudaStreamCaptureMode mode;
    std::thread::id thread;  // that began it
    unsigned long long id;
    std::string invalidated;  // why, once invalidated
    Nodes nodes;
};

struct Op {  // queued work, not yet run
    unsigned long long seq;  // the order of queuing over all streams
    std::string what;
    std::function<cudaError_t()> run;
};

struct Stream {
    unsigned flags = cudaStreamDefault;
    int device = 0;  // current when it was created (the legacy and per-thread ones: stream_device)
    Capture* capture = nullptr;
    std::deque<Op> queue;
    unsigned long long running = 0;  // the Op::seq being run (taken off the queue); 0: none
};

struct Event {
    unsigned flags = 0;
    int device = 0;  // current when it was created
    unsigned long long captured_by = 0;  // the capture it was last recorded in; 0: none
    Stream* stream = nullptr;             // where it was last recorded outside a capture
    unsigned long long seq = 0;           // the work of `stream' it waits for: seq <= this
};

}  // namespace

// The handles' types are the toolkit's opaque structs; the sim defines them.
struct CUgraph_st {
    Nodes nodes;
};
struct CUgraphExec_st {
    Nodes nodes;
};

namespace {

std::mutex state_mutex;  // guards what follows
std::set<Stream*> live_streams;
std::set<Event*> live_events;
std::set<CUgraph_st*> live_graphs;
std::set<CUgraphExec_st*> live_execs;
int failing_instantiations = 0;  // pyr_sim_fail_graph_instantiations
std::vector<Capture*> captures;  // those under way
unsigned long long capture_ids = 0;
// Two devices: the second lets a test check that the library gives an application's thread
// its own current device back. Both share the sim's memory.
constexpr int kSimDevices = 2;
thread_local int current_device = 0;

bool valid_device(int device) { return device >= 0 && device < kSimDevices; }
unsigned long long op_serial = 0;  // Op::seq of the latest queued work
Stream legacy_stream;                   // stream 0, cudaStreamLegacy: blocking
thread_local Stream per_thread_stream;  // cudaStreamPerThread: blocking as well
thread_local cudaStreamCaptureMode thread_mode = cudaStreamCaptureModeGlobal;

const char* mode_name(cudaStreamCaptureMode m) {
    return m == cudaStreamCaptureModeGlobal ? "global"
           : m == cudaStreamCaptureModeThreadLocal ? "thread-local" : "relaxed";
}

// null: not a stream handle (never created, or destroyed)
Stream* resolve(cudaStream_t s) {
    if (s == nullptr || s == cudaStreamLegacy) return &legacy_stream;
    if (s == cudaStreamPerThread) return &per_thread_stream;
    Stream* p = reinterpret_cast<Stream*>(s);
    return live_streams.count(p) ? p : nullptr;
}

// The device a stream's work goes to: its own, or for the legacy and per-thread streams the
// current one.
int stream_device(const Stream* st) {
    return st == &legacy_stream || st == &per_thread_stream ? current_device : st->device;
}

cudaError_t bad_stream(const char* call, cudaStream_t s) {
    std::fprintf(stderr, "cuda-sim: %s: %p is not a live stream\n", call, static_cast<void*>(s));
    return fail(cudaErrorInvalidResourceHandle);
}

void invalidate(Capture* c, const std::string& why) {
    if (c->invalidated.empty()) c->invalidated = why;
}

// Refuses `call' with `err': says so and invalidates the captures in `hit'.
cudaError_t refuse(const char* call, cudaError_t err, const std::vector<Capture*>& hit,
                   const char* why) {
    for (Capture* c : hit) {
        std::fprintf(stderr, "cuda-sim: %s %s (capture %llu, %s mode): %s; the capture is "
                     "invalidated\n", call, why, c->id, mode_name(c->mode), cudaGetErrorName(err));
        invalidate(c, std::string(call) + " " + why);
    }
    return fail(err);
}

// Work queued on, or a wait for, the legacy stream while a blocking stream captures: the
// implicit dependency on the capture that CUDA refuses.
// The captures under way on blocking streams.
std::vector<Capture*> blocking_captures() {
    std::vector<Capture*> hit;
    for (Capture* c : captures)
        if (!(c->stream->flags & cudaStreamNonBlocking)) hit.push_back(c);
    return hit;
}

cudaError_t check_legacy(const char* call) {
    const std::vector<Capture*> hit = blocking_captures();
    if (hit.empty()) return cudaSuccess;
    return refuse(call, cudaErrorStreamCaptureImplicit, hit,
                  "uses the legacy stream while a blocking stream captures");
}

// The stream behind handle `s' for work or a wait that `call' queues on it (state_mutex
// held); null, with *err set, for a bad handle or for the legacy stream while a blocking
// stream captures.
Stream* stream_for(const char* call, cudaStream_t s, cudaError_t* err) {
    Stream* st = resolve(s);
    *err = !st ? bad_stream(call, s) : st == &legacy_stream ? check_legacy(call) : cudaSuccess;
    return *err == cudaSuccess ? st : nullptr;
}

// A "potentially unsafe" call (cudaMalloc, cudaFree, pinned allocations, synchronous copies):
// refused on a thread that has a capture under way not begun in relaxed mode, and on a thread
// in global mode (the default) while another thread captures in global mode; never on a
// thread in relaxed mode (cudaThreadExchangeStreamCaptureMode).
cudaError_t check_unsafe(const char* call) {
    if (thread_mode == cudaStreamCaptureModeRelaxed) return cudaSuccess;
    const std::thread::id me = std::this_thread::get_id();
    std::vector<Capture*> hit;
    for (Capture* c : captures)
        if (c->thread == me ? c->mode != cudaStreamCaptureModeRelaxed
                            : c->mode == cudaStreamCaptureModeGlobal &&
                                  thread_mode == cudaStreamCaptureModeGlobal)
            hit.push_back(c);
    if (hit.empty()) return cudaSuccess;
    return refuse(call, cudaErrorStreamCaptureUnsupported, hit,
                  "while a stream capture is under way that forbids it");
}

cudaError_t check_unsafe_locked(const char* call) {
    std::lock_guard<std::mutex> lock(state_mutex);
    return check_unsafe(call);
}

cudaError_t run_nodes(const Nodes& nodes) {
    for (size_t i = 0; i < nodes.size(); ++i) {
        const cudaError_t err = nodes[i]->run();
        if (err != cudaSuccess) {
            std::fprintf(stderr, "cuda-sim: graph node %zu of %zu (%s) failed: %s\n", i,
                         nodes.size(), nodes[i]->what.c_str(), cudaGetErrorName(err));
            return err;
        }
    }
    return cudaSuccess;
}

bool eager() {
    static const bool on = [] {
        const char* env = std::getenv("PYR_SIM_EAGER");
        return env && *env && std::strcmp(env, "0") != 0;
    }();
    return on;
}

bool is_blocking(const Stream* st) {
    return st != &legacy_stream && !(st->flags & cudaStreamNonBlocking);
}

// Runs the work queued on `st' up to Op::seq `upto', in order; the first failure is returned
// (and said on stderr), the work after it still runs. The device lock is held throughout, so
// that work of one stream never overtakes itself when two threads wait for it.
cudaError_t drain(Stream* st, unsigned long long upto) {
    std::lock_guard<std::recursive_mutex> device(device_mutex);
    cudaError_t first = cudaSuccess;
    for (;;) {
        Op op;
        {
            std::lock_guard<std::mutex> lock(state_mutex);
            if (st->queue.empty() || st->queue.front().seq > upto) break;
            op = std::move(st->queue.front());
            st->queue.pop_front();
            st->running = op.seq;
        }
        const cudaError_t err = op.run();
        {
            std::lock_guard<std::mutex> lock(state_mutex);
            st->running = 0;
        }
        if (err != cudaSuccess && first == cudaSuccess) {
            std::fprintf(stderr, "cuda-sim: queued work failed when it ran: %s: %s\n",
                         op.what.c_str(), cudaGetErrorName(err));
            first = err;
        }
    }
    return first;
}

// drain() of each stream in turn; the first failure.
cudaError_t drain_each(const std::vector<Stream*>& streams, unsigned long long upto) {
    cudaError_t first = cudaSuccess;
    for (Stream* st : streams) {
        const cudaError_t err = drain(st, upto);
        if (first == cudaSuccess) first = err;
    }
    return first;
}

// The blocking streams' work up to `upto': what the legacy stream waits for.
cudaError_t drain_blocking(unsigned long long upto) {
    std::vector<Stream*> blocking{&per_thread_stream};
    {
        std::lock_guard<std::mutex> lock(state_mutex);
        for (Stream* st : live_streams)
            if (is_blocking(st)) blocking.push_back(st);
    }
    return drain_each(blocking, upto);
}

// What a wait for `st' up to `upto' runs: its work, and on the legacy stream the blocking
// streams' as well.
cudaError_t drain_to(Stream* st, unsigned long long upto) {
    cudaError_t first = st == &legacy_stream ? drain_blocking(upto) : cudaSuccess;
    const cudaError_t err = drain(st, upto);
    return first != cudaSuccess ? first : err;
}

// Everything queued so far, on every stream (cudaDeviceSynchronize, cudaFree).
cudaError_t drain_all() {
    unsigned long long now;
    std::vector<Stream*> all{&legacy_stream, &per_thread_stream};
    {
        std::lock_guard<std::mutex> lock(state_mutex);
        now = op_serial;
        all.insert(all.end(), live_streams.begin(), live_streams.end());
    }
    return drain_each(all, now);
}

// Whether an event's stream has been destroyed since its record (which ran its work);
// state_mutex held.
bool destroyed(Stream* st) {
    return st != &legacy_stream && st != &per_thread_stream && !live_streams.count(st);
}

}  // namespace

namespace pyr_sim {

cudaError_t enqueue(cudaStream_t stream, std::string what, std::function<cudaError_t()> op) {
    {
        std::lock_guard<std::mutex> lock(state_mutex);
        cudaError_t err;
        Stream* st = stream_for(what.c_str(), stream, &err);
        if (!st) return err;
        if (Capture* c = st->capture) {
            if (!c->invalidated.empty()) return fail(cudaErrorStreamCaptureInvalidated);
            c->nodes.push_back(std::make_shared<const Node>(Node{std::move(what), std::move(op)}));
            return cudaSuccess;
        }
        if (!eager()) {
            const unsigned long long seq = ++op_serial;
            // the legacy stream and the blocking streams wait for each other's earlier work
            const bool legacy = st == &legacy_stream;
            std::function<cudaError_t()> run = std::move(op);
            if (legacy || is_blocking(st))
                run = [legacy, seq, inner = std::move(run)] {
                    const cudaError_t err = legacy ? drain_blocking(seq - 1) : drain(&legacy_stream, seq - 1);
                    return err != cudaSuccess ? err : inner();
                };
            st->queue.push_back(Op{seq, std::move(what), std::move(run)});
            return cudaSuccess;
        }
    }
    std::lock_guard<std::recursive_mutex> lock(device_mutex);
    const cudaError_t err = op();
    return err == cudaSuccess ? err : fail(err);
}

// Whether work queued on `stream' now would be captured (false for a bad handle).
bool capturing(cudaStream_t stream) {
    std::lock_guard<std::mutex> lock(state_mutex);
    const Stream* st = resolve(stream);
    return st && st->capture;
}

// Waits for the work queued on `stream' so far (and, for the legacy stream, the blocking
// streams'): what a call that synchronizes with the stream does first.
cudaError_t wait_stream(cudaStream_t stream) {
    Stream* st;
    unsigned long long now;
    {
        std::lock_guard<std::mutex> lock(state_mutex);
        st = resolve(stream);
        if (!st) return cudaSuccess;  // the caller reports the bad handle
        now = op_serial;
    }
    const cudaError_t err = drain_to(st, now);
    return err == cudaSuccess ? err : fail(err);
}

void submit_launch(const LaunchSpec& spec, void (*body)(const void*),
                   std::shared_ptr<const void> closure) {
    const dim3 g = spec.grid, b = spec.block;
    const uint64_t threads = uint64_t(b.x) * b.y * b.z;
    // the device's limits (compute capability 8.x/9.x); more than 48 KiB of dynamic shared
    // memory needs cudaFuncSetAttribute, which is not simulated
    cudaError_t bad = cudaSuccess;
    if (threads == 0 || threads > 1024 || b.z > 64 || g.x == 0 || g.y == 0 || g.z == 0 ||
        g.x > 0x7fffffffu || g.y > 65535 || g.z > 65535)
        bad = cudaErrorInvalidConfiguration;
    else if (spec.smem > 48 * 1024)
        bad = cudaErrorInvalidValue;
    if (bad != cudaSuccess) {
        // a failed launch into a capturing stream invalidates the capture
        std::lock_guard<std::mutex> lock(state_mutex);
        if (Stream* st = resolve(spec.stream))
            if (st->capture) invalidate(st->capture, std::string("a failed launch of ") + spec.name);
        fail(bad);
        return;
    }
    {  // a kernel goes into a stream of the current device only (the runtime refuses others)
        std::lock_guard<std::mutex> lock(state_mutex);
        const Stream* st = resolve(spec.stream);
        if (st && stream_device(st) != current_device) {
            std::fprintf(stderr, "cuda-sim: launch of %s into a stream of device %d while device %d is current\n",
                         spec.name, stream_device(st), current_device);
            fail(cudaErrorInvalidResourceHandle);
            return;
        }
    }
    enqueue(spec.stream, spec.name, [spec, body, closure] { return run_launch(spec, body, closure.get()); });
}

}  // namespace pyr_sim

cudaError_t cudaStreamCreateWithFlags(cudaStream_t* stream, unsigned int flags) {
    if (!stream || (flags & ~unsigned(cudaStreamNonBlocking))) return fail(cudaErrorInvalidValue);
    Stream* s = new Stream;
    s->flags = flags;
    s->device = current_device;
    std::lock_guard<std::mutex> lock(state_mutex);
    live_streams.insert(s);
    *stream = reinterpret_cast<cudaStream_t>(s);
    return cudaSuccess;
}
cudaError_t cudaStreamCreate(cudaStream_t* stream) { return cudaStreamCreateWithFlags(stream, cudaStreamDefault); }
cudaError_t cudaStreamCreateWithPriority(cudaStream_t* stream, unsigned int flags, int) {
    return cudaStreamCreateWithFlags(stream, flags);
}

// The stream's queued work still runs (here: before the call returns).
cudaError_t cudaStreamDestroy(cudaStream_t stream) {
    {
        std::lock_guard<std::mutex> lock(state_mutex);
        Stream* st = resolve(stream);
        if (!st || st == &legacy_stream || st == &per_thread_stream) return bad_stream("cudaStreamDestroy", stream);
        if (st->capture) {
            std::fprintf(stderr, "cuda-sim: cudaStreamDestroy of a stream that captures (end the capture first)\n");
            return fail(cudaErrorIllegalState);
        }
    }
    pyr_sim::wait_stream(stream);
    std::lock_guard<std::mutex> lock(state_mutex);
    Stream* st = resolve(stream);
    if (!st) return bad_stream("cudaStreamDestroy", stream);
    live_streams.erase(st);
    delete st;
    return cudaSuccess;
}

cudaError_t cudaStreamGetFlags(cudaStream_t stream, unsigned int* flags) {
    std::lock_guard<std::mutex> lock(state_mutex);
    Stream* st = resolve(stream);
    if (!st) return bad_stream("cudaStreamGetFlags", stream);
    if (!flags) return fail(cudaErrorInvalidValue);
    *flags = st->flags;
    return cudaSuccess;
}

// Waiting for a stream runs what is queued on it (and what that waits for), except on a
// capturing stream (CUDA refuses to synchronize or query it, and invalidates the capture).
// A query runs the work too and answers "done": a host that polls would otherwise wait for
// ever on a device that only works when waited for.
static cudaError_t wait_for(const char* call, cudaStream_t stream) {
    {
        std::lock_guard<std::mutex> lock(state_mutex);
        cudaError_t err;
        const Stream* st = stream_for(call, stream, &err);
        if (!st) return err;
        if (st->capture)
            return refuse(call, cudaErrorStreamCaptureUnsupported, {st->capture}, "of the capturing stream");
    }
    return pyr_sim::wait_stream(stream);
}
cudaError_t cudaStreamSynchronize(cudaStream_t stream) { return wait_for("cudaStreamSynchronize", stream); }
cudaError_t cudaStreamQuery(cudaStream_t stream) { return wait_for("cudaStreamQuery", stream); }

cudaError_t cudaDeviceSynchronize() {
    {
        std::lock_guard<std::mutex> lock(state_mutex);
        if (!captures.empty())  // the device encompasses the capturing streams
            return refuse("cudaDeviceSynchronize", cudaErrorStreamCaptureUnsupported, captures,
                          "while a stream captures");
    }
    const cudaError_t err = drain_all();
    return err == cudaSuccess ? err : fail(err);
}

cudaError_t cudaThreadExchangeStreamCaptureMode(cudaStreamCaptureMode* mode) {
    if (!mode || unsigned(*mode) > unsigned(cudaStreamCaptureModeRelaxed)) return fail(cudaErrorInvalidValue);
    std::swap(*mode, thread_mode);
    return cudaSuccess;
}

cudaError_t cudaStreamBeginCapture(cudaStream_t stream, cudaStreamCaptureMode mode) {
    std::lock_guard<std::mutex> lock(state_mutex);
    Stream* st = resolve(stream);
    if (!st) return bad_stream("cudaStreamBeginCapture", stream);
    if (unsigned(mode) > unsigned(cudaStreamCaptureModeRelaxed)) return fail(cudaErrorInvalidValue);
    if (st == &legacy_stream) {
        std::fprintf(stderr, "cuda-sim: cudaStreamBeginCapture on the legacy stream\n");
        return fail(cudaErrorStreamCaptureUnsupported);
    }
    if (st->capture) {
        std::fprintf(stderr, "cuda-sim: cudaStreamBeginCapture on a stream that already captures\n");
        return fail(cudaErrorIllegalState);
    }
    Capture* c = new Capture{st, mode, std::this_thread::get_id(), ++capture_ids, {}, {}};
    st->capture = c;
    captures.push_back(c);
    return cudaSuccess;
}

cudaError_t cudaStreamEndCapture(cudaStream_t stream, cudaGraph_t* graph) {
    std::lock_guard<std::mutex> lock(state_mutex);
    Stream* st = resolve(stream);
    if (!st) return bad_stream("cudaStreamEndCapture", stream);
    if (!graph) return fail(cudaErrorInvalidValue);
    Capture* c = st->capture;
    if (!c) {
        std::fprintf(stderr, "cuda-sim: cudaStreamEndCapture on a stream that does not capture\n");
        return fail(cudaErrorIllegalState);
    }
    if (c->mode != cudaStreamCaptureModeRelaxed && c->thread != std::this_thread::get_id()) {
        std::fprintf(stderr, "cuda-sim: cudaStreamEndCapture of a %s-mode capture from another "
                     "thread than the one that began it\n", mode_name(c->mode));
        return fail(cudaErrorStreamCaptureWrongThread);
    }
    st->capture = nullptr;
    captures.erase(std::find(captures.begin(), captures.end(), c));
    std::unique_ptr<Capture> done(c);
    *graph = nullptr;
    if (!c->invalidated.empty()) {
        std::fprintf(stderr, "cuda-sim: cudaStreamEndCapture: the capture was invalidated (%s)\n",
                     c->invalidated.c_str());
        return fail(cudaErrorStreamCaptureInvalidated);
    }
    CUgraph_st* g = new CUgraph_st{std::move(c->nodes)};
    live_graphs.insert(g);
    *graph = g;
    return cudaSuccess;
}

cudaError_t cudaStreamIsCapturing(cudaStream_t stream, cudaStreamCaptureStatus* status) {
    std::lock_guard<std::mutex> lock(state_mutex);
    Stream* st = resolve(stream);
    if (!st) return bad_stream("cudaStreamIsCapturing", stream);
    if (!status) return fail(cudaErrorInvalidValue);
    if (st == &legacy_stream && !blocking_captures().empty())  // refused, not invalidating
        return fail(cudaErrorStreamCaptureImplicit);
    *status = !st->capture ? cudaStreamCaptureStatusNone
              : st->capture->invalidated.empty() ? cudaStreamCaptureStatusActive
                                                 : cudaStreamCaptureStatusInvalidated;
    return cudaSuccess;
}

cudaError_t cudaGraphGetNodes(cudaGraph_t graph, cudaGraphNode_t* nodes, size_t* n) {
    std::lock_guard<std::mutex> lock(state_mutex);
    if (!live_graphs.count(graph) || !n) return fail(cudaErrorInvalidValue);
    const size_t have = graph->nodes.size();
    if (nodes) {
        for (size_t i = 0; i < *n; ++i)
            nodes[i] = i < have ? reinterpret_cast<cudaGraphNode_t>(const_cast<Node*>(graph->nodes[i].get()))
                                : nullptr;
        *n = std::min(*n, have);
    } else {
        *n = have;
    }
    return cudaSuccess;
}

// A test's hook (tests declare it weak, so that a GPU build skips them): the next n
// instantiations fail with cudaErrorMemoryAllocation, as a GPU's do when its memory is full.
extern "C" void pyr_sim_fail_graph_instantiations(int n) {
    std::lock_guard<std::mutex> lock(state_mutex);
    failing_instantiations = n;
}

cudaError_t cudaGraphInstantiate(cudaGraphExec_t* exec, cudaGraph_t graph, unsigned long long) {
    std::lock_guard<std::mutex> lock(state_mutex);
    if (!exec || !live_graphs.count(graph)) return fail(cudaErrorInvalidValue);
    if (failing_instantiations > 0) {
        --failing_instantiations;
        return fail(cudaErrorMemoryAllocation);
    }
    CUgraphExec_st* e = new CUgraphExec_st{graph->nodes};  // later changes to the graph stay out
    live_execs.insert(e);
    *exec = e;
    return cudaSuccess;
}

cudaError_t cudaGraphLaunch(cudaGraphExec_t exec, cudaStream_t stream) {
    Nodes nodes;
    {
        std::lock_guard<std::mutex> lock(state_mutex);
        if (!live_execs.count(exec)) {
            std::fprintf(stderr, "cuda-sim: cudaGraphLaunch of %p: not a live executable graph\n",
                         static_cast<void*>(exec));
            return fail(cudaErrorInvalidValue);
        }
        nodes = exec->nodes;
    }
    // into a capturing stream: the whole graph becomes one node (a child graph)
    return pyr_sim::enqueue(stream, "graph of " + std::to_string(nodes.size()) + " nodes",
                            [nodes] { return run_nodes(nodes); });
}

cudaError_t cudaGraphDestroy(cudaGraph_t graph) {
    std::lock_guard<std::mutex> lock(state_mutex);
    if (!live_graphs.erase(graph)) return fail(cudaErrorInvalidValue);
    delete graph;
    return cudaSuccess;
}

cudaError_t cudaGraphExecDestroy(cudaGraphExec_t exec) {
    std::lock_guard<std::mutex> lock(state_mutex);
    if (!live_execs.erase(exec)) return fail(cudaErrorInvalidValue);
    delete exec;
    return cudaSuccess;
}

cudaError_t cudaEventCreateWithFlags(cudaEvent_t* event, unsigned int flags) {
    if (!event || (flags & ~unsigned(cudaEventBlockingSync | cudaEventDisableTiming | cudaEventInterprocess)))
        return fail(cudaErrorInvalidValue);
    Event* e = new Event;
    e->flags = flags;
    e->device = current_device;
    std::lock_guard<std::mutex> lock(state_mutex);
    live_events.insert(e);
    *event = reinterpret_cast<cudaEvent_t>(e);
    return cudaSuccess;
}
cudaError_t cudaEventCreate(cudaEvent_t* event) { return cudaEventCreateWithFlags(event, cudaEventDefault); }

static Event* live_event(cudaEvent_t event) {
    Event* e = reinterpret_cast<Event*>(event);
    return live_events.count(e) ? e : nullptr;
}

cudaError_t cudaEventDestroy(cudaEvent_t event) {
    std::lock_guard<std::mutex> lock(state_mutex);
    Event* e = live_event(event);
    if (!e) return fail(cudaErrorInvalidResourceHandle);
    live_events.erase(e);
    delete e;
    return cudaSuccess;
}

// Recorded on a capturing stream, the event becomes part of the capture (a "captured event");
// elsewhere it marks the work queued on the stream so far, which a wait for it runs.
cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t stream) {
    std::lock_guard<std::mutex> lock(state_mutex);
    Event* e = live_event(event);
    if (!e) return fail(cudaErrorInvalidResourceHandle);
    cudaError_t err;
    Stream* st = stream_for("cudaEventRecord", stream, &err);
    if (!st) return err;
    if (stream_device(st) != e->device) {
        std::fprintf(stderr, "cuda-sim: cudaEventRecord of an event of device %d on a stream of device %d\n",
                     e->device, stream_device(st));
        return fail(cudaErrorInvalidResourceHandle);
    }
    if (st->capture && !st->capture->invalidated.empty()) return fail(cudaErrorStreamCaptureInvalidated);
    e->captured_by = st->capture ? st->capture->id : 0;
    e->stream = st->capture ? nullptr : st;
    e->seq = op_serial;
    return cudaSuccess;
}

// Runs the work the event marks (an event never recorded is complete). A query does too and
// answers "done" (see wait_for).
static cudaError_t wait_for_event(const char* call, cudaEvent_t event) {
    Stream* st;
    unsigned long long seq;
    {
        std::lock_guard<std::mutex> lock(state_mutex);
        Event* e = live_event(event);
        if (!e) return fail(cudaErrorInvalidResourceHandle);
        if (e->captured_by) {
            std::fprintf(stderr, "cuda-sim: %s of an event last recorded in a capturing stream (capture %llu)\n",
                         call, e->captured_by);
            for (Capture* c : captures)
                if (c->id == e->captured_by) invalidate(c, std::string(call) + " of a captured event");
            return fail(cudaErrorCapturedEvent);
        }
        st = e->stream;
        seq = e->seq;
        if (st && destroyed(st)) st = nullptr;
    }
    if (!st) return cudaSuccess;
    const cudaError_t err = drain_to(st, seq);
    return err == cudaSuccess ? err : fail(err);
}
cudaError_t cudaEventSynchronize(cudaEvent_t event) { return wait_for_event("cudaEventSynchronize", event); }
// cudaErrorNotReady while work the event marks is still queued: the late device has not run
// it (a query does not make it run), so code that polls must not rely on progress.
cudaError_t cudaEventQuery(cudaEvent_t event) {
    std::lock_guard<std::mutex> lock(state_mutex);
    Event* e = live_event(event);
    if (!e) return fail(cudaErrorInvalidResourceHandle);
    if (e->captured_by) return fail(cudaErrorCapturedEvent);
    Stream* st = e->stream;
    if (!st || destroyed(st)) return cudaSuccess;
    if (st->running && st->running <= e->seq) return cudaErrorNotReady;
    for (const Op& op : st->queue)
        if (op.seq <= e->seq) return cudaErrorNotReady;
    return cudaSuccess;
}

// Outside capture, the stream's later work waits for the work the event marks (a queued
// wait that runs it). In a capture, waiting for an event recorded in the same capture is a
// no-op (one stream, in order); a wait that would join another stream into the capture, or
// reach out of it, is not simulated.
cudaError_t cudaStreamWaitEvent(cudaStream_t stream, cudaEvent_t event, unsigned int flags) {
    std::lock_guard<std::mutex> lock(state_mutex);
    Event* e = live_event(event);
    if (!e) return fail(cudaErrorInvalidResourceHandle);
    cudaError_t err;
    Stream* st = stream_for("cudaStreamWaitEvent", stream, &err);
    if (!st) return err;
    const unsigned long long in = st->capture ? st->capture->id : 0;
    if (e->captured_by != in && !(in && !e->captured_by && (flags & cudaEventWaitExternal))) {
        std::fprintf(stderr, "cuda-sim: cudaStreamWaitEvent across a capture boundary (forks and "
                     "joins of captures are not simulated)\n");
        return fail(cudaErrorNotSupported);
    }
    Stream* marked = e->stream;
    if (in || !marked || marked == st || eager()) return cudaSuccess;
    const unsigned long long seq = e->seq;
    st->queue.push_back(Op{++op_serial, "cudaStreamWaitEvent", [marked, seq] {
        {
            std::lock_guard<std::mutex> lock(state_mutex);
            if (destroyed(marked)) return cudaSuccess;
        }
        return drain_to(marked, seq);
    }});
    return cudaSuccess;
}

// ---- device --------------------------------------------------------------------------------

static size_t device_total_bytes() {
    static const size_t bytes = [] {
        const char* env = std::getenv("PYR_SIM_DEVICE_MEM_MB");
        const long long mb = env ? std::atoll(env) : 80 * 1024;
        return size_t(mb > 0 ? mb : 1) << 20;
    }();
    return bytes;
}
static size_t device_used = 0;  // under alloc_mutex

cudaError_t cudaGetDeviceCount(int* count) {
    *count = kSimDevices;
    return cudaSuccess;
}
cudaError_t cudaSetDevice(int device) {
    if (!valid_device(device)) return fail(cudaErrorInvalidDevice);
    current_device = device;
    return cudaSuccess;
}
cudaError_t cudaGetDevice(int* device) {
    *device = current_device;
    return cudaSuccess;
}

// An sm_90-class device as far as the sim's limits go (48 KiB of shared memory per block:
// cudaFuncSetAttribute is not simulated), with PYR_SIM_DEVICE_MEM_MB of memory (80 GiB).
cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int device) {
    if (!prop) return fail(cudaErrorInvalidValue);
    if (!valid_device(device)) return fail(cudaErrorInvalidDevice);
    std::memset(prop, 0, sizeof *prop);
    std::snprintf(prop->name, sizeof prop->name, "cuda-sim");
    prop->totalGlobalMem = device_total_bytes();
    prop->sharedMemPerBlock = prop->sharedMemPerBlockOptin = 48 * 1024;
    prop->sharedMemPerMultiprocessor = 228 * 1024;
    prop->regsPerBlock = prop->regsPerMultiprocessor = 65536;
    prop->warpSize = 32;
    prop->maxThreadsPerBlock = 1024;
    prop->maxThreadsDim[0] = prop->maxThreadsDim[1] = 1024;
    prop->maxThreadsDim[2] = 64;
    prop->maxGridSize[0] = 0x7fffffff;
    prop->maxGridSize[1] = prop->maxGridSize[2] = 65535;
    prop->totalConstMem = 64 * 1024;
    prop->major = 9;
    prop->minor = 0;
    prop->multiProcessorCount = 132;
    prop->maxThreadsPerMultiProcessor = 2048;
    prop->maxBlocksPerMultiProcessor = 32;
    prop->canMapHostMemory = prop->unifiedAddressing = prop->concurrentKernels = 1;
    prop->memoryPoolsSupported = prop->managedMemory = 1;
    prop->asyncEngineCount = 2;
    prop->l2CacheSize = 50 << 20;
    return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
    if (!value) return fail(cudaErrorInvalidValue);
    if (!valid_device(device)) return fail(cudaErrorInvalidDevice);
    cudaDeviceProp p;
    cudaGetDeviceProperties(&p, 0);
    switch (attr) {
        case cudaDevAttrMaxThreadsPerBlock: *value = p.maxThreadsPerBlock; break;
        case cudaDevAttrMaxBlockDimX: *value = p.maxThreadsDim[0]; break;
        case cudaDevAttrMaxBlockDimY: *value = p.maxThreadsDim[1]; break;
        case cudaDevAttrMaxBlockDimZ: *value = p.maxThreadsDim[2]; break;
        case cudaDevAttrMaxGridDimX: *value = p.maxGridSize[0]; break;
        case cudaDevAttrMaxGridDimY: *value = p.maxGridSize[1]; break;
        case cudaDevAttrMaxGridDimZ: *value = p.maxGridSize[2]; break;
        case cudaDevAttrMaxSharedMemoryPerBlock: *value = int(p.sharedMemPerBlock); break;
        case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = int(p.sharedMemPerBlockOptin); break;
        case cudaDevAttrWarpSize: *value = p.warpSize; break;
        case cudaDevAttrMultiProcessorCount: *value = p.multiProcessorCount; break;
        case cudaDevAttrComputeCapabilityMajor: *value = p.major; break;
        case cudaDevAttrComputeCapabilityMinor: *value = p.minor; break;
        case cudaDevAttrUnifiedAddressing: *value = 1; break;
        case cudaDevAttrMemoryPoolsSupported: *value = 1; break;
        default:
            std::fprintf(stderr, "cuda-sim: cudaDeviceGetAttribute(%d) is not simulated\n", int(attr));
            return fail(cudaErrorInvalidValue);
    }
    return cudaSuccess;
}

cudaError_t cudaMemGetInfo(size_t* free_bytes, size_t* total_bytes) {
    if (!free_bytes || !total_bytes) return fail(cudaErrorInvalidValue);
    std::lock_guard<std::mutex> lock(alloc_mutex);
    *total_bytes = device_total_bytes();
    *free_bytes = *total_bytes - std::min(device_used, *total_bytes);
    return cudaSuccess;
}

// Memory pools: the default one and those created; their attributes are accepted and their
// allocations are cudaMallocAsync's (at once here). A pool used after its destruction, or
// destroyed twice, is an error.
static char default_pool;
static std::set<cudaMemPool_t> created_pools;  // under alloc_mutex
static bool is_pool(cudaMemPool_t pool) {
    std::lock_guard<std::mutex> lock(alloc_mutex);
    return pool == reinterpret_cast<cudaMemPool_t>(&default_pool) || created_pools.count(pool) > 0;
}
cudaError_t cudaDeviceGetDefaultMemPool(cudaMemPool_t* pool, int device) {
    if (!pool) return fail(cudaErrorInvalidValue);
    if (!valid_device(device)) return fail(cudaErrorInvalidDevice);
    *pool = reinterpret_cast<cudaMemPool_t>(&default_pool);
    return cudaSuccess;
}
cudaError_t cudaMemPoolCreate(cudaMemPool_t* pool, const cudaMemPoolProps* props) {
    if (!pool || !props || props->allocType != cudaMemAllocationTypePinned ||
        props->location.type != cudaMemLocationTypeDevice)
        return fail(cudaErrorInvalidValue);
    if (!valid_device(props->location.id)) return fail(cudaErrorInvalidDevice);
    std::lock_guard<std::mutex> lock(alloc_mutex);
    *pool = reinterpret_cast<cudaMemPool_t>(new char);
    created_pools.insert(*pool);
    return cudaSuccess;
}
cudaError_t cudaMemPoolDestroy(cudaMemPool_t pool) {
    std::lock_guard<std::mutex> lock(alloc_mutex);
    if (created_pools.erase(pool) == 0) return fail(cudaErrorInvalidValue);
    delete reinterpret_cast<char*>(pool);
    return cudaSuccess;
}
cudaError_t cudaMallocFromPoolAsync(void** ptr, size_t bytes, cudaMemPool_t pool, cudaStream_t stream) {
    if (!is_pool(pool)) return fail(cudaErrorInvalidValue);
    return cudaMallocAsync(ptr, bytes, stream);
}
cudaError_t cudaMemPoolSetAttribute(cudaMemPool_t pool, cudaMemPoolAttr attr, void* value) {
    if (!is_pool(pool) || !value) return fail(cudaErrorInvalidValue);
    switch (attr) {
        case cudaMemPoolReuseFollowEventDependencies:
        case cudaMemPoolReuseAllowOpportunistic:
        case cudaMemPoolReuseAllowInternalDependencies:
        case cudaMemPoolAttrReleaseThreshold:
        case cudaMemPoolAttrReservedMemHigh:  // only resettable to 0
        case cudaMemPoolAttrUsedMemHigh: return cudaSuccess;
        default: return fail(cudaErrorInvalidValue);
    }
}

cudaError_t cudaGetLastError() {
    const cudaError_t e = last_error;
    last_error = cudaSuccess;
    return e;
}
cudaError_t cudaPeekAtLastError() { return last_error; }

// The errors the sim produces; the toolkit's tables live in libcudart.
const char* cudaGetErrorName(cudaError_t err) {
    switch (err) {
#define PYR_SIM_ERR(e) case e: return #e;
        PYR_SIM_ERR(cudaSuccess)
        PYR_SIM_ERR(cudaErrorInvalidValue)
        PYR_SIM_ERR(cudaErrorMemoryAllocation)
        PYR_SIM_ERR(cudaErrorInvalidConfiguration)
        PYR_SIM_ERR(cudaErrorLaunchFailure)
        PYR_SIM_ERR(cudaErrorIllegalAddress)
        PYR_SIM_ERR(cudaErrorInvalidDevice)
        PYR_SIM_ERR(cudaErrorInvalidResourceHandle)
        PYR_SIM_ERR(cudaErrorNotSupported)
        PYR_SIM_ERR(cudaErrorIllegalState)
        PYR_SIM_ERR(cudaErrorStreamCaptureUnsupported)
        PYR_SIM_ERR(cudaErrorStreamCaptureInvalidated)
        PYR_SIM_ERR(cudaErrorStreamCaptureImplicit)
        PYR_SIM_ERR(cudaErrorStreamCaptureWrongThread)
        PYR_SIM_ERR(cudaErrorCapturedEvent)
#undef PYR_SIM_ERR
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
        case cudaErrorIllegalAddress: return "an illegal memory access was encountered (cuda-sim: see stderr)";
        case cudaErrorInvalidDevice: return "invalid device ordinal";
        case cudaErrorInvalidResourceHandle: return "invalid resource handle";
        case cudaErrorNotSupported: return "operation not supported (cuda-sim: not simulated, see stderr)";
        case cudaErrorIllegalState: return "the operation cannot be performed in the present state";
        case cudaErrorStreamCaptureUnsupported: return "operation not permitted when stream is capturing";
        case cudaErrorStreamCaptureInvalidated: return "operation failed due to a previous error during capture";
        case cudaErrorStreamCaptureImplicit: return "operation would make the legacy stream depend on a capturing blocking stream";
        case cudaErrorStreamCaptureWrongThread: return "attempt to terminate a thread-local capture sequence from another thread";
        case cudaErrorCapturedEvent: return "operation not permitted on an event last recorded in a capturing stream";
        default: return "unknown error (not produced by cuda-sim)";
    }
}

// ---- memory --------------------------------------------------------------------------------

// 256-byte aligned as cudaMalloc's, exactly `bytes' long (ASan reports reads past it), and
// filled with 0xFF bytes (NaN in fp32, fp16 and bf16) where the device leaves garbage.
static cudaError_t alloc_device(void** ptr, size_t bytes) {
    if (!ptr) return fail(cudaErrorInvalidValue);
    {
        std::lock_guard<std::mutex> lock(alloc_mutex);
        if (bytes > device_total_bytes() - std::min(device_used, device_total_bytes()))
            return fail(cudaErrorMemoryAllocation);
        device_used += bytes;
    }
    void* p = nullptr;
    if (posix_memalign(&p, 256, bytes ? bytes : 1) != 0) {
        std::lock_guard<std::mutex> lock(alloc_mutex);
        device_used -= bytes;
        return fail(cudaErrorMemoryAllocation);
    }
    std::memset(p, 0xFF, bytes);
    {
        std::lock_guard<std::mutex> lock(alloc_mutex);
        allocations[reinterpret_cast<uintptr_t>(p)] = bytes;
    }
    *ptr = p;
    return cudaSuccess;
}

cudaError_t cudaMalloc(void** ptr, size_t bytes) {
    const cudaError_t unsafe = check_unsafe_locked("cudaMalloc");
    return unsafe != cudaSuccess ? unsafe : alloc_device(ptr, bytes);
}

static cudaError_t free_device(const char* call, void* ptr) {
    if (!ptr) return cudaSuccess;
    {
        std::lock_guard<std::mutex> lock(alloc_mutex);
        auto it = allocations.find(reinterpret_cast<uintptr_t>(ptr));
        if (it == allocations.end()) {
            std::fprintf(stderr, "cuda-sim: %s(%p): not a cudaMalloc'd pointer\n", call, ptr);
            return fail(cudaErrorInvalidValue);
        }
        device_used -= it->second;
        std::memset(ptr, 0xFF, it->second);  // a later read through a stale pointer: NaN
        allocations.erase(it);
    }
    std::free(ptr);
    return cudaSuccess;
}

static bool is_allocation(void* ptr) {
    std::lock_guard<std::mutex> lock(alloc_mutex);
    return allocations.count(reinterpret_cast<uintptr_t>(ptr)) != 0;
}

cudaError_t cudaFree(void* ptr) {
    const cudaError_t unsafe = check_unsafe_locked("cudaFree");  // cudaFree synchronizes
    if (unsafe != cudaSuccess) return unsafe;
    drain_all();  // its failures belong to the work that failed
    return free_device("cudaFree", ptr);
}

// A stream-ordered allocation is made at once (usable by the work queued after it); a
// stream-ordered free is queued. Into a capturing stream they would become memory nodes,
// which are not simulated.
static cudaError_t check_alloc_stream(const char* call, cudaStream_t stream) {
    std::lock_guard<std::mutex> lock(state_mutex);
    cudaError_t err;
    const Stream* st = stream_for(call, stream, &err);
    if (!st) return err;
    if (st->capture) {
        std::fprintf(stderr, "cuda-sim: %s into a capturing stream: memory nodes are not simulated\n", call);
        return fail(cudaErrorNotSupported);
    }
    return cudaSuccess;
}
cudaError_t cudaMallocAsync(void** ptr, size_t bytes, cudaStream_t stream) {
    const cudaError_t err = check_alloc_stream("cudaMallocAsync", stream);
    return err != cudaSuccess ? err : alloc_device(ptr, bytes);
}
// The block goes back when the stream's work before it has run.
cudaError_t cudaFreeAsync(void* ptr, cudaStream_t stream) {
    const cudaError_t err = check_alloc_stream("cudaFreeAsync", stream);
    if (err != cudaSuccess) return err;
    if (ptr && !is_allocation(ptr)) return free_device("cudaFreeAsync", ptr);  // says why
    return pyr_sim::enqueue(stream, "cudaFreeAsync", [ptr] { return free_device("cudaFreeAsync", ptr); });
}

// Page-locked host memory: host memory here, tracked so that cudaFreeHost can check it.
static std::map<uintptr_t, size_t> host_allocations;  // under alloc_mutex

cudaError_t cudaHostAlloc(void** ptr, size_t bytes, unsigned int flags) {
    const cudaError_t unsafe = check_unsafe_locked("cudaHostAlloc");
    if (unsafe != cudaSuccess) return unsafe;
    if (!ptr || (flags & ~unsigned(cudaHostAllocPortable | cudaHostAllocMapped | cudaHostAllocWriteCombined)))
        return fail(cudaErrorInvalidValue);
    void* p = nullptr;
    if (posix_memalign(&p, 4096, bytes ? bytes : 1) != 0) return fail(cudaErrorMemoryAllocation);
    std::lock_guard<std::mutex> lock(alloc_mutex);
    host_allocations[reinterpret_cast<uintptr_t>(p)] = bytes;
    *ptr = p;
    return cudaSuccess;
}
cudaError_t cudaMallocHost(void** ptr, size_t bytes) { return cudaHostAlloc(ptr, bytes, cudaHostAllocDefault); }

// Whether [p, p + bytes) lies in one pinned allocation.
static bool is_pinned(const void* p, size_t bytes) {
    std::lock_guard<std::mutex> lock(alloc_mutex);
    return inside_one(host_allocations, p, bytes);
}

// Pinned ranges that queued copies have yet to read (start, bytes) -> how many.
static std::map<std::pair<uintptr_t, size_t>, int> pinned_reads;  // under alloc_mutex

static void note_pinned_read(const void* p, size_t bytes, int delta) {
    std::lock_guard<std::mutex> lock(alloc_mutex);
    const auto key = std::make_pair(reinterpret_cast<uintptr_t>(p), bytes);
    if ((pinned_reads[key] += delta) == 0) pinned_reads.erase(key);
}

static bool pinned_read_pending(const void* p, size_t bytes) {
    const auto a = reinterpret_cast<uintptr_t>(p);
    std::lock_guard<std::mutex> lock(alloc_mutex);
    for (const auto& r : pinned_reads)
        if (r.first.first < a + bytes && a < r.first.first + r.first.second) return true;
    return false;
}

cudaError_t cudaFreeHost(void* ptr) {
    const cudaError_t unsafe = check_unsafe_locked("cudaFreeHost");  // synchronizes too
    if (unsafe != cudaSuccess) return unsafe;
    if (!ptr) return cudaSuccess;
    drain_all();
    {
        std::lock_guard<std::mutex> lock(alloc_mutex);
        if (host_allocations.erase(reinterpret_cast<uintptr_t>(ptr)) == 0) {
            std::fprintf(stderr, "cuda-sim: cudaFreeHost(%p): not from cudaHostAlloc/cudaMallocHost\n", ptr);
            return fail(cudaErrorInvalidValue);
        }
    }
    std::free(ptr);
    return cudaSuccess;
}

// The copy itself: device sides must lie inside one cudaMalloc'd block (checked when the copy
// is queued and again when it runs: a replayed graph may outlive a buffer).
static cudaError_t copy_now(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind) {
    if (bytes == 0) return cudaSuccess;
    if (kind == cudaMemcpyDefault) {
        std::memmove(dst, src, bytes);  // unified addressing: either side may be either
        return cudaSuccess;
    }
    const bool dst_dev = kind == cudaMemcpyHostToDevice || kind == cudaMemcpyDeviceToDevice;
    const bool src_dev = kind == cudaMemcpyDeviceToHost || kind == cudaMemcpyDeviceToDevice;
    if (dst_dev && !is_device_range(dst, bytes)) return bad_range("cudaMemcpy to", dst, bytes);
    if (src_dev && !is_device_range(src, bytes)) return bad_range("cudaMemcpy from", src, bytes);
    std::memmove(dst, src, bytes);
    return cudaSuccess;
}

static cudaError_t set_now(void* ptr, int value, size_t bytes) {
    if (bytes == 0) return cudaSuccess;
    if (!is_device_range(ptr, bytes)) return bad_range("cudaMemset", ptr, bytes);
    std::memset(ptr, value, bytes);
    return cudaSuccess;
}

static bool valid_kind(cudaMemcpyKind kind) {
    return unsigned(kind) <= unsigned(cudaMemcpyDefault);
}

// The synchronous calls go through the legacy stream and block the host: refused while a
// blocking stream captures (implicit dependency) and where unsafe calls are.
static cudaError_t check_sync_call(const char* call) {
    std::lock_guard<std::mutex> lock(state_mutex);
    const cudaError_t err = check_legacy(call);
    return err != cudaSuccess ? err : check_unsafe(call);
}

// A synchronous call runs on the legacy stream: after its work and the blocking streams'
// (not after a non-blocking stream's).
cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind) {
    const cudaError_t err = check_sync_call("cudaMemcpy");
    if (err != cudaSuccess) return err;
    if (!valid_kind(kind)) return fail(cudaErrorInvalidValue);
    pyr_sim::wait_stream(cudaStreamLegacy);
    std::lock_guard<std::recursive_mutex> lock(device_mutex);
    const cudaError_t st = copy_now(dst, src, bytes, kind);
    return st == cudaSuccess ? st : fail(st);
}

cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind,
                            cudaStream_t stream) {
    if (!valid_kind(kind)) return fail(cudaErrorInvalidValue);
    if (bytes && kind != cudaMemcpyDefault && kind != cudaMemcpyHostToHost) {  // bad pointers fail the call
        const bool dst_dev = kind != cudaMemcpyDeviceToHost, src_dev = kind != cudaMemcpyHostToDevice;
        if (dst_dev && !is_device_range(dst, bytes)) return bad_range("cudaMemcpyAsync to", dst, bytes);
        if (src_dev && !is_device_range(src, bytes)) return bad_range("cudaMemcpyAsync from", src, bytes);
    }
    char what[96];
    std::snprintf(what, sizeof what, "cudaMemcpyAsync of %zu bytes", bytes);
    if (bytes == 0 || eager() || pyr_sim::capturing(stream))
        return pyr_sim::enqueue(stream, what, [=] { return copy_now(dst, src, bytes, kind); });

    // The host side(s) of the copy, and how CUDA treats them ("API synchronization behavior").
    const bool dst_host = kind == cudaMemcpyDefault ? !is_device_range(dst, bytes)
                          : kind == cudaMemcpyDeviceToHost || kind == cudaMemcpyHostToHost;
    const bool src_host = kind == cudaMemcpyDefault ? !is_device_range(src, bytes)
                          : kind == cudaMemcpyHostToDevice || kind == cudaMemcpyHostToHost;
    if (dst_host && !is_pinned(dst, bytes)) {  // into pageable memory: returns when done
        const cudaError_t err = pyr_sim::enqueue(stream, what, [=] { return copy_now(dst, src, bytes, kind); });
        return err != cudaSuccess ? err : pyr_sim::wait_stream(stream);
    }
    if (src_host) {
        // Pageable: staged before the call returns. Pinned: read when the copy runs; a host
        // that rewrites it before then races the copy, which reports it.
        const bool pinned = is_pinned(src, bytes);
        auto copy = std::make_shared<const std::vector<char>>(static_cast<const char*>(src),
                                                              static_cast<const char*>(src) + bytes);
        if (pinned) note_pinned_read(src, bytes, +1);
        return pyr_sim::enqueue(stream, what, [=] {
            if (!pinned) return copy_now(dst, copy->data(), bytes, kind);
            note_pinned_read(src, bytes, -1);
            if (std::memcmp(src, copy->data(), bytes) != 0) {
                std::fprintf(stderr, "cuda-sim: the pinned source of a cudaMemcpyAsync (%zu bytes at %p) "
                             "was rewritten by the host before the copy ran: wait for the copy (an "
                             "event or the stream) before reusing the buffer\n", bytes, src);
                return cudaErrorIllegalState;
            }
            return copy_now(dst, src, bytes, kind);
        });
    }
    // Into pinned memory: poisoned (NaN) until the copy runs, so that a host reading it
    // before waiting sees it; not where a queued copy still has to read it.
    if (dst_host && !pinned_read_pending(dst, bytes)) std::memset(dst, 0xFF, bytes);
    return pyr_sim::enqueue(stream, what, [=] { return copy_now(dst, src, bytes, kind); });
}

cudaError_t cudaMemset(void* ptr, int value, size_t bytes) {
    const cudaError_t err = check_sync_call("cudaMemset");
    if (err != cudaSuccess) return err;
    pyr_sim::wait_stream(cudaStreamLegacy);
    std::lock_guard<std::recursive_mutex> lock(device_mutex);
    const cudaError_t st = set_now(ptr, value, bytes);
    return st == cudaSuccess ? st : fail(st);
}

cudaError_t cudaMemsetAsync(void* ptr, int value, size_t bytes, cudaStream_t stream) {
    if (bytes && !is_device_range(ptr, bytes)) return bad_range("cudaMemsetAsync", ptr, bytes);
    char what[96];
    std::snprintf(what, sizeof what, "cudaMemsetAsync of %zu bytes", bytes);
    return pyr_sim::enqueue(stream, what, [=] { return set_now(ptr, value, bytes); });
}
