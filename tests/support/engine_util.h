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
#include "engine/session.h"

namespace pyr_test {

inline const std::string kFixtures = std::string(PYR_TEST_DATA_DIR) + "/fixtures";

inline nlohmann::json read_json(const std::string& path) {
    std::ifstream in(path);
    REQUIRE_MESSAGE(in.good(), "cannot read " << path);
    return nlohmann::json::parse(in);
}

// The engine on `device` ("cpu" unless a test is about another device); prefill_chunk < 0
// keeps the engine's default.
inline std::shared_ptr<pyr::Engine> open_engine(const std::string& dir,
                                                const std::string& device = "cpu",
                                                uint64_t max_device_bytes = 0,
                                                int32_t prefill_chunk = -1) {
    pyr::EngineParams ep;
    ep.device = device;
    ep.max_device_bytes = max_device_bytes;
    if (prefill_chunk >= 0) ep.prefill_chunk = prefill_chunk;
    return pyr::Engine::open(dir, ep);
}

// A greedy session (temperature 0) producing at most max_tokens, with the given KV knobs and
// context length.
inline std::unique_ptr<pyr::Session> greedy_session(std::shared_ptr<pyr::Engine> engine,
                                                    int32_t max_tokens, const pyr::KvParams& kv = {},
                                                    int32_t n_ctx = 2048) {
    pyr::SessionParams sp;
    sp.n_ctx = n_ctx;
    sp.max_tokens = max_tokens;
    sp.sampling.temperature = 0.0f;
    sp.kv = kv;
    return std::make_unique<pyr::Session>(std::move(engine), sp);
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
