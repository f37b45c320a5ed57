// pyramid-bench: prefill and decode throughput of a backend, with and without KV compression.
//
// B sequences run together, as the engine would batch them: one batched forward for all B
// prompts (or N at a time: --prefill-batch), then G decode steps of one token per sequence,
// each step one batched forward.
// Each sequence has its own KvCache and KV policy, driven the way Session drives them
// (begin_step -> forward -> set_n_processed -> after_step). Weights are random (--shape,
// no checkpoint needed) or a real checkpoint (--model). The policies are wrapped in a
// decorator that clocks their host-side keep/drop decisions ("selection overhead").
//
// Links the internal static library: it uses Backend, KvCache and KvPolicy directly.
//
// The parts: bench.h.
#include <algorithm>
#include <cstdio>
#include <optional>

#include "bench.h"
#include "common/error.h"
#include "kv/kv_policy.h"
#include "pyramid.h"

namespace bench {
namespace {

// Checks what depends on the model: the KV knobs (make_kv_policy validates them against
// n_layer), the vocabulary and the context. Bad flags are usage errors (exit 2).
void check_against_model(const Options& o, const Target& t, const pyr::KvParams& kv) {
    try {
        pyr::make_kv_policy(kv, t.config.n_layer);
    } catch (const pyr::Error& e) {
        usage_error(e.what());
    }
    if (t.config.n_vocab <= 3)
        pyr::fail(PYR_ERR_INVALID_ARGUMENT, "the model's vocabulary is too small for random prompts");
    if (t.config.n_ctx_train > 0 && o.prompt + o.gen > t.config.n_ctx_train)
        std::fprintf(stderr, "pyramid-bench: note: prompt + gen = %d exceeds the model's %d "
                             "trained positions (fine for timing)\n",
                     o.prompt + o.gen, t.config.n_ctx_train);
}

// The benchmark the options ask for, reported on stdout.
int run(Options o) {
    const pyr::KvParams kv = kv_params(o.kv);
    if (!o.model.empty() && o.dtype_given)
        std::fprintf(stderr, "pyramid-bench: note: --dtype applies to random weights; the "
                             "checkpoint's type is used\n");
    if (o.device != "cpu") check_device(o.device);  // before loading anything
    if (o.device == "cpu" && o.model.empty() && o.shape != "tiny")
        std::fprintf(stderr, "pyramid-bench: note: random %s weights on the CPU take much memory "
                             "and time; --shape tiny is the smoke-test size\n",
                     o.shape.c_str());
    Target t = describe_target(o);
    check_against_model(o, t, kv);
    open_backend(o, t);
    t.host = std::make_unique<pyr::ThreadPool>(o.threads);

    std::mt19937_64 rng(o.seed);
    std::optional<BatchSearch> search;
    if (o.batch_max) {  // its runs are the warm-up
        search.emplace();
        o.batch = find_max_batch(t, kv, o.prompt, o.prefill_batch, o.gen, rng, *search);
    }
    // Warm-up at the timed prompt length: besides loading kernels and cuBLAS, the backend's
    // scratch grows to B * P rows here rather than inside the timed prefill.
    for (int i = 0; i < (o.batch_max ? 0 : o.warmup); ++i) {
        std::fprintf(stderr, "pyramid-bench: warming up (%d/%d)...\n", i + 1, o.warmup);
        run_once(t, kv, o.batch, o.prompt, o.prefill_batch, std::min(o.gen, 4), rng);
    }
    std::vector<RunResult> runs;
    for (int i = 0; i < o.repeat; ++i) {
        std::fprintf(stderr, "pyramid-bench: run %d/%d: prefill %d x %d tokens, decode %d steps...\n",
                     i + 1, o.repeat, o.batch, o.prompt, o.gen);
        runs.push_back(run_once(t, kv, o.batch, o.prompt, o.prefill_batch, o.gen, rng));
    }
    const Summary s = summarize(o, t, runs);
    if (o.json)
        std::printf("%s\n", report_json(o, t, kv, runs, s, search ? &*search : nullptr).dump().c_str());
    else
        print_table(o, t, kv, runs, s, search ? &*search : nullptr);
    return 0;
}

}  // namespace
}  // namespace bench

int main(int argc, char** argv) {
    const bench::Options o = bench::parse_args(argc, argv);
    try {
        return bench::run(o);
    } catch (const pyr::Error& e) {
        std::fprintf(stderr, "pyramid-bench: %s (%s)\n", e.what(), pyr_status_str(e.status()));
    } catch (const std::exception& e) {
        std::fprintf(stderr, "pyramid-bench: %s\n", e.what());
    }
    return 1;
}
