// The main of the GPU tests: without a CUDA device they skip visibly (ctest's SKIP_RETURN_CODE
// 77 shows them as "Skipped", never as passed); with one, doctest runs them.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <cstdio>

#include "backend/backend.h"

int main(int argc, char** argv) {
    if (pyr::cuda_device_count() == 0) {
        std::printf("SKIPPED: no CUDA device (or driver) on this machine, or a build without "
                    "CUDA; run `ctest -L gpu` on a GPU machine\n");
        return 77;
    }
    doctest::Context context(argc, argv);
    return context.run();
}
