// corpus.cpp — reading the evaluation text, tokenizing, sessions and progress output.
#include <cstdarg>
#include <cstdio>
#include <fstream>
#include <sstream>

#include "eval.h"

namespace pyr_eval {

namespace {

// The separator line between source files: NUL, "FILE", NUL.
const std::string kSeparator("\0FILE\0", 6);

}  // namespace

Corpus load_corpus(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) throw Error("cannot open the text file '" + path + "'");
    std::ostringstream buf;
    buf << in.rdbuf();
    if (in.bad()) throw Error("cannot read the text file '" + path + "'");
    const std::string text = buf.str();

    // A separator counts only as a whole line: at the start or after '\n', and followed by
    // '\n' or the end. The newline before it ends the previous file's last line.
    Corpus c;
    size_t start = 0, at = 0;
    while ((at = text.find(kSeparator, at)) != std::string::npos) {
        size_t end = at + kSeparator.size();
        bool whole_line = (at == 0 || text[at - 1] == '\n') && (end == text.size() || text[end] == '\n');
        if (!whole_line) {
            at = end;
            continue;
        }
        if (at > start) c.files.push_back(text.substr(start, at - start));
        start = at = std::min(end + 1, text.size());
    }
    if (start < text.size()) c.files.push_back(text.substr(start));
    if (c.files.empty()) throw Error("the text file '" + path + "' is empty");
    return c;
}

std::vector<std::string> split_lines(const std::string& text) {
    std::vector<std::string> lines;
    size_t start = 0;
    while (start < text.size()) {
        size_t nl = text.find('\n', start);
        if (nl == std::string::npos) nl = text.size();
        lines.push_back(text.substr(start, nl - start));
        start = nl + 1;
    }
    return lines;
}

std::vector<int32_t> tokenize(pyr_engine* engine, const std::string& text, bool add_bos) {
    // Text is rarely fewer characters than tokens, so one call usually suffices.
    std::vector<int32_t> ids(text.size() + 2);
    int32_t n = pyr_engine_tokenize(engine, text.c_str(), add_bos, ids.data(), int32_t(ids.size()));
    if (n > int32_t(ids.size())) {
        ids.resize(size_t(n));
        n = pyr_engine_tokenize(engine, text.c_str(), add_bos, ids.data(), n);
    }
    if (n < 0) throw Error(std::string("tokenize failed: ") + pyr_engine_errmsg(engine));
    ids.resize(size_t(n));
    return ids;
}

pyr_session* open_session(pyr_engine* engine, const Options& opt, int32_t n_ctx,
                          int32_t max_tokens) {
    pyr_session_params p;
    pyr_session_params_init(&p);
    opt.kv.apply(&p);
    p.n_ctx = n_ctx;
    p.max_tokens = max_tokens;
    p.temperature = 0.0f;  // greedy: answers depend on the model and the cache only
    p.seed = 0;
    pyr_session* s = nullptr;
    pyr_status st = pyr_session_create(engine, &p, &s);
    if (st != PYR_OK)
        throw Error(std::string("cannot create a session: ") + pyr_engine_errmsg(engine) + " (" +
                    pyr_status_str(st) + ")");
    return s;
}

void progress(const Options& opt, const char* fmt, ...) {
    if (opt.quiet) return;
    std::va_list args;
    va_start(args, fmt);
    std::fputs("pyramid-eval: ", stderr);
    std::vfprintf(stderr, fmt, args);
    std::fputc('\n', stderr);
    va_end(args);
}

}  // namespace pyr_eval
