// eval.h — the pieces of pyramid-eval: options, the text corpus, a portable RNG, and the
// two measurements (perplexity, passkey retrieval). C API only.
#ifndef PYRAMID_EVAL_EVAL_H
#define PYRAMID_EVAL_EVAL_H

#include <chrono>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "kv_flags.h"
#include "pyramid.h"

namespace pyr_eval {

struct Options {
    std::string model;
    std::string device;
    std::string text;  // corpus: source files separated by the line "\0FILE\0"
    int32_t threads = 0;
    uint64_t seed = 1;  // fixed by default: runs are reproducible unless asked otherwise
    bool json = false;
    bool quiet = false;
    bool passkey = false;
    // perplexity mode
    int32_t prompt_len = 1024;
    int32_t eval_len = 256;
    int32_t windows = 8;
    // passkey mode
    std::vector<int32_t> lengths = {1200, 2200};
    int32_t samples = 20;
    pyr_examples::KvFlags kv;
};

// A failure while running (model, file, session): main prints it and exits with 1.
struct Error : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// splitmix64: the same numbers on every platform and standard library (std::mt19937 is
// portable but std::uniform_int_distribution is not), so --seed reproduces runs anywhere.
struct Rng {
    uint64_t state;
    explicit Rng(uint64_t seed) : state(seed) {}
    uint64_t next() {
        uint64_t z = (state += 0x9e3779b97f4a7c15ull);
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
        return z ^ (z >> 31);
    }
    uint64_t below(uint64_t n) { return n ? next() % n : 0; }  // bias < n / 2^64
    double uniform() { return double(next() >> 11) * 0x1.0p-53; }  // [0, 1)
};

// The source files of the corpus, in file order, each as its text (with its final newline).
struct Corpus {
    std::vector<std::string> files;
};

Corpus load_corpus(const std::string& path);
std::vector<std::string> split_lines(const std::string& text);  // without the '\n's
std::vector<int32_t> tokenize(pyr_engine* engine, const std::string& text, bool add_bos);

// A session with the options' KV policy; greedy, fixed sampler seed.
pyr_session* open_session(pyr_engine* engine, const Options& opt, int32_t n_ctx,
                          int32_t max_tokens);

// Throws Error("what: <session message> (<status>)") unless st is PYR_OK.
inline void check(pyr_session* s, pyr_status st, const char* what) {
    if (st != PYR_OK)
        throw Error(std::string(what) + ": " + pyr_session_errmsg(s) + " (" + pyr_status_str(st) + ")");
}

inline double ms_since(std::chrono::steady_clock::time_point t0) {
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

// Progress on stderr unless --quiet.
void progress(const Options& opt, const char* fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;

nlohmann::json run_perplexity(pyr_engine* engine, const Options& opt, const Corpus& corpus);
nlohmann::json run_passkey(pyr_engine* engine, const Options& opt, const Corpus& corpus);

}  // namespace pyr_eval

#endif  // PYRAMID_EVAL_EVAL_H
