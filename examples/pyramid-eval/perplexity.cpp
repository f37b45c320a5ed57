// perplexity.cpp — perplexity of T teacher-forced tokens after a compressed P-token prompt.
//
// Windows: each is P - 1 + T consecutive tokens of one source file (files tokenized
// separately, no BOS). Files are drawn without replacement with probability proportional
// to the number of start offsets they allow (so long files count more, as in a uniform draw
// over the text, but no file is used twice until every long-enough file has been), and the
// start offset is uniform. Only if no file is long enough are the windows taken over the
// concatenation of all files.
//
// Prompt: [BOS] + the window's first P - 1 tokens (P tokens in all, the length the policy
// compresses). Targets: the next T tokens. Each target is scored on the logits of the last
// processed token, then fed alone and processed, so every target goes through the decode
// path and generation-phase compression applies as it would when generating.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <memory>

#include "eval.h"

namespace pyr_eval {

namespace {

struct Window {
    int32_t file = -1;  // -1: the concatenation of all files
    int32_t offset = 0;
};

struct WindowResult {
    double nll_sum = 0, retention = 0, prefill_ms = 0, decode_ms = 0;
    nlohmann::json kv;
};

using SessionPtr = std::unique_ptr<pyr_session, decltype(&pyr_session_destroy)>;

std::vector<Window> pick_windows(const std::vector<std::vector<int32_t>>& files, int32_t need,
                                 int32_t n, Rng& rng) {
    std::vector<Window> out;
    std::vector<int32_t> pool;
    for (int32_t f = 0; f < int32_t(files.size()); ++f)
        if (int32_t(files[size_t(f)].size()) >= need) pool.push_back(f);
    if (pool.empty()) {  // every file is short: windows over the concatenation
        size_t total = 0;
        for (const auto& f : files) total += f.size();
        if (total < size_t(need))
            throw Error("the text has " + std::to_string(total) + " tokens, fewer than one window (" +
                        std::to_string(need) + ")");
        for (int32_t i = 0; i < n; ++i) out.push_back({-1, int32_t(rng.below(total - size_t(need) + 1))});
        return out;
    }
    std::vector<int32_t> left;
    while (int32_t(out.size()) < n) {
        if (left.empty()) left = pool;  // every file used: start over
        uint64_t total = 0;
        for (int32_t f : left) total += files[size_t(f)].size() - size_t(need) + 1;
        uint64_t r = rng.below(total);
        size_t i = 0;
        for (; r >= files[size_t(left[i])].size() - size_t(need) + 1; ++i)
            r -= files[size_t(left[i])].size() - size_t(need) + 1;
        int32_t f = left[i];
        left.erase(left.begin() + std::ptrdiff_t(i));
        out.push_back({f, int32_t(rng.below(files[size_t(f)].size() - size_t(need) + 1))});
    }
    return out;
}

// -log softmax(logits)[target], in double.
double nll(const float* logits, int32_t n_vocab, int32_t target) {
    double mx = logits[0];
    for (int32_t i = 1; i < n_vocab; ++i) mx = std::max(mx, double(logits[i]));
    double sum = 0;
    for (int32_t i = 0; i < n_vocab; ++i) sum += std::exp(double(logits[i]) - mx);
    return mx + std::log(sum) - double(logits[target]);
}

WindowResult run_window(pyr_engine* engine, const Options& opt, const int32_t* tokens) {
    const int32_t P = opt.prompt_len, T = opt.eval_len, n_vocab = pyr_engine_n_vocab(engine);
    SessionPtr s(open_session(engine, opt, P + T + 1, 0), pyr_session_destroy);
    std::vector<int32_t> prompt = {pyr_engine_bos_token(engine)};
    prompt.insert(prompt.end(), tokens, tokens + (P - 1));

    WindowResult r;
    auto t0 = std::chrono::steady_clock::now();
    check(s.get(), pyr_session_feed_tokens(s.get(), prompt.data(), P), "feeding the prompt");
    check(s.get(), pyr_session_prefill(s.get()), "prefill");
    r.prefill_ms = ms_since(t0);
    r.kv = pyr_examples::kv_json(s.get(), opt.kv.policy);  // prompt-dependent values known now

    auto t1 = std::chrono::steady_clock::now();
    for (int32_t i = 0; i < T; ++i) {
        int32_t target = tokens[P - 1 + i];
        const float* logits = pyr_session_logits(s.get());
        if (!logits) throw Error("no logits after processing a token");
        r.nll_sum += nll(logits, n_vocab, target);
        check(s.get(), pyr_session_feed_tokens(s.get(), &target, 1), "feeding a target token");
        check(s.get(), pyr_session_prefill(s.get()), "decoding a target token");
    }
    r.decode_ms = ms_since(t1);
    r.retention = pyr_examples::kv_retention_now(s.get());
    return r;
}

}  // namespace

nlohmann::json run_perplexity(pyr_engine* engine, const Options& opt, const Corpus& corpus) {
    const int32_t P = opt.prompt_len, T = opt.eval_len, need = P - 1 + T;
    auto t_start = std::chrono::steady_clock::now();
    std::vector<std::vector<int32_t>> files;
    for (const std::string& f : corpus.files) files.push_back(tokenize(engine, f, false));
    std::vector<int32_t> all;  // the concatenation, only needed when every file is short
    Rng rng(opt.seed);
    std::vector<Window> windows = pick_windows(files, need, opt.windows, rng);
    if (windows[0].file < 0)
        for (const auto& f : files) all.insert(all.end(), f.begin(), f.end());
    progress(opt, "perplexity: %zu files, P = %d, T = %d, %d windows, policy %s", files.size(), P,
             T, opt.windows, opt.kv.policy.c_str());

    double nll_sum = 0, retention_sum = 0, prefill_ms = 0, decode_ms = 0;
    nlohmann::json per_window = nlohmann::json::array(), kv;
    for (size_t w = 0; w < windows.size(); ++w) {
        const Window& win = windows[w];
        const int32_t* tokens = (win.file < 0 ? all.data() : files[size_t(win.file)].data()) + win.offset;
        WindowResult r = run_window(engine, opt, tokens);
        nll_sum += r.nll_sum;
        retention_sum += r.retention;
        prefill_ms += r.prefill_ms;
        decode_ms += r.decode_ms;
        kv = r.kv;
        per_window.push_back({{"file", win.file}, {"offset", win.offset},
                              {"ppl", std::exp(r.nll_sum / T)}, {"retention", r.retention},
                              {"prefill_ms", r.prefill_ms}, {"decode_ms", r.decode_ms}});
        progress(opt, "window %zu/%zu: file %d @ %d, ppl %.3f, retention %.3f, prefill %.0f ms, "
                 "decode %.1f tokens/s (running ppl %.3f)", w + 1, windows.size(), win.file,
                 win.offset, std::exp(r.nll_sum / T), r.retention, r.prefill_ms,
                 1000.0 * T / std::max(r.decode_ms, 1e-9),
                 std::exp(nll_sum / (double(T) * double(w + 1))));
    }
    const double n = double(windows.size());
    return {{"mode", "perplexity"},
            {"ppl", std::exp(nll_sum / (n * T))},
            {"mean_nll", nll_sum / (n * T)},
            {"mean_retention", retention_sum / n},
            {"windows", windows.size()},
            {"prompt_len", P},
            {"eval_len", T},
            {"seed", opt.seed},
            {"tokens_per_s", decode_ms > 0 ? 1000.0 * n * T / decode_ms : 0.0},
            {"mean_prefill_ms", prefill_ms / n},
            {"seconds", ms_since(t_start) / 1000.0},
            {"kv", kv},
            {"per_window", per_window}};
}

}  // namespace pyr_eval
