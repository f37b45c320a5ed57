// pyramid-cli: stream a completion from a model (the bundled one by default), or print one
// JSON object with the tokens, per-step top logits, timings and KV memory (--json), and
// optionally draw which prompt positions each layer keeps after prefill (--kv-map FILE.svg).
#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <map>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include <nlohmann/json.hpp>

#include "kv_flags.h"
#include "kv_map.h"
#include "pyramid.h"

#include <unistd.h>

namespace {

struct Options {
    std::string model;
    std::string prompt = "def fibonacci(n):";
    std::vector<int32_t> prompt_tokens;
    bool use_prompt_tokens = false;
    bool json = false;
    std::string kv_map;  // --kv-map: SVG output path
    pyr_examples::KvFlags kv;
    pyr_engine_params engine;
    pyr_session_params session;
};

const char* const kUsage =
    "usage: pyramid-cli [options]\n"
    "  --model DIR          HF LLaMA checkpoint directory (default: the bundled tiny-code-llama)\n"
    "  --prompt TEXT        prompt text; BOS is added (default: \"def fibonacci(n):\")\n"
    "  --prompt-tokens IDS  comma-separated token ids, used as given (no BOS added)\n"
    "  --max-tokens N       tokens to generate (default 256; 0 = until end or context full)\n"
    "  --temperature T      0 = greedy (default 0.8)\n"
    "  --top-k K            (default 40; 0 = off)\n"
    "  --top-p P            (default 0.95; 1 = off)\n"
    "  --min-p P            (default 0.05; 0 = off)\n"
    "  --repeat-penalty R   (default 1.0 = off)\n"
    "  --seed S             sampler seed (default: random)\n"
    "  --threads N          CPU threads (default: all)\n"
    "  --n-ctx N            context length (default: the model's)\n"
    "  --device D           auto | cpu | cuda[:N] (default auto)\n"
    "  --max-device-bytes N memory budget, bytes or with a K/M/G/T suffix: on a GPU for\n"
    "                       weights + KV + scratch, on the CPU for the KV cache (default 0 = none)\n"
    "  --prefill-chunk N    prompt tokens per forward (default 512; 0 = the whole prompt)\n"
    "  --json               print one JSON object instead of streaming; with the KV policy,\n"
    "                       per-layer kept positions and the mean retention\n"
    "  --kv-map FILE.svg    draw which prompt positions each layer keeps after prefill\n"
    "  --verbose            log what the library does\n"
    "  --version, --help\n"
    "KV cache policy:\n";

pyr_session* g_session = nullptr;  // for Ctrl-C

void on_sigint(int) {
    if (g_session) pyr_session_cancel(g_session);  // an atomic store: signal-safe
}

[[noreturn]] void usage_error(const std::string& msg) {
    std::fprintf(stderr, "pyramid-cli: %s\n%s%s", msg.c_str(), kUsage, pyr_examples::kKvUsage);
    std::exit(2);
}

template <class T>
T parse_number(const std::string& flag, const std::string& value) {
    char* end = nullptr;
    errno = 0;
    double v = std::strtod(value.c_str(), &end);
    if (value.empty() || *end != '\0' || errno != 0 || std::isnan(v))
        usage_error(flag + " expects a number, got '" + value + "'");
    if (std::is_integral<T>::value && v != std::floor(v))
        usage_error(flag + " expects an integer, got '" + value + "'");
    return T(v);
}

std::vector<int32_t> parse_ids(const std::string& value) {
    std::vector<int32_t> ids;
    size_t start = 0;
    while (start <= value.size()) {
        size_t comma = value.find(',', start);
        std::string item = value.substr(start, comma == std::string::npos ? std::string::npos
                                                                           : comma - start);
        ids.push_back(parse_number<int32_t>("--prompt-tokens", item));
        if (comma == std::string::npos) break;
        start = comma + 1;
    }
    return ids;
}

Options parse_args(int argc, char** argv) {
    Options o;
    static std::string device;  // outlives parse_args: engine.device points into it
    pyr_engine_params_init(&o.engine);
    pyr_session_params_init(&o.session);
    std::map<std::string, std::function<void(const std::string&)>> with_value = {
        {"--model", [&](const std::string& v) { o.model = v; }},
        {"--prompt", [&](const std::string& v) { o.prompt = v; }},
        {"--prompt-tokens",
         [&](const std::string& v) { o.prompt_tokens = parse_ids(v), o.use_prompt_tokens = true; }},
        {"--max-tokens", [&](const std::string& v) { o.session.max_tokens = parse_number<int32_t>("--max-tokens", v); }},
        {"--temperature", [&](const std::string& v) { o.session.temperature = parse_number<float>("--temperature", v); }},
        {"--top-k", [&](const std::string& v) { o.session.top_k = parse_number<int32_t>("--top-k", v); }},
        {"--top-p", [&](const std::string& v) { o.session.top_p = parse_number<float>("--top-p", v); }},
        {"--min-p", [&](const std::string& v) { o.session.min_p = parse_number<float>("--min-p", v); }},
        {"--repeat-penalty", [&](const std::string& v) { o.session.repeat_penalty = parse_number<float>("--repeat-penalty", v); }},
        {"--seed", [&](const std::string& v) { o.session.seed = parse_number<uint64_t>("--seed", v); }},
        {"--threads", [&](const std::string& v) { o.engine.n_threads = parse_number<int32_t>("--threads", v); }},
        {"--n-ctx", [&](const std::string& v) { o.session.n_ctx = parse_number<int32_t>("--n-ctx", v); }},
        {"--device", [&](const std::string& v) { device = v; }},
        {"--max-device-bytes", [&](const std::string& v) {
             if (!pyr_examples::parse_byte_count(v, &o.engine.max_device_bytes))
                 usage_error("--max-device-bytes expects a byte count (digits, optionally K/M/G/T), got '" + v + "'");
         }},
        {"--prefill-chunk", [&](const std::string& v) { o.engine.prefill_chunk = parse_number<int32_t>("--prefill-chunk", v); }},
        {"--kv-map", [&](const std::string& v) { o.kv_map = v; }},
    };
    for (int i = 1; i < argc; ++i) {
        std::string a = argv[i];
        if (a == "--help" || a == "-h") {
            std::printf("%s%s", kUsage, pyr_examples::kKvUsage);
            std::exit(0);
        } else if (a == "--version") {
            std::printf("pyramid %s (ABI %d)\n", pyr_version_string(), pyr_abi_version());
            std::exit(0);
        } else if (a == "--json") {
            o.json = true;
        } else if (a == "--verbose") {
            pyr_log_set_level(PYR_LOG_INFO);
        } else if (pyr_examples::kv_flag_takes_value(a)) {
            if (i + 1 >= argc) usage_error(a + " needs a value");
            std::string err = o.kv.set(a, argv[++i]);
            if (!err.empty()) usage_error(err);
        } else if (with_value.count(a)) {
            if (i + 1 >= argc) usage_error(a + " needs a value");
            with_value[a](argv[++i]);
        } else {
            usage_error("unknown option '" + a + "'");
        }
    }
    if (!device.empty()) o.engine.device = device.c_str();
    if (o.model.empty()) o.model = pyr_default_model_dir();
    return o;
}

[[noreturn]] void die(const std::string& what, const char* message, pyr_status st) {
    std::fprintf(stderr, "pyramid-cli: %s: %s (%s)\n", what.c_str(), message, pyr_status_str(st));
    std::exit(1);
}

double ms_since(std::chrono::steady_clock::time_point t0) {
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

// The JSON record of one generated token: its logit, log-probability and the 5 highest
// [id, logit] of the raw logits it was sampled from.
nlohmann::json step_record(const float* logits, int32_t n_vocab, int32_t id) {
    double max_l = -INFINITY, sum = 0.0;
    for (int32_t i = 0; i < n_vocab; ++i) max_l = std::max(max_l, double(logits[i]));
    for (int32_t i = 0; i < n_vocab; ++i) sum += std::exp(double(logits[i]) - max_l);
    std::vector<int32_t> order(static_cast<size_t>(n_vocab));
    for (int32_t i = 0; i < n_vocab; ++i) order[size_t(i)] = i;
    size_t k = std::min<size_t>(5, order.size());
    std::partial_sort(order.begin(), order.begin() + std::ptrdiff_t(k), order.end(),
                      [&](int32_t a, int32_t b) {
                          return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
                      });
    nlohmann::json top = nlohmann::json::array();
    for (size_t i = 0; i < k; ++i) top.push_back({order[i], logits[order[i]]});
    return {{"id", id},
            {"logit", logits[id]},
            {"logprob", double(logits[id]) - max_l - std::log(sum)},
            {"top", top}};
}

std::vector<int32_t> layer_positions(const pyr_session* session, int32_t layer, pyr_kv_when when) {
    std::vector<int32_t> pos(size_t(pyr_session_layer_positions(session, layer, when, nullptr, 0)));
    int32_t n = pyr_session_layer_positions(session, layer, when, pos.data(), int32_t(pos.size()));
    pos.resize(size_t(std::max(0, std::min(n, int32_t(pos.size())))));
    return pos;
}

// The KV memory part of --json: per layer tokens, bytes and kept positions now and right
// after prefill, the mean retention and the policy with the parameters it used.
nlohmann::json memory_json(const pyr_engine* engine, const pyr_session* session,
                           const std::string& policy) {
    nlohmann::json layers = nlohmann::json::array(), prefill = nlohmann::json::array();
    for (int32_t il = 0; il < pyr_engine_n_layers(engine); ++il) {
        layers.push_back({{"tokens", pyr_session_layer_tokens(session, il)},
                          {"bytes", pyr_session_layer_bytes(session, il)},
                          {"positions", layer_positions(session, il, PYR_KV_NOW)}});
        std::vector<int32_t> pos = layer_positions(session, il, PYR_KV_AFTER_PREFILL);
        prefill.push_back({{"tokens", pos.size()}, {"positions", pos}});
    }
    return {{"kv_bytes", pyr_session_kv_bytes(session)},
            {"kv_bytes_full", pyr_session_kv_bytes_full(session)},
            {"mean_retention", pyr_examples::kv_retention_now(session)},
            {"kv", pyr_examples::kv_json(session, policy)},
            {"layers", layers},
            {"prefill_layers", prefill}};
}

// "rho 0.62, gamma 1, ..., prefill_shrink on, ..." for the picture's subtitle, in the
// order of pyr_session_kv_param's documentation.
std::string params_line(const pyr_session* session) {
    std::string line;
    for (const char* name : pyr_examples::kKvParamNames) {
        double v = pyr_session_kv_param(session, name);
        if (std::isnan(v)) continue;
        char value[32];
        std::snprintf(value, sizeof value, "%.4g", v);
        line += (line.empty() ? "" : ", ") + std::string(name) + " " +
                (std::string(name) == "prefill_shrink" ? (v != 0 ? "on" : "off") : value);
    }
    return line;
}

void write_kv_map(const Options& opt, const pyr_engine* engine, const pyr_session* session,
                  int32_t prompt_tokens) {
    KvMap map;
    map.policy = opt.kv.policy;
    map.params = params_line(session);
    map.prompt_len = prompt_tokens;
    for (int32_t il = 0; il < pyr_engine_n_layers(engine); ++il)
        map.positions.push_back(layer_positions(session, il, PYR_KV_AFTER_PREFILL));
    std::ofstream f(opt.kv_map, std::ios::binary);
    f << render_kv_map_svg(map);
    if (!f.flush()) {
        std::fprintf(stderr, "pyramid-cli: cannot write '%s': %s\n", opt.kv_map.c_str(),
                     std::strerror(errno));
        std::exit(1);
    }
}

// While a prefill runs longer than half a second, shows "[prefill N/M tokens]" on a terminal's
// standard error (the session publishes its progress chunk by chunk); erased at the end.
class PrefillProgress {
public:
    PrefillProgress(const pyr_session* session, int32_t total, bool enabled) {
        if (!enabled || !isatty(fileno(stderr))) return;
        thread_ = std::thread([this, session, total] {
            auto start = std::chrono::steady_clock::now();
            int32_t shown = -1;
            while (!done_.load()) {
                std::this_thread::sleep_for(std::chrono::milliseconds(100));
                const int32_t done = pyr_session_n_processed(session);
                if (done_.load() || done == shown ||
                    std::chrono::steady_clock::now() - start < std::chrono::milliseconds(500))
                    continue;
                std::fprintf(stderr, "\r[prefill %d/%d tokens]", done, total);
                shown_ = true;
                shown = done;
            }
        });
    }
    ~PrefillProgress() {
        if (!thread_.joinable()) return;
        done_.store(true);
        thread_.join();
        if (shown_) std::fputs("\r\033[K", stderr);
    }

private:
    std::atomic<bool> done_{false};
    bool shown_ = false;  // written by the thread, read after join
    std::thread thread_;
};

}  // namespace

int main(int argc, char** argv) {
    Options opt = parse_args(argc, argv);

    pyr_engine* engine = nullptr;
    pyr_status st = pyr_engine_open(opt.model.c_str(), &opt.engine, &engine);
    if (st != PYR_OK) die("cannot open model '" + opt.model + "'", pyr_engine_errmsg(engine), st);
    pyr_session* session = nullptr;
    opt.kv.apply(&opt.session);  // here: session.kv_policy points into opt.kv
    st = pyr_session_create(engine, &opt.session, &session);
    if (st != PYR_OK) die("cannot create a session", pyr_engine_errmsg(engine), st);
    g_session = session;
    std::signal(SIGINT, on_sigint);

    st = opt.use_prompt_tokens
             ? pyr_session_feed_tokens(session, opt.prompt_tokens.data(),
                                       int32_t(opt.prompt_tokens.size()))
             : pyr_session_feed_text(session, opt.prompt.c_str());
    if (st != PYR_OK) die("cannot feed the prompt", pyr_session_errmsg(session), st);
    int32_t prompt_tokens = pyr_session_n_tokens(session);

    if (!opt.json && !opt.use_prompt_tokens) std::fputs(opt.prompt.c_str(), stdout);
    std::fflush(stdout);
    auto t0 = std::chrono::steady_clock::now();
    {
        PrefillProgress progress(session, prompt_tokens, !opt.json);
        st = pyr_session_prefill(session);
    }
    double prefill_ms = ms_since(t0);

    nlohmann::json tokens = nlohmann::json::array(), steps = nlohmann::json::array();
    std::string text;
    int32_t n_vocab = pyr_engine_n_vocab(engine);
    auto t1 = std::chrono::steady_clock::now();
    while (st == PYR_OK && (st = pyr_session_next(session)) != PYR_CANCELLED && st >= 0) {
        int32_t id = pyr_session_token(session);
        if (id >= 0) {
            tokens.push_back(id);
            if (opt.json) steps.push_back(step_record(pyr_session_logits(session), n_vocab, id));
        }
        text += pyr_session_text(session);
        if (!opt.json) {
            std::fputs(pyr_session_text(session), stdout);
            std::fflush(stdout);
        }
        if (st == PYR_DONE) break;
    }
    double decode_ms = ms_since(t1);
    if (st < 0) die("generation failed", pyr_session_errmsg(session), st);
    double tok_per_s = decode_ms > 0 ? 1000.0 * double(tokens.size()) / decode_ms : 0.0;
    if (!opt.kv_map.empty()) write_kv_map(opt, engine, session, prompt_tokens);

    if (opt.json) {
        nlohmann::json out = {{"tokens", tokens},
                              {"text", text},
                              {"prompt_tokens", prompt_tokens},
                              {"steps", steps},
                              {"prefill_ms", prefill_ms},
                              {"decode_tokens_per_s", tok_per_s},
                              {"device", pyr_engine_device(engine)},
                              {"cancelled", st == PYR_CANCELLED}};
        out.update(memory_json(engine, session, opt.kv.policy));
        std::puts(out.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace).c_str());
    } else {
        std::fputs("\n", stdout);
        std::fflush(stdout);  // the text ends its line before the summary (stderr) begins
        std::fprintf(stderr, "[%d prompt tokens, prefill %.1f ms; %zu generated, %.1f tokens/s; KV %.2f MiB, "
                     "retention %.3f (%s)%s]\n",
                     prompt_tokens, prefill_ms, tokens.size(), tok_per_s,
                     double(pyr_session_kv_bytes(session)) / (1024.0 * 1024.0),
                     pyr_examples::kv_retention_now(session), opt.kv.policy.c_str(),
                     st == PYR_CANCELLED ? "; cancelled" : "");
    }
    g_session = nullptr;
    pyr_session_destroy(session);
    pyr_engine_close(engine);
    return st == PYR_CANCELLED ? 130 : 0;
}
