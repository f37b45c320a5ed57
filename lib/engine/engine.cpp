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
    if (device.rfind("cuda", 0) == 0)
        fail(PYR_ERR_UNSUPPORTED, "device '" + params.device +
                                      "': this build of pyramid has no CUDA backend yet; "
                                      "use device \"cpu\" or \"auto\"");
    // "auto" falls back to the CPU while there is no CUDA backend.
    auto engine = std::shared_ptr<Engine>(new Engine());
    engine->model_ = Model::load(dir);
    engine->backend_ = make_cpu_backend(engine->model_, params.n_threads);
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
