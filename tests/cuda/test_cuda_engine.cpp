// The CUDA backend end to end against the CPU backend (the reference) and HF transformers:
// same greedy tokens, logits within fp16/bf16 tolerance, the same tokens kept by every KV
// policy, the memory budget and cancellation. Needs a GPU (label gpu; skips without one).
#include <doctest/doctest.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "backend/backend.h"
#include "backend/cuda/cuda_backend.h"
#include "common/error.h"
#include "cuda/cuda_sim_hook.h"
#include "engine/engine.h"
#include "engine/session.h"
#include "kernels/kernels.h"
#include "kv/kv_cache.h"
#include "kv/kv_policy.h"
#include "model/model.h"
#include "support/engine_util.h"

using nlohmann::json;
using pyr_test::greedy_session;
using pyr_test::kFixtures;
using pyr_test::open_engine;
using pyr_test::read_json;

namespace {

// ||a - b|| / ||b|| over the vocabulary.
double rel_error(const float* a, const float* b, int32_t n) {
    double num = 0, den = 0;
    for (int32_t i = 0; i < n; ++i) {
        num += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
        den += double(b[i]) * b[i];
    }
    return std::sqrt(num / std::max(den, 1e-30));
}

// The gap between the best and the second-best logit: how close a greedy step was to a tie.
double top2_gap(const float* logits, int32_t n) {
    std::vector<float> v(logits, logits + n);
    std::partial_sort(v.begin(), v.begin() + 2, v.end(), std::greater<float>());
    return double(v[0]) - v[1];
}

// The bundled model on the GPU with one of the backend's comparison switches set, which it
// reads when it starts.
std::shared_ptr<pyr::Engine> open_cuda_with(const char* switch_name, bool on) {
    setenv(switch_name, on ? "1" : "0", 1);
    auto e = open_engine(PYR_TEST_MODEL_DIR, "cuda:0");
    unsetenv(switch_name);
    return e;
}

struct Run {
    std::vector<int32_t> tokens;
    std::vector<std::vector<float>> logits;  // the logits each token came from
};

Run generate(pyr::Session& s, int n) {
    Run r;
    for (int i = 0; i < n; ++i) {
        const pyr::StepResult res = s.next();
        if (s.token() < 0) break;
        r.tokens.push_back(s.token());
        r.logits.emplace_back(s.logits(), s.logits() + s.n_vocab());
        if (res == pyr::StepResult::Done) break;
    }
    return r;
}

// n greedy tokens of a session of `e` fed `text`, and then each layer's cached tokens.
std::pair<Run, std::vector<int32_t>> greedy_run(std::shared_ptr<pyr::Engine> e, const std::string& text,
                                                const pyr::KvParams& kv, int n) {
    auto s = greedy_session(std::move(e), n, kv);
    s->feed_text(text);
    Run r = generate(*s, n);
    return {r, s->memory().layer_tokens};
}

// CUDA must produce CPU's greedy tokens; a divergence is allowed only at a near-tie of the
// CPU's own top two (what 16-bit weights can flip), and ends the comparison there.
void check_same_greedy(const Run& gpu, const Run& cpu, double tie, double logit_tol) {
    const size_t n = std::min(gpu.tokens.size(), cpu.tokens.size());
    size_t same = 0;
    for (; same < n; ++same) {
        const int32_t nv = int32_t(cpu.logits[same].size());
        const double err = rel_error(gpu.logits[same].data(), cpu.logits[same].data(), nv);
        CHECK_MESSAGE(err < logit_tol, "step " << same << ": logits differ by " << err << " (relative)");
        if (gpu.tokens[same] != cpu.tokens[same]) {
            const double gap = top2_gap(cpu.logits[same].data(), nv);
            CHECK_MESSAGE(gap < tie, "diverged at step " << same << " where the CPU's top-2 gap is " << gap);
            MESSAGE("near-tie divergence at step " << same << " (CPU top-2 gap " << gap << ")");
            return;
        }
    }
    CHECK(gpu.tokens.size() == cpu.tokens.size());
}

// Device bytes a session's paged KV cache holds (kernels.h): per layer, its tokens in whole
// pages of kKvPageRows (keys and values in the model's 16-bit type) and a page table of
// n_ctx / kKvPageRows entries and the gap's.
uint64_t paged_kv_bytes(const pyr::Engine& e, const std::vector<int32_t>& layer_tokens, int32_t n_ctx) {
    constexpr int32_t P = pyr::kernels::kKvPageRows;
    const pyr::ModelConfig& c = e.config();
    const uint64_t page = 2 * uint64_t(P) * uint64_t(c.n_head_kv) * uint64_t(c.head_dim) * 2;
    const uint64_t table = uint64_t(1 + (n_ctx + P - 1) / P) * sizeof(void*);
    uint64_t bytes = 0;
    for (int32_t t : layer_tokens) bytes += uint64_t((t + P - 1) / P) * page + table;
    return bytes;
}

std::string sample_text(size_t chars) {
    std::ifstream in(std::string(PYR_TEST_DATA_DIR) + "/eval_sample.txt");
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str().substr(0, chars);
}

}  // namespace

TEST_CASE("reference checkpoints: CUDA gives the CPU's greedy tokens and logits") {
    json index = read_json(kFixtures + "/fixtures.json");
    for (const auto& fx : index["fixtures"]) {
        const std::string name = fx["name"].get<std::string>();
        SUBCASE(name.c_str()) {
            json ex = read_json(kFixtures + "/" + name + "/expected.json");
            auto cpu = open_engine(kFixtures + "/" + name, "cpu");
            auto gpu = open_engine(kFixtures + "/" + name, "auto");  // auto picks the GPU when there is one
            CHECK(gpu->device() == "cuda:0");
            const auto prompt = ex["prompt_tokens"].get<std::vector<int32_t>>();
            const int n = int(ex["greedy"].size());
            auto sc = greedy_session(cpu, n, {}, 256);
            auto sg = greedy_session(gpu, n, {}, 256);
            sc->feed_tokens(prompt);
            sg->feed_tokens(prompt);
            sc->prefill();
            sg->prefill();
            const bool bf16 = name.find("bf16") != std::string::npos;
            const double tol = bf16 ? 3e-2 : 1e-2;
            CHECK(rel_error(sg->logits(), sc->logits(), sc->n_vocab()) < tol);
            check_same_greedy(generate(*sg, n), generate(*sc, n), bf16 ? 0.1 : 0.02, tol);
        }
    }
}

TEST_CASE("bundled model: CUDA matches the CPU over 64 greedy tokens") {
    json ref = read_json(kFixtures + "/bundled_reference.json");
    auto cpu = open_engine(PYR_TEST_MODEL_DIR, "cpu");
    auto gpu = open_engine(PYR_TEST_MODEL_DIR, "auto");  // auto picks the GPU when there is one
    CHECK(gpu->device() == "cuda:0");
    for (const auto& prompt : ref["prompts"]) {
        const std::string text = prompt["text"].get<std::string>();
        CAPTURE(text);
        auto sc = greedy_session(cpu, 64);
        auto sg = greedy_session(gpu, 64);
        sc->feed_text(text);
        sg->feed_text(text);
        check_same_greedy(generate(*sg, 64), generate(*sc, 64), 0.02, 1e-2);
    }
}

TEST_CASE("every KV policy keeps the same tokens on CUDA as on the CPU") {
    auto cpu = open_engine(PYR_TEST_MODEL_DIR, "cpu");
    auto gpu = open_engine(PYR_TEST_MODEL_DIR, "cuda:0");
    const std::string text = sample_text(2400);
    for (const char* name : {"pyramid", "snapkv", "pyramidkv", "snapshrink", "streaming", "h2o"}) {
        SUBCASE(name) {
            pyr::KvParams kv;
            kv.policy = name;
            kv.retention = 0.5f;
            // the window policies compress every 16 generated tokens: pyramid, the library's
            // own, twice, snapkv & co. once; streaming and h2o prune at every step
            const int n_gen = std::string(name) == "pyramid" ? 40 : 20;
            auto sc = greedy_session(cpu, n_gen, kv);
            auto sg = greedy_session(gpu, n_gen, kv);
            sc->feed_text(text);
            sg->feed_text(text);
            sc->prefill();
            sg->prefill();
            const pyr::MemoryStats mc = sc->memory(), mg = sg->memory();
            REQUIRE(mc.prefill_layer_positions.size() == mg.prefill_layer_positions.size());
            size_t kept = 0, differ = 0, layers_equal = 0;
            for (size_t il = 0; il < mc.prefill_layer_positions.size(); ++il) {
                const auto& a = mc.prefill_layer_positions[il];
                const auto& b = mg.prefill_layer_positions[il];
                CHECK(a.size() == b.size());  // the budgets do not depend on the scores
                std::vector<int32_t> only;
                std::set_symmetric_difference(a.begin(), a.end(), b.begin(), b.end(),
                                              std::back_inserter(only));
                kept += a.size();
                differ += only.size() / 2;
                layers_equal += only.empty();
            }
            MESSAGE(std::string(name) << ": " << layers_equal << " of " << mc.prefill_layer_positions.size()
                         << " layers keep identical tokens; " << differ << " of " << kept
                         << " kept tokens differ");
            // ties aside: fp16 keys move near-equal scores, so allow 1 % of swapped picks
            CHECK(double(differ) <= 0.01 * double(kept));
            // generation compresses the same number of tokens per layer on both and, from the
            // same kept tokens, the caches compacted on the device give the CPU's greedy tokens
            // and logits (the bytes moved, not only the bookkeeping)
            const Run rc = generate(*sc, n_gen), rg = generate(*sg, n_gen);
            CHECK(sc->memory().layer_tokens == sg->memory().layer_tokens);
            if (differ == 0) check_same_greedy(rg, rc, 0.02, 1e-2);
        }
    }
}

TEST_CASE("decode steps replayed from a CUDA graph give the bits of launching each kernel") {
    const std::string text = sample_text(1200);
    auto graphs = open_cuda_with("PYRAMID_CUDA_GRAPHS", true);
    auto launches = open_cuda_with("PYRAMID_CUDA_GRAPHS", false);
    for (const char* name : {"full", "pyramid", "streaming", "h2o"}) {
        SUBCASE(name) {
            pyr::KvParams kv;
            kv.policy = name;
            kv.retention = 0.5f;
            // pyramid compresses every 16 generated tokens: twice; streaming and h2o at every step
            const int n_gen = std::string(name) == "pyramid" ? 40 : 20;
            const pyr::BackendStats before = graphs->backend_stats();
            const auto [g, g_tokens] = greedy_run(graphs, text, kv, n_gen);
            const pyr::BackendStats after = graphs->backend_stats();
            const auto [l, l_tokens] = greedy_run(launches, text, kv, n_gen);
            const uint64_t replays = after.graph_replays - before.graph_replays;
            const uint64_t captures = after.graph_captures - before.graph_captures;
            MESSAGE(std::string(name) << ": " << captures << " graphs captured, " << replays << " replays, "
                         << after.direct_decode_steps - before.direct_decode_steps
                         << " steps launched directly");
            REQUIRE(g.tokens == l.tokens);
            for (size_t i = 0; i < g.logits.size(); ++i)
                REQUIRE_MESSAGE(g.logits[i] == l.logits[i], "step " << i << ": logits differ");
            CHECK(g_tokens == l_tokens);
            CHECK(launches->backend_stats().graph_replays == 0);
            // streaming and h2o compact every layer each step, pyramid every 16 steps: in place
            // (KvCompactor), so the plan's cache pointers, and its graph, stay (before: streaming
            // 0 captures, 39 direct steps; pyramid 3 captures, 33 replays). h2o's column sums
            // of a decode step are its token's attention row, measured inside the graph (before:
            // every h2o decode step launched directly)
            if (std::string(name) != "pyramid") CHECK(replays >= uint64_t(n_gen) / 2);
            if (std::string(name) == "pyramid") CHECK(captures <= 2);
        }
    }
}

TEST_CASE("a decode step's graph capture that runs out of device memory is tried again later") {
    if (!on_cuda_sim()) {
        MESSAGE("SKIPPED: needs the simulated device (tools/cuda_sim) to make a graph's instantiation fail");
        return;
    }
    auto gpu = open_cuda_with("PYRAMID_CUDA_GRAPHS", true);
    const int n_gen = 80;  // a step to capture, the pause, a capture and replays
    struct FailNone {
        ~FailNone() { pyr_sim_fail_graph_instantiations(0); }  // whatever happens: not the next test's
    } fail_none;
    pyr_sim_fail_graph_instantiations(1);
    const pyr::BackendStats before = gpu->backend_stats();
    const auto [run, tokens] = greedy_run(gpu, sample_text(300), {}, n_gen);
    const pyr::BackendStats after = gpu->backend_stats();
    const uint64_t captures = after.graph_captures - before.graph_captures;
    const uint64_t replays = after.graph_replays - before.graph_replays;
    const uint64_t direct = after.direct_decode_steps - before.direct_decode_steps;
    MESSAGE(captures << " graphs captured, " << replays << " replays, " << direct << " steps launched directly");
    CHECK(run.tokens.size() == size_t(n_gen));
    // the second step's capture failed: it and the pause's steps were launched directly;
    // then steps are captured and replayed again (before: graphs off for good, 0 and 0)
    CHECK(direct >= 1 + pyr::cuda::StepGraphs::kCaptureRetrySteps);
    CHECK(captures >= 1);
    CHECK(replays > 0);
}

TEST_CASE("decode steps with a KV head's query heads in one attention block give the per-head blocks' bits") {
    // the bundled model has 3 query heads a KV head: its decode attention is grouped, unless
    // PYRAMID_GROUPED_DECODE=0. A single sequence with at most 2048 keys is split by its
    // cache length alone on a device of 24 SMs or more (the sim's, any GPU the tests run
    // on), whether a block takes a KV head or a query head (attention_splits), so the bits
    // must agree; pyramid reads its decode attention rows from the grouped blocks' scores.
    const std::string text = sample_text(600);
    auto grouped = open_cuda_with("PYRAMID_GROUPED_DECODE", true);
    auto per_head = open_cuda_with("PYRAMID_GROUPED_DECODE", false);
    const pyr::ModelConfig& c = grouped->config();
    REQUIRE(pyr::kernels::attention_decode_head_blocks(c.n_head, c.n_head_kv, c.head_dim) < c.n_head);
    const int n_gen = 20;  // pyramid compresses at 16 generated tokens
    for (const char* name : {"full", "pyramid"}) {
        SUBCASE(name) {
            pyr::KvParams kv;
            kv.policy = name;
            kv.retention = 0.5f;
            const auto [g, g_tokens] = greedy_run(grouped, text, kv, n_gen);
            const auto [h, h_tokens] = greedy_run(per_head, text, kv, n_gen);
            REQUIRE(g.tokens == h.tokens);
            for (size_t i = 0; i < g.logits.size(); ++i)
                REQUIRE_MESSAGE(g.logits[i] == h.logits[i], "step " << i << ": logits differ");
            CHECK(g_tokens == h_tokens);
        }
    }
}

// A batch of sequences driven through the backend directly, as the engine's scheduler
// would batch them (every sequence in every forward): ragged prompts in one prefill, then
// greedy decode steps of one token each. Returns the logits of every step and sequence.
static std::vector<std::vector<float>> run_batch(pyr::Backend& backend, const pyr::ModelConfig& c,
                                                 const pyr::KvParams& kv, int n_seq, int n_prompt,
                                                 int n_gen, std::vector<std::vector<int32_t>>* kept) {
    struct Seq {
        std::unique_ptr<pyr::KvCache> cache;
        std::unique_ptr<pyr::KvPolicy> policy;
        std::vector<int32_t> tokens, positions;
        std::vector<float> logits;
    };
    std::vector<Seq> seqs(static_cast<size_t>(n_seq));
    std::vector<pyr::SequenceStep> steps(seqs.size());
    for (int s = 0; s < n_seq; ++s) {
        Seq& q = seqs[size_t(s)];
        q.cache = std::make_unique<pyr::KvCache>(c.n_layer, backend.new_kv_storage(n_prompt + n_seq + n_gen));
        q.policy = pyr::make_kv_policy(kv, c.n_layer);
        q.logits.assign(size_t(c.n_vocab), 0.0f);
        for (int i = 0; i < n_prompt + s; ++i) {  // ragged: sequence s has n_prompt + s tokens
            q.tokens.push_back(3 + (i * 7 + s * 13) % (c.n_vocab - 3));
            q.positions.push_back(i);
        }
        steps[size_t(s)] = {q.tokens.data(), q.positions.data(), int32_t(q.tokens.size()),
                            q.cache.get(), q.policy.get(), q.logits.data()};
        q.policy->begin_step(int32_t(q.tokens.size()), true);
    }
    std::vector<std::vector<float>> out;
    backend.forward(steps.data(), n_seq);
    for (int g = 0;; ++g) {
        for (Seq& q : seqs) {
            q.cache->set_n_processed(q.positions.back() + 1);
            q.policy->after_step(*q.cache);
            out.push_back(q.logits);
        }
        if (g == n_gen) break;
        for (int s = 0; s < n_seq; ++s) {
            Seq& q = seqs[size_t(s)];
            const int32_t next = int32_t(std::max_element(q.logits.begin(), q.logits.end()) - q.logits.begin());
            const int32_t pos = q.positions.back() + 1;
            q.tokens.assign(1, next);
            q.positions.assign(1, pos);
            steps[size_t(s)] = {q.tokens.data(), q.positions.data(), 1, q.cache.get(),
                                q.policy.get(), q.logits.data()};
            q.policy->begin_step(1, false);
        }
        backend.forward(steps.data(), n_seq);
    }
    if (kept)
        for (Seq& q : seqs)
            for (int il = 0; il < c.n_layer; ++il) kept->push_back(q.cache->positions(il));
    return out;
}

TEST_CASE("batched decode steps with cuBLAS projections replay CUDA graphs with the same bits") {
    // past kGemvMaxTokens sequences the projections are cuBLAS GEMMs: captured into the step's
    // graph with the context's workspace (a capture cannot allocate one)
    auto model = pyr::Model::load(PYR_TEST_MODEL_DIR);
    auto backend_with_graphs = [&](bool on) {
        setenv("PYRAMID_CUDA_GRAPHS", on ? "1" : "0", 1);
        auto b = pyr::make_cuda_backend(model, 0, 0);
        unsetenv("PYRAMID_CUDA_GRAPHS");
        return b;
    };
    auto graphs = backend_with_graphs(true);
    auto launches = backend_with_graphs(false);
    const int n_seq = pyr::kernels::kGemvMaxTokens + 4, n_prompt = 20, n_gen = 18;
    for (const char* name : {"full", "pyramid"}) {
        SUBCASE(name) {
            pyr::KvParams kv;
            kv.policy = name;
            kv.retention = 0.5f;
            std::vector<std::vector<int32_t>> g_kept, l_kept;
            const pyr::BackendStats before = graphs->stats();
            const auto g = run_batch(*graphs, model->config(), kv, n_seq, n_prompt, n_gen, &g_kept);
            const pyr::BackendStats after = graphs->stats();
            const auto l = run_batch(*launches, model->config(), kv, n_seq, n_prompt, n_gen, &l_kept);
            const uint64_t replays = after.graph_replays - before.graph_replays;
            const uint64_t captures = after.graph_captures - before.graph_captures;
            MESSAGE(std::string(name) << ", " << n_seq << " sequences: " << captures << " graphs captured, " << replays
                         << " replays, " << after.direct_decode_steps - before.direct_decode_steps
                         << " steps launched directly");
            REQUIRE(g.size() == l.size());
            for (size_t i = 0; i < g.size(); ++i)
                REQUIRE_MESSAGE(g[i] == l[i], "step " << i / size_t(n_seq) << ", sequence "
                                                      << i % size_t(n_seq) << ": logits differ");
            CHECK(g_kept == l_kept);
            CHECK(replays >= uint64_t(n_gen) / 2);
            CHECK(launches->stats().graph_replays == 0);
            // cuBLAS's workspace (Hopper: 32 MiB, at most 1/64 of the budget) is scratch
            const pyr::DeviceMemory mem = graphs->device_memory();
            CHECK(mem.scratch >= (std::min<uint64_t>(32u << 20, mem.limit / 64) & ~uint64_t(255)));
        }
    }
}

TEST_CASE("a batch of more than kernels::kMaxBatch sequences runs as one and matches the CPU") {
    // One forward for all of them (the weights read once a step); RoPE, attention and the
    // policies' rows launch kMaxBatch sequences at a time.
    auto model = pyr::Model::load(PYR_TEST_MODEL_DIR);
    auto gpu = pyr::make_cuda_backend(model, 0, 0);
    auto cpu = pyr::make_cpu_backend(model, 0);
    const pyr::ModelConfig& c = model->config();
    const int n_seq = pyr::kernels::kMaxBatch + 6, n_prompt = 40, n_gen = 6;
    for (const char* name : {"full", "pyramid"}) {
        SUBCASE(name) {
            pyr::KvParams kv;
            kv.policy = name;
            kv.retention = 0.5f;
            std::vector<std::vector<int32_t>> g_kept, c_kept;
            const pyr::BackendStats before = gpu->stats();
            const auto g = run_batch(*gpu, c, kv, n_seq, n_prompt, n_gen, &g_kept);
            const pyr::BackendStats after = gpu->stats();
            const auto r = run_batch(*cpu, c, kv, n_seq, n_prompt, n_gen, &c_kept);
            // one decode step per step (before: one per kMaxBatch sequences)
            CHECK(after.graph_replays + after.graph_captures + after.direct_decode_steps -
                      before.graph_replays - before.graph_captures - before.direct_decode_steps ==
                  uint64_t(n_gen));
            REQUIRE(g.size() == r.size());
            REQUIRE(g_kept.size() == c_kept.size());
            // the caches: the same tokens kept, near-ties of the scores aside
            size_t kept = 0, differ = 0;
            for (size_t i = 0; i < g_kept.size(); ++i) {
                kept += c_kept[i].size();
                differ += g_kept[i] != c_kept[i];
            }
            MESSAGE(std::string(name) << ": " << n_seq << " sequences, " << kept << " tokens kept on the CPU, "
                         << differ << " of " << g_kept.size() << " (sequence, layer) caches differ");
            CHECK(differ * 100 <= g_kept.size());
            if (std::string(name) != "full") continue;  // a kept token apart moves the logits
            for (int s = 0; s < n_seq; ++s) {
                CAPTURE(s);
                Run rg, rc;
                for (int step = 0; step <= n_gen; ++step) {
                    for (auto [run, all] : {std::pair{&rg, &g}, std::pair{&rc, &r}}) {
                        const std::vector<float>& l = (*all)[size_t(step) * size_t(n_seq) + size_t(s)];
                        run->logits.push_back(l);
                        run->tokens.push_back(int32_t(std::max_element(l.begin(), l.end()) - l.begin()));
                    }
                }
                check_same_greedy(rg, rc, 0.02, 1e-2);
            }
        }
    }
}

TEST_CASE("tokens picked on the GPU are the host sampler's from the same logits") {
    auto device = open_cuda_with("PYRAMID_GPU_SAMPLING", true);
    auto host = open_cuda_with("PYRAMID_GPU_SAMPLING", false);
    REQUIRE(device->samples_on_device());
    REQUIRE_FALSE(host->samples_on_device());
    struct Mode {
        const char* name;
        float temperature;
        int32_t top_k;
        float top_p, min_p, repeat_penalty;
    };
    // the last one is nearly flat without top-k: beyond the device's candidates, so the host
    // picks from the logits it reads back (DeviceSample::token -1), with the same draw
    const Mode modes[] = {{"greedy", 0.0f, 40, 0.95f, 0.05f, 1.0f},
                          {"default", 0.8f, 40, 0.95f, 0.05f, 1.0f},
                          {"top-p", 1.0f, 0, 0.9f, 0.0f, 1.3f},
                          {"min-p", 0.7f, 0, 1.0f, 0.1f, 1.1f},
                          {"top-k 1500", 1.2f, 1500, 0.97f, 0.0f, 1.0f},
                          {"flat", 50.0f, 0, 0.999f, 0.0f, 1.0f}};
    const int n_gen = 12;
    for (const Mode& m : modes) {
        SUBCASE(m.name) {
            auto run = [&](std::shared_ptr<pyr::Engine> e, bool read_logits) {
                pyr::SessionParams sp;
                sp.n_ctx = 512;
                sp.max_tokens = n_gen;
                sp.sampling.temperature = m.temperature;
                sp.sampling.top_k = m.top_k;
                sp.sampling.top_p = m.top_p;
                sp.sampling.min_p = m.min_p;
                sp.sampling.repeat_penalty = m.repeat_penalty;
                sp.sampling.seed = 1234;
                pyr::Session s(e, sp);
                s.feed_text("def fibonacci(n):\n    ");
                Run r;
                while (s.next() == pyr::StepResult::Token) {
                    r.tokens.push_back(s.token());
                    if (read_logits) r.logits.emplace_back(s.logits(), s.logits() + s.n_vocab());
                }
                return r;
            };
            const pyr::BackendStats before = device->backend_stats();
            const Run on_device = run(device, true), on_host = run(host, true);
            const pyr::BackendStats after = device->backend_stats();
            const uint64_t picked = after.device_samples - before.device_samples;
            const uint64_t undecided = after.undecided_samples - before.undecided_samples;
            MESSAGE(std::string(m.name) << ": " << on_device.tokens.size() << " tokens, " << picked
                           << " picked on the device, " << undecided << " of them left to the host");
            CHECK(picked >= on_device.tokens.size());  // (+1 when the last one was EOS)
            CHECK(picked <= on_device.tokens.size() + 1);
            CHECK(host->backend_stats().device_samples == 0);
            if (std::string(m.name) == "flat") CHECK(undecided > 0);
            if (m.top_k > 0 && m.top_k <= 1024) CHECK(undecided == 0);
            CHECK(on_device.tokens == on_host.tokens);
            REQUIRE(on_device.logits.size() == on_host.logits.size());
            for (size_t i = 0; i < on_device.logits.size(); ++i)  // read back lazily, the same bits
                REQUIRE_MESSAGE(on_device.logits[i] == on_host.logits[i], "step " << i);
            // the logits never read back: the tokens do not depend on reading them
            CHECK(run(device, false).tokens == on_device.tokens);
        }
    }
}

TEST_CASE("the device memory budget: out-of-memory status, nothing lost") {
    // Too small for the weights: the engine does not open.
    try {
        open_engine(PYR_TEST_MODEL_DIR, "cuda:0", 1 << 20);
        FAIL("opened with a 1 MiB budget");
    } catch (const pyr::Error& e) {
        CHECK(e.status() == PYR_ERR_OUT_OF_MEMORY);
        CHECK(std::string(e.what()).find("max_device_bytes") != std::string::npos);
    }
    // Room for the weights and a short context only: a long prompt fails, the session stays
    // usable and a short one then runs. The scratch the failed step grew for its ~3600 rows
    // is given back (kept, it would leave the caches less room than before the step).
    auto probe = open_engine(PYR_TEST_MODEL_DIR, "cpu");
    const uint64_t weights = probe->model().weights_bytes();
    auto gpu = open_engine(PYR_TEST_MODEL_DIR, "cuda:0", weights + (12ull << 20));
    auto s = greedy_session(gpu, 8, {}, 4096);
    s->feed_text("def add(a, b):");
    CHECK(generate(*s, 8).tokens.size() == 8);
    const uint64_t scratch_short = gpu->device_memory().scratch;
    s->reset();
    s->feed_text(sample_text(10000));
    try {
        s->prefill();
        FAIL("a ~3600-token prefill fitted in 12 MiB beside the weights");
    } catch (const pyr::Error& e) {
        CHECK(e.status() == PYR_ERR_OUT_OF_MEMORY);
    }
    MESSAGE("scratch: " << scratch_short << " bytes after a short prompt, "
            << gpu->device_memory().scratch << " after the failed long one");
    CHECK(gpu->device_memory().scratch <= scratch_short);
    s->reset();
    s->feed_text("def add(a, b):");
    CHECK(generate(*s, 8).tokens.size() == 8);
}

// A reset makes the fresh cache's page tables before it gives the old cache back: where they
// do not fit, it fails, and the session goes on as if it had not been called.
TEST_CASE("a reset that runs out of device memory leaves the session as it was") {
    const int32_t n_ctx = 1 << 17;  // page tables of 2049 entries a layer
    auto roomy = open_engine(PYR_TEST_MODEL_DIR, "cuda:0");
    const uint64_t tables =
        paged_kv_bytes(*roomy, std::vector<int32_t>(size_t(roomy->config().n_layer), 0), n_ctx);
    auto start = [&](std::shared_ptr<pyr::Engine> e) {
        auto s = greedy_session(std::move(e), 12, {}, n_ctx);
        s->feed_text("def add(a, b):");
        generate(*s, 4);
        return s;
    };
    // the same steps on a roomy engine tell what they hold; then on engines with less room,
    // until one has less to spare than a cache's page tables take (the scratch a step keeps
    // depends on the room: a second try uses what the first held)
    auto alone = start(roomy);
    const Run want = generate(*alone, 8);
    auto spare = [](const pyr::DeviceMemory& m) { return m.limit - (m.weights + m.kv + m.scratch); };
    pyr::DeviceMemory m = roomy->device_memory();
    std::shared_ptr<pyr::Engine> tight;
    std::unique_ptr<pyr::Session> s;
    for (int attempt = 0; attempt < 3 && (!s || spare(m) >= tables); ++attempt) {
        s.reset();
        tight = open_engine(PYR_TEST_MODEL_DIR, "cuda:0", m.weights + m.kv + m.scratch + tables / 2);
        s = start(tight);
        m = tight->device_memory();
    }
    REQUIRE(spare(m) < tables);
    const pyr::MemoryStats before = s->memory();
    try {
        s->reset();
        FAIL("a reset found room for new page tables in " << spare(m) << " bytes");
    } catch (const pyr::Error& e) {
        CHECK(e.status() == PYR_ERR_OUT_OF_MEMORY);
    }
    CHECK(s->memory().n_tokens == before.n_tokens);
    CHECK(s->memory().n_processed == before.n_processed);
    CHECK(s->memory().layer_positions == before.layer_positions);
    const Run got = generate(*s, 8);  // as if no reset had been asked for
    CHECK(got.tokens == want.tokens);
}

// The per-row scratch grows to twice the rows it held, so that steps growing a little at a
// time reallocate rarely; where the budget has no room for twice, a step still gets the rows
// it needs (before, a step that fitted failed with out-of-memory).
TEST_CASE("scratch grows to exactly a step's rows where twice the rows held would not fit") {
    const int32_t vocab = open_engine(PYR_TEST_MODEL_DIR, "cpu")->config().n_vocab;
    const std::vector<int32_t> a = pyr_test::random_tokens(300, vocab, 1);
    const std::vector<int32_t> b = pyr_test::random_tokens(301, vocab, 2);
    auto prefill = [](std::shared_ptr<pyr::Engine> e, const std::vector<int32_t>& prompt) {
        auto s = greedy_session(std::move(e), 1, {}, 1024);
        s->feed_tokens(prompt);
        s->prefill();
        return s;
    };
    // what the two prefills hold, one after the other (the scratch doubled to 600 rows), and
    // the second one alone (301 rows)
    // (scratch besides the rows: cuBLAS's workspace, min(32 MiB, budget / 64), cuda_context.cpp)
    auto rows_scratch = [](const pyr::DeviceMemory& m) {
        return m.scratch - (std::min<uint64_t>(32ull << 20, m.limit / 64) & ~uint64_t(255));
    };
    auto roomy = open_engine(PYR_TEST_MODEL_DIR, "cuda:0");
    auto sa = prefill(roomy, a), sb = prefill(roomy, b);
    const pyr::DeviceMemory doubled = roomy->device_memory();
    auto fresh = open_engine(PYR_TEST_MODEL_DIR, "cuda:0");
    auto sb_alone = prefill(fresh, b);
    const uint64_t exact = rows_scratch(fresh->device_memory());
    REQUIRE(exact < rows_scratch(doubled));
    // room for the weights, both caches and rows halfway between 301 and 600, after the
    // workspace takes its 1/64
    const uint64_t room = doubled.weights + doubled.kv + (exact + rows_scratch(doubled)) / 2;
    auto tight = open_engine(PYR_TEST_MODEL_DIR, "cuda:0", room * 64 / 63 + 256);
    auto ta = prefill(tight, a);
    auto tb = prefill(tight, b);  // threw PYR_ERR_OUT_OF_MEMORY before
    CHECK(rows_scratch(tight->device_memory()) == exact);
    CHECK(tb->memory().n_processed == 301);
}

TEST_CASE("the KV cache holds whole pages: device memory follows each layer's tokens") {
    auto gpu = open_engine(PYR_TEST_MODEL_DIR, "cuda:0");
    const uint64_t before = gpu->device_memory().kv;
    auto held = [&] { return gpu->device_memory().kv - before; };
    const int32_t n_ctx = 2000;  // not a multiple of a page
    // every layer full, and the last logits kept on the device for sampling there
    CHECK(gpu->kv_storage_bytes(n_ctx) ==
          paged_kv_bytes(*gpu, std::vector<int32_t>(size_t(gpu->config().n_layer), n_ctx), n_ctx) +
              uint64_t(gpu->config().n_vocab) * 4);

    // an uncompressed cache: its tokens rounded up to a page in every layer, before and after
    // decoding past page boundaries (no doubling of the allocation as it grows)
    auto full = greedy_session(gpu, 65, {}, n_ctx);
    full->feed_text(sample_text(2400));
    full->prefill();
    const int32_t prompt = full->memory().layer_tokens[0];
    CHECK(held() == paged_kv_bytes(*gpu, full->memory().layer_tokens, n_ctx));
    generate(*full, 65);  // a page's rows and one: crosses a page's end wherever the prompt ends
    CHECK(full->memory().layer_tokens[0] > (prompt + 63) / 64 * 64);
    CHECK(held() == paged_kv_bytes(*gpu, full->memory().layer_tokens, n_ctx));
    const uint64_t full_bytes = held();

    // a pyramid cache: each layer holds the pages of what it keeps. The compression after a
    // step empties pages that are freed once the compaction reading them is queued, at the
    // next forward: until then at most a page more per layer.
    pyr::KvParams kv;
    kv.policy = "pyramid";
    kv.retention = 0.5f;
    auto pyramid = greedy_session(gpu, 33, kv, n_ctx);
    pyramid->feed_text(sample_text(2400));
    pyramid->prefill();
    const uint64_t page = paged_kv_bytes(*gpu, {1}, n_ctx) - paged_kv_bytes(*gpu, {0}, n_ctx);
    auto check_pages = [&] {
        const uint64_t want = full_bytes + paged_kv_bytes(*gpu, pyramid->memory().layer_tokens, n_ctx);
        CHECK(held() >= want);
        CHECK(held() <= want + uint64_t(gpu->config().n_layer) * page);
    };
    check_pages();          // after the prefill's compression
    generate(*pyramid, 1);  // the prefill's token: nothing fed yet
    for (int i = 0; i < 2; ++i) {
        generate(*pyramid, 16);  // the step feeding the 16th token compresses: its emptied
        check_pages();           // pages are freed at the next forward
    }
    const std::vector<int32_t> kept = pyramid->memory().layer_tokens;
    MESSAGE("KV on the device: full " << full_bytes << " bytes for " << full->memory().layer_tokens[0]
            << " tokens a layer; pyramid " << held() - full_bytes << " bytes for " << kept.front()
            << " .. " << kept.back() << " tokens a layer");
    CHECK(held() - full_bytes < full_bytes);
    pyramid.reset();
    CHECK(held() == full_bytes);
    full.reset();
    CHECK(held() == 0);
}

TEST_CASE("a paged KV cache keeps its rows in order through moves toward either end, truncation and growth") {
    // The storage alone, against a list of the row ids each layer holds: rows are written
    // through the host's page table (a pattern per id), then random growth, retains (which
    // move toward whichever end moves fewer: a gap opens at the front), truncations and
    // flushes; at each check the device's table is the host's and every row holds its id.
    auto model = pyr::Model::load(PYR_TEST_MODEL_DIR);
    auto backend = pyr::make_cuda_backend(model, 0, 0);
    const int32_t n_ctx = 300, P = pyr::kernels::kKvPageRows;  // 5 pages, the last one partly
    auto storage = backend->new_kv_storage(n_ctx);
    auto& kv = dynamic_cast<pyr::cuda::CudaKvStorage&>(*storage);
    const int32_t kv_dim = kv.kv_dim();
    const size_t row_bytes = size_t(kv_dim) * 2;
    const int n_layer = 2;  // of the model's; the others stay empty
    const char* seed_env = std::getenv("PYR_TEST_SEED");
    const uint64_t seed = seed_env ? std::strtoull(seed_env, nullptr, 10) : std::random_device{}();
    INFO("random seed " << seed << " (replay: PYR_TEST_SEED=" << seed << ")");
    std::mt19937_64 gen(seed);
    auto below = [&](int32_t n) { return n <= 0 ? 0 : int32_t(gen() % uint64_t(n)); };

    std::vector<std::vector<int32_t>> ids(n_layer);  // row j of layer il holds ids[il][j]
    int32_t next_id = 0;
    auto pattern = [&](int32_t id, bool value) {
        std::vector<uint16_t> r(static_cast<size_t>(kv_dim));
        for (int32_t e = 0; e < kv_dim; ++e) r[size_t(e)] = uint16_t(id * 131 + e + (value ? 40000 : 0));
        return r;
    };
    auto gap = [&](int il) { return int32_t(reinterpret_cast<uintptr_t>(kv.host_table(il)[0])); };
    auto row_at = [&](int il, int32_t j, bool value) {  // row j's bytes on the device
        const int32_t s = gap(il) + j;
        return static_cast<char*>(kv.host_table(il)[1 + s / P]) + (size_t(value ? P : 0) + size_t(s % P)) * row_bytes;
    };
    int shifts = 0, closes = 0, back_moves = 0;
    auto grow = [&](int il, int32_t n_new) {  // reserve_kv's upload, then the new rows
        const int32_t size = kv.size(il), gap_before = gap(il);
        const int32_t first = kv.reserve(il, size + n_new), n = kv.table_entries(il);
        REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
        if (first < n)
            REQUIRE(cudaMemcpy(kv.table(il) + first, kv.host_table(il) + first, size_t(n - first) * sizeof(void*),
                               cudaMemcpyHostToDevice) == cudaSuccess);
        kv.table_uploaded(il);
        if (gap(il) < gap_before) ++(gap_before % P != 0 && gap(il) == 0 ? closes : shifts);
        for (int32_t j = size; j < size + n_new; ++j) {
            ids[size_t(il)].push_back(next_id++);
            for (bool value : {false, true})
                REQUIRE(cudaMemcpy(row_at(il, j, value), pattern(ids[size_t(il)].back(), value).data(), row_bytes,
                                   cudaMemcpyHostToDevice) == cudaSuccess);
        }
        kv.set_size(il, size + n_new);
    };
    auto check = [&](int il) {
        grow(il, 0);  // flushes the pending moves
        REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
        const int32_t n = kv.table_entries(il);
        std::vector<void*> device(static_cast<size_t>(n));
        REQUIRE(cudaMemcpy(device.data(), kv.table(il), size_t(n) * sizeof(void*), cudaMemcpyDeviceToHost) == cudaSuccess);
        CHECK(device == std::vector<void*>(kv.host_table(il), kv.host_table(il) + n));
        REQUIRE(kv.size(il) == int32_t(ids[size_t(il)].size()));
        CHECK(kv.capacity(il) >= kv.size(il));
        int32_t bad = 0;
        std::vector<uint16_t> got(static_cast<size_t>(kv_dim));
        for (int32_t j = 0; j < kv.size(il); ++j)
            for (bool value : {false, true}) {
                REQUIRE(cudaMemcpy(got.data(), row_at(il, j, value), row_bytes, cudaMemcpyDeviceToHost) == cudaSuccess);
                bad += got != pattern(ids[size_t(il)][size_t(j)], value);
            }
        CHECK(bad == 0);
    };
    for (int step = 0; step < 600; ++step) {
        const int il = below(n_layer);
        const int32_t size = kv.size(il);
        const int op = below(10);
        if (op < 4) {
            grow(il, below(std::min(40, n_ctx - size) + 1));
        } else if (op < 9 && size > 0) {
            std::vector<int32_t> keep;
            const int32_t sinks = below(5);
            switch (below(5)) {
                case 0:  // streaming: all but the oldest row after the sinks
                case 1:
                    for (int32_t r = 0; r < size; ++r)
                        if (r != sinks) keep.push_back(r);
                    break;
                case 2:  // the first rows dropped
                    for (int32_t r = below(size + 1); r < size; ++r) keep.push_back(r);
                    break;
                case 3:  // the last rows dropped
                    for (int32_t r = 0; r < below(size + 1); ++r) keep.push_back(r);
                    break;
                default:  // any
                    for (int32_t r = 0; r < size; ++r)
                        if (below(4) != 0) keep.push_back(r);
            }
            const int32_t gap_before = gap(il);
            kv.retain(il, keep);
            back_moves += gap(il) > gap_before;
            std::vector<int32_t> kept;
            for (int32_t r : keep) kept.push_back(ids[size_t(il)][size_t(r)]);
            ids[size_t(il)] = kept;
        } else if (op == 9) {
            const int32_t n = below(size + 1);
            kv.truncate(il, n);
            ids[size_t(il)].resize(size_t(n));
        }
        if (below(3) == 0) check(il);
    }
    for (int il = 0; il < n_layer; ++il) check(il);
    {  // a layer grows to n_ctx rows after dropping some at its front, with a gap of 40 in
       // its first page: the rows move to the front of that page
        kv.truncate(0, 0);
        ids[0].clear();
        grow(0, 100);
        const int32_t drop = ((40 - gap(0)) % P + P) % P;
        std::vector<int32_t> keep;
        for (int32_t r = drop; r < 100; ++r) keep.push_back(r);
        kv.retain(0, keep);
        ids[0].erase(ids[0].begin(), ids[0].begin() + drop);
        REQUIRE(gap(0) % P == 40);
        grow(0, n_ctx - kv.size(0));
        CHECK(gap(0) == 0);
        check(0);
    }
    int n_dev = 0;
    REQUIRE(cudaGetDeviceCount(&n_dev) == cudaSuccess);
    if (n_dev >= 2) {  // a flush whose launch fails keeps its jobs, and the next one runs them
        // (a kernel launch with another device current fails, and the context lives on)
        if (kv.size(1) < 4) grow(1, 4);
        std::vector<int32_t> keep;
        for (int32_t r = 0; r < kv.size(1); r += 2) keep.push_back(r);
        kv.retain(1, keep);
        std::vector<int32_t> kept;
        for (int32_t r : keep) kept.push_back(ids[1][size_t(r)]);
        ids[1] = kept;
        REQUIRE(cudaSetDevice(1) == cudaSuccess);
        CHECK_THROWS_AS(kv.reserve(1, kv.size(1)), pyr::Error);
        REQUIRE(cudaSetDevice(0) == cudaSuccess);
        check(1);
    } else {
        MESSAGE("SKIPPED (a part): a failed flush, which needs a second CUDA device to make current");
    }
    MESSAGE(back_moves << " retains moved rows toward the back, " << shifts << " table shifts, "
            << closes << " gaps closed");
    CHECK(back_moves > 0);
    CHECK(shifts > 0);
    CHECK(closes > 0);
}

TEST_CASE("cancel stops a CUDA prefill and leaves the session as before") {
    auto gpu = open_engine(PYR_TEST_MODEL_DIR, "cuda:0");
    pyr::KvParams kv;
    kv.policy = "pyramid";
    kv.retention = 0.5f;
    auto reference = greedy_session(gpu, 16, kv);
    reference->feed_text(sample_text(1500));
    const Run want = generate(*reference, 16);

    auto s = greedy_session(gpu, 16, kv);
    s->feed_text(sample_text(1500));
    s->cancel();
    try {
        s->prefill();
        FAIL("not cancelled");
    } catch (const pyr::Error& e) {
        CHECK(e.status() == PYR_CANCELLED);
    }
    CHECK(s->memory().kv_bytes == 0);
    CHECK(generate(*s, 16).tokens == want.tokens);
}

TEST_CASE("concurrent sessions share batched forwards and keep their lone runs' tokens") {
    json ref = read_json(kFixtures + "/bundled_reference.json");
    auto gpu = open_engine(PYR_TEST_MODEL_DIR, "cuda:0");
    const char* policies[] = {"full", "pyramid", "snapkv", "h2o"};
    const int n = 4, n_gen = 32;
    auto make = [&](int i) {
        pyr::KvParams kv;
        kv.policy = policies[i];
        kv.retention = 0.5f;
        auto s = greedy_session(gpu, n_gen, kv);
        s->feed_text(ref["prompts"][size_t(i) % ref["prompts"].size()]["text"].get<std::string>() +
                     sample_text(200 * size_t(i)));
        return s;
    };
    std::vector<Run> alone;
    for (int i = 0; i < n; ++i) alone.push_back(generate(*make(i), n_gen));
    const pyr::Engine::BatchStats before = gpu->batch_stats();

    std::vector<Run> together(n);
    std::vector<std::thread> threads;
    for (int i = 0; i < n; ++i)
        threads.emplace_back([&, i] { together[size_t(i)] = generate(*make(i), n_gen); });
    for (auto& t : threads) t.join();

    const pyr::Engine::BatchStats after = gpu->batch_stats();
    const uint64_t steps = after.steps - before.steps, forwards = after.forwards - before.forwards;
    MESSAGE(n << " concurrent sessions: " << steps << " steps in " << forwards
              << " forwards, largest batch " << after.max_batch);
    CHECK(forwards < steps);
    for (int i = 0; i < n; ++i) {
        CAPTURE(policies[i]);
        // a batch takes other kernels (cuBLAS instead of gemv): rounding may flip near-ties
        check_same_greedy(together[size_t(i)], alone[size_t(i)], 0.02, 1e-2);
    }
}

TEST_CASE("an application thread keeps its own current device through every engine call") {
    int n_dev = 0;
    REQUIRE(cudaGetDeviceCount(&n_dev) == cudaSuccess);
    if (n_dev < 2) {
        MESSAGE("SKIPPED: needs a second CUDA device to make current (this machine has " << n_dev << ")");
        return;
    }
    pyr::KvParams kv;  // retains during prefill and, after steps, on the session's thread
    kv.policy = "pyramid";
    kv.retention = 0.5f;
    const std::string text = sample_text(600);
    Run want;
    {
        auto gpu = open_engine(PYR_TEST_MODEL_DIR, "cuda:0");
        auto s = greedy_session(gpu, 8, kv);
        s->feed_text(text);
        want = generate(*s, 8);
    }
    REQUIRE(cudaSetDevice(1) == cudaSuccess);  // the application's GPU on this thread
    struct Restore {
        ~Restore() { cudaSetDevice(0); }
    } restore;
    auto current = [] {
        int d = -1;
        cudaGetDevice(&d);
        return d;
    };
    auto gpu = open_engine(PYR_TEST_MODEL_DIR, "cuda:0");
    CHECK(current() == 1);
    auto s = greedy_session(gpu, 8, kv);
    CHECK(current() == 1);
    s->feed_text(text);
    s->prefill();
    CHECK(current() == 1);
    const Run got = generate(*s, 8);
    CHECK(current() == 1);
    CHECK(got.tokens == want.tokens);
    s.reset();  // its KV pages are freed
    CHECK(current() == 1);
    gpu.reset();
    CHECK(current() == 1);
}
