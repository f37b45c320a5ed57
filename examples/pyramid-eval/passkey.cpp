// passkey.cpp — passkey retrieval in the format the bundled model was trained on
// (models/tiny-code-llama/MODEL_CARD.md):
//
//   <consecutive lines of real code, from a random file and line, continuing into the
//    following files when one ends>
//   with the line "# The secret key is NNNNN. Remember it." inserted at a line boundary,
//   "# What is the secret key? The secret key is "
//
// The key has 5 digits (the first nonzero). Its depth (the share of code lines before it)
// is uniform in [0, 1]. The number of code lines is chosen by bisection on the exact token
// count of the whole prompt (with BOS) so that it is as close to the requested length as
// whole lines allow. The answer is greedy, at most 8 tokens, and is correct when it starts,
// after leading spaces, with the 5 digits.
#include <algorithm>
#include <cmath>
#include <memory>

#include "eval.h"

namespace pyr_eval {

namespace {

const char* const kQuestion = "# What is the secret key? The secret key is ";
constexpr int32_t kAnswerTokens = 8;

struct Prompt {
    std::string text;
    std::string key;
    int32_t tokens = 0;   // with BOS
    int32_t key_pos = 0;  // position of the key line's first token
};

struct Sample {
    Prompt prompt;
    std::string answer;
    bool correct = false;
    double retention = 0, seconds = 0;
    nlohmann::json kv;  // the policy's parameters as used for this prompt
};

struct Lines {
    std::vector<std::string> lines;
    bool whole_corpus = false;  // every line of the corpus is in `lines`: no more to take
};

// Consecutive lines from file f, line o on, wrapping into the next files, until they hold
// at least min_chars characters (or the whole corpus has been taken).
Lines gather_lines(const std::vector<std::vector<std::string>>& files, size_t f, size_t o,
                   size_t min_chars) {
    Lines out;
    size_t chars = 0, total_lines = 0;
    for (const auto& file : files) total_lines += file.size();
    while (chars < min_chars && out.lines.size() < total_lines) {
        if (o >= files[f].size()) {
            f = (f + 1) % files.size();
            o = 0;
            continue;
        }
        chars += files[f][o].size() + 1;
        out.lines.push_back(files[f][o++]);
    }
    out.whole_corpus = out.lines.size() == total_lines;
    return out;
}

// n code lines with the key line after the first k of them, then the question.
std::string build_text(const std::vector<std::string>& lines, size_t n, size_t k,
                       const std::string& key_line) {
    std::string t;
    for (size_t i = 0; i <= n; ++i) {
        if (i == k) t += key_line + "\n";
        if (i < n) t += lines[i] + "\n";
    }
    return t + kQuestion;
}

// The n in [0, max_n] whose count(n) is closest to `length`, by bisection (count grows with
// n). If even max_n is short, max_n: the prompt is then shorter, as the results report.
template <class Count>
size_t closest_line_count(const Count& count, size_t max_n, int32_t length) {
    size_t lo = 0, hi = max_n;  // invariant: count(lo) <= length < count(hi)
    if (count(0) > length) return 0;
    while (hi - lo > 1) {
        size_t mid = (lo + hi) / 2;
        (count(mid) <= length ? lo : hi) = mid;
    }
    return hi > lo && std::abs(count(hi) - length) < std::abs(length - count(lo)) ? hi : lo;
}

Prompt make_prompt(pyr_engine* engine, const std::vector<std::vector<std::string>>& files,
                   int32_t length, Rng& rng) {
    size_t f = rng.below(files.size());
    size_t o = rng.below(files[f].size());
    Prompt p;
    p.key = std::to_string(10000 + rng.below(90000));
    double depth = rng.uniform();
    const std::string key_line = "# The secret key is " + p.key + ". Remember it.";
    auto key_at = [&](size_t n) { return size_t(std::lround(depth * double(n))); };

    // Code rarely has more than 8 characters per token; take more lines if that was short.
    for (size_t min_chars = size_t(length) * 8;; min_chars *= 2) {
        Lines got = gather_lines(files, f, o, min_chars);
        const std::vector<std::string>& lines = got.lines;
        auto count = [&](size_t n) {
            return int32_t(tokenize(engine, build_text(lines, n, key_at(n), key_line), true).size());
        };
        if (!got.whole_corpus && count(lines.size()) <= length) continue;
        size_t n = closest_line_count(count, lines.size(), length);
        p.text = build_text(lines, n, key_at(n), key_line);
        p.tokens = count(n);
        std::string before;  // BOS and the code lines before the key line: the key's position
        for (size_t i = 0; i < key_at(n); ++i) before += lines[i] + "\n";
        p.key_pos = int32_t(tokenize(engine, before, true).size());
        return p;
    }
}

Sample run_sample(pyr_engine* engine, const Options& opt, Prompt prompt) {
    Sample s;
    auto t0 = std::chrono::steady_clock::now();
    std::unique_ptr<pyr_session, decltype(&pyr_session_destroy)> session(
        open_session(engine, opt, prompt.tokens + kAnswerTokens + 8, kAnswerTokens),
        pyr_session_destroy);
    check(session.get(), pyr_session_feed_text(session.get(), prompt.text.c_str()), "feeding the prompt");
    pyr_status st;
    while ((st = pyr_session_next(session.get())) == PYR_OK || st == PYR_DONE) {
        s.answer += pyr_session_text(session.get());
        if (st == PYR_DONE) break;
    }
    check(session.get(), st == PYR_DONE ? PYR_OK : st, "generating the answer");
    size_t first = s.answer.find_first_not_of(' ');
    s.correct = first != std::string::npos && s.answer.compare(first, prompt.key.size(), prompt.key) == 0;
    s.retention = pyr_examples::kv_retention_now(session.get());
    s.kv = pyr_examples::kv_json(session.get(), opt.kv.policy);
    s.seconds = ms_since(t0) / 1000.0;
    s.prompt = std::move(prompt);
    return s;
}

// The answer on one line for the progress output.
std::string one_line(const std::string& s) {
    std::string out;
    for (char c : s) out += c == '\n' ? std::string("\\n") : std::string(1, c);
    return out;
}

// The key's depth in the prompt as a share of its tokens (0 = right after BOS).
double depth_of(const Prompt& p) { return double(p.key_pos) / double(std::max(p.tokens, 1)); }

}  // namespace

nlohmann::json run_passkey(pyr_engine* engine, const Options& opt, const Corpus& corpus) {
    auto t_start = std::chrono::steady_clock::now();
    std::vector<std::vector<std::string>> files;
    for (const std::string& f : corpus.files) {
        files.push_back(split_lines(f));
        if (files.back().empty()) files.pop_back();
    }
    if (files.empty()) throw Error("the text file has no lines of code");
    progress(opt, "passkey: %zu files, %d samples per length, policy %s", files.size(),
             opt.samples, opt.kv.policy.c_str());

    nlohmann::json accuracy = nlohmann::json::object(), mean_tokens = nlohmann::json::object(),
                   retention = nlohmann::json::object(), kv_by_length = nlohmann::json::object(),
                   results = nlohmann::json::array();
    double retention_all = 0;
    for (int32_t length : opt.lengths) {
        int32_t correct = 0;
        double tokens = 0, ret = 0;
        for (int32_t i = 0; i < opt.samples; ++i) {
            // One stream per (length, sample): a sample does not change when --samples does.
            Rng rng(opt.seed ^ (uint64_t(length) * 0x100000001b3ull) ^ (uint64_t(i) << 40));
            Sample s = run_sample(engine, opt, make_prompt(engine, files, length, rng));
            correct += s.correct;
            tokens += s.prompt.tokens;
            ret += s.retention;
            kv_by_length[std::to_string(length)] = s.kv;
            progress(opt, "length %d sample %d/%d: %d tokens, key %s at depth %.2f -> '%s' %s "
                     "(retention %.3f, %.1f s)", length, i + 1, opt.samples, s.prompt.tokens,
                     s.prompt.key.c_str(), depth_of(s.prompt), one_line(s.answer).c_str(),
                     s.correct ? "ok" : "WRONG", s.retention, s.seconds);
            results.push_back({{"length", length}, {"prompt_tokens", s.prompt.tokens},
                               {"key", s.prompt.key}, {"depth", depth_of(s.prompt)},
                               {"answer", s.answer}, {"correct", s.correct},
                               {"retention", s.retention}, {"seconds", s.seconds}});
        }
        std::string key = std::to_string(length);
        const double n = std::max(opt.samples, 1);
        accuracy[key] = correct / n;
        mean_tokens[key] = tokens / n;
        retention[key] = ret / n;
        retention_all += ret / n;
        progress(opt, "length %d: accuracy %.3f, mean %.1f tokens, retention %.3f", length,
                 correct / n, tokens / n, ret / n);
    }
    const double n_lengths = double(std::max<size_t>(opt.lengths.size(), 1));
    return {{"mode", "passkey"},
            {"accuracy", accuracy},
            {"mean_retention", retention_all / n_lengths},
            {"mean_prompt_tokens", mean_tokens},
            {"mean_retention_by_length", retention},
            {"samples", opt.samples},
            {"lengths", opt.lengths},
            {"seed", opt.seed},
            {"seconds", ms_since(t_start) / 1000.0},
            {"kv", opt.lengths.empty() ? nlohmann::json::object()
                                       : kv_by_length[std::to_string(opt.lengths[0])]},
            {"kv_by_length", kv_by_length},
            {"results", results}};
}

}  // namespace pyr_eval
