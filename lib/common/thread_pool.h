// A fixed pool of worker threads running one parallel loop at a time.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace pyr {

class ThreadPool {
public:
    // n_threads total workers including the calling thread; 0 = hardware threads. Throws
    // pyr::Error (PYR_ERR_OUT_OF_MEMORY) when the system cannot start that many.
    explicit ThreadPool(int n_threads);
    ~ThreadPool();
    ThreadPool(const ThreadPool&) = delete;
    ThreadPool& operator=(const ThreadPool&) = delete;

    int size() const { return int(workers_.size()) + 1; }

    // Calls fn(begin, end) over [0, n) split into contiguous chunks, one per thread, and
    // waits for all. One parallel_for at a time (callers serialise). fn must not throw.
    void parallel_for(int64_t n, const std::function<void(int64_t, int64_t)>& fn);

private:
    void worker_main(int index);
    void stop();  // ends and joins the workers

    std::vector<std::thread> workers_;
    std::mutex mutex_;
    std::condition_variable start_cv_, done_cv_;
    const std::function<void(int64_t, int64_t)>* job_ = nullptr;
    int64_t job_n_ = 0;
    uint64_t generation_ = 0;
    int pending_ = 0;
    bool stop_ = false;
};

}  // namespace pyr
