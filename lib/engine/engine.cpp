#include "engine/engine.h"

#include <algorithm>
#include <array>
#include <cctype>
#include <exception>

#include "common/error.h"
#include "common/log.h"

namespace pyr {

std::string parse_device(const std::string& device) {
    if (device.empty() || device == "auto") return "auto";
    if (device == "cpu") return "cpu";
    if (device == "cuda") return "cuda:0";
    if (device.rfind("cuda:", 0) == 0 && device.size() > 5 && device.size() < 9) {
        bool digits = true;
        for (size_t i = 5; i < device.size(); ++i)
            digits = digits && std::isdigit(static_cast<unsigned char>(device[i]));
        if (digits) return device;
    }
    fail(PYR_ERR_INVALID_ARGUMENT,
         "device '" + device + "' is not one of auto, cpu, cuda, cuda:N");
}

std::shared_ptr<Engine> Engine::open(const std::string& dir, const EngineParams& params) {
    std::string device = parse_device(params.device);
    if (params.n_threads < 0)
        fail(PYR_ERR_INVALID_ARGUMENT,
             "n_threads must be >= 0 (0 = all hardware threads), got " +
                 std::to_string(params.n_threads));
    if (params.prefill_chunk < 0)
        fail(PYR_ERR_INVALID_ARGUMENT,
             "prefill_chunk must be >= 0 (0 = no limit), got " +
                 std::to_string(params.prefill_chunk));
    const int n_cuda = cuda_device_count();
    if (device == "auto") device = n_cuda > 0 ? "cuda:0" : "cpu";
    const int cuda_index = device == "cpu" ? -1 : std::stoi(device.substr(5));
    if (cuda_index >= n_cuda)  // before loading anything
        fail(PYR_ERR_UNSUPPORTED,
             "device '" + params.device + "': " +
                 (n_cuda > 0 ? "this machine has " + std::to_string(n_cuda) + " CUDA device(s)"
                             : std::string("no CUDA device is available (no GPU, no driver, or "
                                           "a build without CUDA)")) +
                 "; use device \"cpu\" or \"auto\"");
    auto engine = std::shared_ptr<Engine>(new Engine());
    engine->model_ = Model::load(dir);
    if (device == "cpu")
        engine->backend_ = make_cpu_backend(engine->model_, params.n_threads, params.max_device_bytes);
    else
        engine->backend_ = make_cuda_backend(engine->model_, cuda_index, params.max_device_bytes);
    engine->device_ = engine->backend_->device_name();
    engine->kv_bytes_per_token_ = engine->backend_->new_kv_storage(1)->bytes_per_token();
    engine->prefill_chunk_ = params.prefill_chunk;
    engine->samples_on_device_ = engine->backend_->samples_on_device();
    PYR_LOG_INFO("engine ready on " + engine->device_ + ": " + dir);
    return engine;
}

// ---- the batching scheduler ------------------------------------------------------------

// A step waiting for its forward; lives on the submitting thread's stack until done.
struct Engine::Request {
    const SequenceStep* step = nullptr;
    bool alone = false;
    bool done = false;
    bool batch_failed = false;  // a merged forward failed: roll back and resubmit
    bool retry_alone = true;    // ... alone (the failure may have been this step's)
    std::exception_ptr error;
};

// Merged forwards wait for their longest member, so a cap keeps one step's latency bounded.
constexpr size_t kMaxStepsPerForward = 256;

void Engine::forward(const SequenceStep& step, bool alone) {
    Request req;
    req.step = &step;
    req.alone = alone;
    std::unique_lock<std::mutex> lock(queue_mutex_);
    queue_.push_back(&req);
    while (!req.done) {
        if (cancel_requested(step)) {  // still waiting (a taken step is done or running)
            const auto it = std::find(queue_.begin(), queue_.end(), &req);
            if (it != queue_.end()) {
                queue_.erase(it);
                lock.unlock();
                fail(PYR_CANCELLED, "cancelled");
            }
        }
        if (running_) {
            queue_changed_.wait(lock);
            continue;
        }
        // Lead the next forward over the waiting steps, in order: every decode step, and the
        // prefill steps while their tokens fit in prefill_chunk (a prefill that does not fit
        // stays first in the queue for the next forward). A step that must run alone goes by
        // itself when it reaches the head, and nothing overtakes it. (No allocation here:
        // nothing may throw while other threads' requests are out of the queue.)
        std::array<Request*, kMaxStepsPerForward> taken;
        size_t n = 0;
        int64_t tokens = 0, prefill_tokens = 0;
        for (auto it = queue_.begin(); it != queue_.end() && n < taken.size();) {
            Request* r = *it;
            if (r->alone && n > 0) break;
            const int32_t t = r->step->n_tokens;
            const bool fits = t <= 1 || prefill_tokens == 0 || prefill_chunk_ == 0 ||
                              prefill_tokens + t <= prefill_chunk_;
            if (!fits) {
                ++it;
                continue;
            }
            taken[n++] = r;
            tokens += t;
            if (t > 1) prefill_tokens += t;
            it = queue_.erase(it);
            if (r->alone) break;
        }
        running_ = true;
        lock.unlock();
        run_batch(taken.data(), n);
        lock.lock();
        running_ = false;
        stats_.forwards += 1;
        stats_.steps += n;
        stats_.max_batch = std::max(stats_.max_batch, int32_t(n));
        stats_.max_tokens = int32_t(std::max<int64_t>(stats_.max_tokens, tokens));
        for (size_t i = 0; i < n; ++i) taken[i]->done = true;
        queue_changed_.notify_all();
    }
    lock.unlock();
    if (req.batch_failed) throw BatchFailed{req.retry_alone};
    if (req.error) std::rethrow_exception(req.error);
}

void Engine::wake_waiting_steps() {
    std::lock_guard<std::mutex> lock(queue_mutex_);
    queue_changed_.notify_all();
}

// Runs one forward. Steps cancelled while they waited are answered without running. A failure
// of a merged forward is only known to be a step's own when its cancel flag is set; the others
// are told to retry (Session rolls them back first): merged again when the failure was that
// cancel, else alone. Throws nothing: the submitting threads wait on this.
void Engine::run_batch(Request* const* batch, size_t n) noexcept {
    auto cancelled = [](const Request* r) { return cancel_requested(*r->step); };
    auto cancelled_error = [] { return std::make_exception_ptr(Error(PYR_CANCELLED, "cancelled")); };
    Request* only = n == 1 ? batch[0] : nullptr;  // a lone step's failure is its own
    try {
        std::vector<SequenceStep> steps;
        for (size_t i = 0; i < n; ++i) {
            if (cancelled(batch[i]))
                batch[i]->error = cancelled_error();
            else
                steps.push_back(*batch[i]->step);
        }
        if (steps.empty()) return;
        if (steps.size() == 1)
            for (size_t i = 0; i < n; ++i)
                if (!batch[i]->error) only = batch[i];
        backend_->forward(steps.data(), int(steps.size()));
    } catch (...) {
        bool by_cancel = false;  // a backend fails with PYR_CANCELLED for a step's flag only
        try {
            throw;
        } catch (const Error& e) {
            by_cancel = e.status() == PYR_CANCELLED;
        } catch (...) {
        }
        for (size_t i = 0; i < n; ++i) {
            Request* r = batch[i];
            if (r->error) continue;  // cancelled while it waited
            if (r == only) {
                r->error = std::current_exception();
            } else if (cancelled(r)) {
                r->error = cancelled_error();
            } else {
                r->batch_failed = true;
                r->retry_alone = !by_cancel;
            }
        }
    }
}

Engine::BatchStats Engine::batch_stats() const {
    std::lock_guard<std::mutex> lock(queue_mutex_);
    BatchStats s = stats_;
    s.waiting = int32_t(queue_.size());
    return s;
}

std::unique_ptr<KvStorage> Engine::new_kv_storage(int32_t n_ctx) {
    return backend_->new_kv_storage(n_ctx);
}

}  // namespace pyr
