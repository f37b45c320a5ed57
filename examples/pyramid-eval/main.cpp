// pyramid-eval: what a KV-cache policy does to quality, on a model and a text of source files.
//   perplexity: pyramid-eval --text FILE --prompt-len P --eval-len T --windows N [--json]
//   passkey:    pyramid-eval --passkey --text FILE --lengths 1200,2200 --samples N [--json]
// plus the KV policy flags shared with pyramid-cli. Exit status: 0 done, 1 runtime error,
// 2 usage error.
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <map>
#include <string>

#include "eval.h"

namespace {

using pyr_eval::Options;

const char* const kUsage =
    "usage: pyramid-eval --text FILE [--passkey] [options]\n"
    "  --text FILE          source files separated by the line \"\\0FILE\\0\" (required)\n"
    "  --model DIR          HF LLaMA checkpoint directory (default: the bundled tiny-code-llama)\n"
    "  --device D           auto | cpu | cuda[:N] (default auto)\n"
    "  --threads N          CPU threads (default: all)\n"
    "  --seed S             windows, passkeys and their places (default 1)\n"
    "  --json               print one JSON object\n"
    "  --quiet              no progress on standard error\n"
    "perplexity mode (default):\n"
    "  --prompt-len P       prompt tokens, BOS included, compressed by the policy (default 1024)\n"
    "  --eval-len T         teacher-forced tokens scored after the prompt (default 256)\n"
    "  --windows N          windows of P - 1 + T tokens of text (default 8)\n"
    "passkey mode:\n"
    "  --passkey            passkey retrieval instead of perplexity\n"
    "  --lengths L1,L2,...  prompt lengths in tokens (default 1200,2200)\n"
    "  --samples N          prompts per length (default 20)\n"
    "KV cache policy:\n";

[[noreturn]] void usage_error(const std::string& msg) {
    std::fprintf(stderr, "pyramid-eval: %s\n%s%s", msg.c_str(), kUsage, pyr_examples::kKvUsage);
    std::exit(2);
}

int32_t parse_int(const std::string& flag, const std::string& v, int32_t min) {
    int32_t i = 0;
    if (!pyr_examples::kv_parse_int(v, &i) || i < min)
        usage_error(flag + " expects an integer >= " + std::to_string(min) + ", got '" + v + "'");
    return i;
}

std::vector<int32_t> parse_lengths(const std::string& v) {
    std::vector<int32_t> out;
    size_t start = 0;
    while (start <= v.size()) {
        size_t comma = std::min(v.find(',', start), v.size());
        // Room for BOS, the key line and the question, with some code around them.
        out.push_back(parse_int("--lengths", v.substr(start, comma - start), 48));
        start = comma + 1;
    }
    return out;
}

uint64_t parse_seed(const std::string& v) {
    char* end = nullptr;
    unsigned long long s = std::strtoull(v.c_str(), &end, 10);
    if (v.empty() || *end != '\0' || v[0] == '-') usage_error("--seed expects an integer >= 0, got '" + v + "'");
    return s;
}

Options parse_args(int argc, char** argv) {
    Options o;
    std::map<std::string, std::function<void(const std::string&)>> with_value = {
        {"--text", [&](const std::string& v) { o.text = v; }},
        {"--model", [&](const std::string& v) { o.model = v; }},
        {"--device", [&](const std::string& v) { o.device = v; }},
        {"--threads", [&](const std::string& v) { o.threads = parse_int("--threads", v, 0); }},
        {"--seed", [&](const std::string& v) { o.seed = parse_seed(v); }},
        {"--prompt-len", [&](const std::string& v) { o.prompt_len = parse_int("--prompt-len", v, 2); }},
        {"--eval-len", [&](const std::string& v) { o.eval_len = parse_int("--eval-len", v, 1); }},
        {"--windows", [&](const std::string& v) { o.windows = parse_int("--windows", v, 1); }},
        {"--lengths", [&](const std::string& v) { o.lengths = parse_lengths(v); }},
        {"--samples", [&](const std::string& v) { o.samples = parse_int("--samples", v, 1); }},
    };
    for (int i = 1; i < argc; ++i) {
        std::string a = argv[i];
        if (a == "--help" || a == "-h") {
            std::printf("%s%s", kUsage, pyr_examples::kKvUsage);
            std::exit(0);
        } else if (a == "--json") {
            o.json = true;
        } else if (a == "--quiet") {
            o.quiet = true;
        } else if (a == "--passkey") {
            o.passkey = true;
        } else if (pyr_examples::kv_flag_takes_value(a) || with_value.count(a)) {
            if (i + 1 >= argc) usage_error(a + " needs a value");
            std::string v = argv[++i];
            if (with_value.count(a)) {
                with_value[a](v);
            } else if (std::string err = o.kv.set(a, v); !err.empty()) {
                usage_error(err);
            }
        } else {
            usage_error("unknown option '" + a + "'");
        }
    }
    if (o.text.empty()) usage_error("--text FILE is required");
    if (o.model.empty()) o.model = pyr_default_model_dir();
    return o;
}

void print_summary(const Options& opt, const nlohmann::json& r) {
    if (!opt.passkey) {
        std::printf("perplexity %.4f over %d windows (P = %d, T = %d), mean retention %.4f, "
                    "policy %s\n", r["ppl"].get<double>(), opt.windows, opt.prompt_len,
                    opt.eval_len, r["mean_retention"].get<double>(), opt.kv.policy.c_str());
        return;
    }
    for (int32_t length : opt.lengths) {
        std::string k = std::to_string(length);
        std::printf("passkey %s: accuracy %.3f (%d prompts, mean %.1f tokens)\n", k.c_str(),
                    r["accuracy"][k].get<double>(), opt.samples,
                    r["mean_prompt_tokens"][k].get<double>());
    }
    std::printf("mean retention %.4f, policy %s\n", r["mean_retention"].get<double>(),
                opt.kv.policy.c_str());
}

}  // namespace

int main(int argc, char** argv) {
    Options opt = parse_args(argc, argv);
    pyr_engine_params ep;
    pyr_engine_params_init(&ep);
    ep.n_threads = opt.threads;
    if (!opt.device.empty()) ep.device = opt.device.c_str();
    pyr_engine* engine = nullptr;
    pyr_status st = pyr_engine_open(opt.model.c_str(), &ep, &engine);
    if (st != PYR_OK) {
        std::fprintf(stderr, "pyramid-eval: cannot open model '%s': %s (%s)\n", opt.model.c_str(),
                     pyr_engine_errmsg(engine), pyr_status_str(st));
        pyr_engine_close(engine);
        return 1;
    }
    int rc = 0;
    try {
        pyr_eval::Corpus corpus = pyr_eval::load_corpus(opt.text);
        nlohmann::json r = opt.passkey ? pyr_eval::run_passkey(engine, opt, corpus)
                                       : pyr_eval::run_perplexity(engine, opt, corpus);
        r["text"] = opt.text;
        r["device"] = pyr_engine_device(engine);
        if (opt.json)
            std::puts(r.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace).c_str());
        else
            print_summary(opt, r);
    } catch (const std::exception& e) {
        std::fprintf(stderr, "pyramid-eval: %s\n", e.what());
        rc = 1;
    }
    pyr_engine_close(engine);
    return rc;
}
