// How a CUDA test tells the simulated device (tools/cuda_sim) from a GPU: the sim defines
// this test hook (sim_runtime.cpp: its next n graph instantiations run out of memory); a
// GPU build links the weak declaration to null.
#pragma once

extern "C" void pyr_sim_fail_graph_instantiations(int n) __attribute__((weak));

inline bool on_cuda_sim() { return pyr_sim_fail_graph_instantiations != nullptr; }
