// The CUDA entry points of a build without the CUDA toolkit: no devices, and a clear error.
#include "backend/backend.h"
#include "common/error.h"

namespace pyr {

int cuda_device_count() { return 0; }

[[noreturn]] static void no_cuda() {
    fail(PYR_ERR_UNSUPPORTED, "this build of pyramid has no CUDA backend (built without the CUDA "
                              "toolkit); use device \"cpu\" or \"auto\"");
}

std::unique_ptr<Backend> make_cuda_backend(std::shared_ptr<const Model>, int, uint64_t) {
    no_cuda();
}

std::unique_ptr<Backend> make_cuda_backend_random(const ModelConfig&, bool, uint64_t, int, uint64_t) {
    no_cuda();
}

}  // namespace pyr
