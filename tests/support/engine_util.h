// Helpers shared by the tests that run whole engines (tests/engine, tests/cuda): opening a
// checkpoint on a device, reading the JSON fixtures, random token ids.
#pragma once

#include <doctest/doctest.h>

#include <cstdint>
#include <fstream>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "engine/engine.h"

namespace pyr_test {

inline const std::string kFixtures = std::string(PYR_TEST_DATA_DIR) + "/fixtures";

inline nlohmann::json read_json(const std::string& path) {
    std::ifstream in(path);
    REQUIRE_MESSAGE(in.good(), "cannot read " << path);
    return nlohmann::json::parse(in);
}

// The engine on `device` ("cpu" unless a test is about another device).
inline std::shared_ptr<pyr::Engine> open_engine(const std::string& dir,
                                                const std::string& device = "cpu",
                                                uint64_t max_device_bytes = 0) {
    pyr::EngineParams ep;
    ep.device = device;
    ep.max_device_bytes = max_device_bytes;
    return pyr::Engine::open(dir, ep);
}

// BOS then n - 1 ids drawn from [3, vocab) (no BOS/EOS inside), reproducible by seed.
inline std::vector<int32_t> random_tokens(int32_t n, int32_t vocab, uint32_t seed) {
    std::mt19937 gen(seed);
    std::uniform_int_distribution<int32_t> d(3, vocab - 1);
    std::vector<int32_t> ids{1};
    while (int32_t(ids.size()) < n) ids.push_back(d(gen));
    return ids;
}

}  // namespace pyr_test
