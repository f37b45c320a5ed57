#include "engine/engine.h"

#include <cctype>

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
        engine->backend_ = make_cpu_backend(engine->model_, params.n_threads);
    else
        engine->backend_ = make_cuda_backend(engine->model_, cuda_index, params.max_device_bytes);
    engine->device_ = engine->backend_->device_name();
    engine->kv_bytes_per_token_ = engine->backend_->new_kv_storage(1)->bytes_per_token();
    PYR_LOG_INFO("engine ready on " + engine->device_ + ": " + dir);
    return engine;
}

void Engine::forward(SequenceStep* batch, int n_seq, const std::atomic<bool>* cancel) {
    std::lock_guard<std::mutex> lock(forward_mutex_);
    backend_->forward(batch, n_seq, cancel);
}

std::unique_ptr<KvStorage> Engine::new_kv_storage(int32_t n_ctx) {
    return backend_->new_kv_storage(n_ctx);
}

}  // namespace pyr
