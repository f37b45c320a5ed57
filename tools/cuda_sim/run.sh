#!/usr/bin/env bash
# cuda-sim: builds the CUDA kernels (kernels/*.cu) and their tests
# (tests/cuda/test_cuda_kernels.cpp) with g++ for the CPU and runs them. See README.md.
#
#   tools/cuda_sim/run.sh [doctest args...]      e.g. -tc='rmsnorm*'  or  -ltc
#
# Environment: PYR_SIM_BUILD (build folder, default build-cuda-sim/), PYR_SIM_ASAN=1
# (AddressSanitizer build, in build-cuda-sim-asan/), CUDA_INC (the folder with the toolkit's
# cuda_fp16.h), PYR_SIM_WORKERS, PYR_SIM_STACK_KB, PYR_TEST_SEED (the tests' random seed),
# JOBS (parallel compiles, default 2).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"

# The toolkit's half-precision headers are used as they are (they have host code paths);
# nothing else of the toolkit is needed (no nvcc, no libcudart, no GPU).
if [[ -z "${CUDA_INC:-}" ]]; then
    for d in "${CUDA_HOME:-}/include" "${CUDA_PATH:-}/include" /usr/local/cuda/include /usr/include; do
        if [[ -f "$d/cuda_fp16.h" && -f "$d/vector_types.h" ]]; then CUDA_INC="$d"; break; fi
    done
fi
if [[ -z "${CUDA_INC:-}" ]]; then
    echo "SKIPPED: cuda-sim: no cuda_fp16.h found; set CUDA_INC to the toolkit's include" \
         "folder (the headers alone suffice, e.g. pip's nvidia-cuda-runtime wheel)" >&2
    exit 77  # ctest shows it as "Skipped"
fi

extra=()
if [[ "${PYR_SIM_ASAN:-0}" == 1 ]]; then
    BUILD="${PYR_SIM_BUILD:-$ROOT/build-cuda-sim-asan}"
    extra=(OPT="-O1 -fno-omit-frame-pointer" EXTRA_CXXFLAGS="-fsanitize=address")
else
    BUILD="${PYR_SIM_BUILD:-$ROOT/build-cuda-sim}"
fi
mkdir -p "$BUILD"
echo "cuda-sim: building in $BUILD (CUDA headers from $CUDA_INC)"
make --no-print-directory -f "$ROOT/tools/cuda_sim/Makefile" -j"${JOBS:-2}" \
    ROOT="$ROOT" BUILD="$BUILD" CUDA_INC="$CUDA_INC" "${extra[@]}"

echo "cuda-sim: $BUILD/test_cuda_kernels $*"
start=$(date +%s)
status=0
"$BUILD/test_cuda_kernels" "$@" || status=$?
echo "cuda-sim: exit status $status after $(( $(date +%s) - start )) s"
exit $status
