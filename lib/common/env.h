// Switches read from the environment, for comparing code paths on a machine (the CUDA
// backend's PYRAMID_CUDA_GRAPHS=0, PYRAMID_PDL=0 & co.; tools/gpu_check.sh times each).
#pragma once

#include <cstdlib>

namespace pyr {

// The integer value of environment variable `name`; `fallback` when it is unset, empty or
// not a whole number.
inline int env_int(const char* name, int fallback) {
    const char* v = std::getenv(name);
    if (!v || !*v) return fallback;
    char* end = nullptr;
    const long x = std::strtol(v, &end, 10);
    return *end == '\0' ? int(x) : fallback;
}

}  // namespace pyr
