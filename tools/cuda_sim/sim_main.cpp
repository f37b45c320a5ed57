// cuda-sim: the main of the simulated kernel tests. tests/cuda/cuda_test_main.cpp needs the
// CUDA backend's device query; here the "device" is always present.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

int main(int argc, char** argv) {
    doctest::Context context(argc, argv);
    return context.run();
}
