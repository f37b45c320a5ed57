// pyramid-bench's command line: the usage text, the flags' checks, the KV flags' params.
#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>

#include "bench.h"
#include "pyramid.h"

namespace bench {

namespace {

const char* const kUsage =
    "usage: pyramid-bench [options]\n"
    "Runs B sequences together: one batched prefill of B prompts of P random tokens, then G\n"
    "greedy decode steps (one token per sequence per step, one batched forward per step).\n"
    "\n"
    "  --shape NAME         random weights of a model shape: llama2-7b (default), llama2-13b,\n"
    "                       llama3-8b (grouped-query attention, 8 KV heads), tiny (512 wide,\n"
    "                       8 layers: for smoke tests)\n"
    "  --model DIR          an HF LLaMA checkpoint instead of random weights\n"
    "  --device D           auto (default: cuda:0 if there is a GPU, else cpu) | cpu | cuda[:N]\n"
    "  --dtype T            f16 (default) | bf16: the random weights' type\n"
    "  --batch B|max        sequences decoded together (default 1); max: the most that fit\n"
    "                       the memory limit (see 'batch max' below)\n"
    "  --prompt P           prompt tokens per sequence (default 512)\n"
    "  --prefill-batch N    prefill N sequences per forward (default: all B in one), as an\n"
    "                       engine chunks long prefills: bounds the scratch a large B takes\n"
    "  --gen G              decode steps, one token per sequence each (default 256)\n"
    "  --seed S             seed of the random weights and prompt tokens (default 42)\n"
    "  --warmup N           untimed runs first, the same shape with G = min(G, 4) (default 1):\n"
    "                       loads kernels and cuBLAS, sizes the scratch buffers\n"
    "  --repeat N           timed runs; the medians are reported (default 1)\n"
    "  --threads N          CPU threads (default 0 = all): the CPU backend's, and those that\n"
    "                       run the sequences' after_step (as sessions do, each on its thread)\n"
    "  --max-device-bytes N GPU memory budget, bytes, or with a K/M/G/T suffix (binary);\n"
    "                       default 0 = the whole device. On the CPU: the KV caches' budget\n"
    "                       (default none)\n"
    "  --bandwidth-gbs X    measured device copy bandwidth in GB/s (1e9 bytes/s): reports the\n"
    "                       fraction of it that decode achieves under the bandwidth model\n"
    "  --json               one JSON object on stdout instead of the table\n"
    "  --help\n"
    "\n"
    "What is measured (wall clock, std::chrono::steady_clock):\n"
    "  prefill_ms           the whole prefill step of all B sequences: begin_step, ONE\n"
    "                       batched forward (synchronous: it returns the next tokens), after_step\n"
    "                       (with --prefill-batch N: one such step per N sequences)\n"
    "  prefill_tokens_per_s B * P / prefill time\n"
    "  decode_ms            the G decode steps: begin_step, batched forward, after_step\n"
    "                       (generation-phase compression happens there); the greedy next\n"
    "                       token is picked on the device where the backend samples there\n"
    "                       (only its id comes back, as in a session; \"sampling\": \"device\")\n"
    "                       else by the host from the logits (PYRAMID_GPU_SAMPLING=0)\n"
    "  decode_tokens_per_s  B * G / decode time;  decode_ms_per_step = decode time / G\n"
    "  total_tokens_per_s   B * (P + G) / (prefill time + decode time)\n"
    "  *_forward_ms         the backend's forward calls alone, within those\n"
    "  selection overhead   wall time inside the policies' on_layer and after_step (the\n"
    "                       sequences' after_step at once on the --threads), and its\n"
    "                       fraction of the phase time: the keep/drop decisions, plus the\n"
    "                       cache compactions after_step triggers (KvCache::retain moves the\n"
    "                       bytes on the device); the attention measurements the policies\n"
    "                       use run inside the forward and are not counted here\n"
    "  kv bytes             KvCache::bytes() summed over the B sequences, after prefill and\n"
    "                       at the end; retention = bytes / bytes_full (uncompressed)\n"
    "  bytes_per_step       decode bandwidth model: weight bytes (read once per step for the\n"
    "                       whole batch) + the KV bytes the step's attention reads (summed\n"
    "                       over the sequences, averaged over the steps); achieved_gbs =\n"
    "                       bytes_per_step / decode_ms_per_step\n"
    "  decode_steps         how the CUDA backend ran the decode steps (last run): replayed\n"
    "                       from a CUDA graph, captured into one, or launched kernel by kernel\n"
    "                       (PYRAMID_CUDA_GRAPHS=0 launches every step)\n"
    "  prefill_attention_launches  the CUDA backend's prefill attention launches (last run)\n"
    "                       on tensor cores and on CUDA cores (PYRAMID_TENSOR_CORE_ATTENTION=0:\n"
    "                       all on CUDA cores)\n"
    "\n"
    "batch max (the paper's measure: a smaller cache lets more sequences share the weights):\n"
    "  a run of one sequence (P and G as given) measures the KV memory a sequence holds at\n"
    "  most and the scratch for one, a prefill of two the scratch each more adds; the estimate\n"
    "  is how many sequences the limit (--max-device-bytes, else the device's memory) leaves\n"
    "  room for beside the weights. Whole runs at that batch are tried, 1/16 fewer sequences\n"
    "  after each out-of-memory, until one fits; these runs are the warm-up. JSON\n"
    "  batch_search has the measures and the tries. On the CPU only the KV caches count, so\n"
    "  it needs --max-device-bytes there.\n"
    "\n"
    "KV cache policy (one policy per sequence):\n";

// A whole-string integer in [lo, hi]; anything else is a usage error naming the flag.
int64_t parse_int(const std::string& flag, const std::string& v, int64_t lo, int64_t hi) {
    char* end = nullptr;
    errno = 0;
    long long x = std::strtoll(v.c_str(), &end, 10);
    if (v.empty() || *end != '\0' || errno != 0 || x < lo || x > hi)
        usage_error(flag + " expects an integer in [" + std::to_string(lo) + ", " +
                    std::to_string(hi) + "], got '" + v + "'");
    return int64_t(x);
}

uint64_t parse_u64(const std::string& flag, const std::string& v) {
    char* end = nullptr;
    errno = 0;
    unsigned long long x = std::strtoull(v.c_str(), &end, 10);
    if (v.empty() || v[0] == '-' || *end != '\0' || errno != 0)
        usage_error(flag + " expects a non-negative integer, got '" + v + "'");
    return uint64_t(x);
}

// "40G", "512M", "1073741824": binary suffixes, as budgets are usually thought of in GiB.
uint64_t parse_bytes(const std::string& flag, const std::string& v) {
    uint64_t n = 0;
    if (!pyr_examples::parse_byte_count(v, &n))
        usage_error(flag + " expects a byte count (digits, optionally K/M/G/T), got '" + v + "'");
    return n;
}

double parse_positive(const std::string& flag, const std::string& v) {
    double d = 0;
    if (!pyr_examples::kv_parse_double(v, &d) || !(d > 0))
        usage_error(flag + " expects a number > 0, got '" + v + "'");
    return d;
}

// Checks --device and returns it with "auto" and "cuda" resolved: "cpu" or "cuda:N".
std::string resolve_device(const std::string& d) {
    if (d == "auto") return pyr::cuda_device_count() > 0 ? "cuda:0" : "cpu";
    if (d == "cpu") return d;
    if (d == "cuda") return "cuda:0";
    const std::string n = d.rfind("cuda:", 0) == 0 ? d.substr(5) : "";
    if (!n.empty() && n.size() <= 4 && std::all_of(n.begin(), n.end(), [](char ch) { return ch >= '0' && ch <= '9'; }))
        return "cuda:" + std::to_string(std::stoi(n));
    usage_error("--device expects auto, cpu, cuda or cuda:N, got '" + d + "'");
}

bool takes_value(const std::string& flag) {
    static const char* const flags[] = {
        "--shape",   "--model",  "--device", "--dtype",   "--batch",            "--prompt",
        "--gen",     "--warmup", "--repeat", "--threads", "--seed",             "--max-device-bytes",
        "--bandwidth-gbs", "--prefill-batch"};
    for (const char* f : flags)
        if (flag == f) return true;
    return pyr_examples::kv_flag_takes_value(flag);
}

}  // namespace

void usage_error(const std::string& msg) {
    std::fprintf(stderr, "pyramid-bench: %s (see --help)\n", msg.c_str());
    std::exit(2);
}

Options parse_args(int argc, char** argv) {
    Options o;
    bool shape_given = false;
    const int32_t kMaxTokens = 1 << 20;
    for (int i = 1; i < argc; ++i) {
        const std::string a = argv[i];
        if (a == "--help" || a == "-h") {
            std::printf("%s%s", kUsage, pyr_examples::kKvUsage);
            std::exit(0);
        }
        if (a == "--json") {
            o.json = true;
            continue;
        }
        if (!takes_value(a))
            usage_error(a.rfind("-", 0) == 0 ? "unknown option '" + a + "'"
                                             : "unexpected argument '" + a + "'");
        if (i + 1 >= argc) usage_error(a + " needs a value");
        const std::string v = argv[i + 1];
        if (pyr_examples::kv_flag_takes_value(a)) {
            const std::string err = o.kv.set(a, v);
            if (!err.empty()) usage_error(err);
        } else if (a == "--shape") {
            if (v != "llama2-7b" && v != "llama2-13b" && v != "llama3-8b" && v != "tiny")
                usage_error("--shape expects llama2-7b, llama2-13b, llama3-8b or tiny, got '" + v + "'");
            o.shape = v;
            shape_given = true;
        } else if (a == "--model") {
            o.model = v;
        } else if (a == "--device") {
            o.device = v;
        } else if (a == "--dtype") {
            if (v != "f16" && v != "bf16") usage_error("--dtype expects f16 or bf16, got '" + v + "'");
            o.dtype = v;
            o.dtype_given = true;
        } else if (a == "--batch") {
            o.batch_max = v == "max";
            if (!o.batch_max) o.batch = int32_t(parse_int(a, v, 1, kMaxBatch));
        } else if (a == "--prefill-batch") {
            o.prefill_batch = int32_t(parse_int(a, v, 1, kMaxBatch));
        } else if (a == "--prompt") {
            o.prompt = int32_t(parse_int(a, v, 1, kMaxTokens));
        } else if (a == "--gen") {
            o.gen = int32_t(parse_int(a, v, 0, kMaxTokens));
        } else if (a == "--warmup") {
            o.warmup = int32_t(parse_int(a, v, 0, 100));
        } else if (a == "--repeat") {
            o.repeat = int32_t(parse_int(a, v, 1, 1000));
        } else if (a == "--threads") {
            o.threads = int32_t(parse_int(a, v, 0, 4096));
        } else if (a == "--seed") {
            o.seed = parse_u64(a, v);
        } else if (a == "--max-device-bytes") {
            o.max_device_bytes = parse_bytes(a, v);
        } else if (a == "--bandwidth-gbs") {
            o.bandwidth_gbs = parse_positive(a, v);
        } else {
            usage_error("unknown option '" + a + "'");
        }
        ++i;
    }
    if (shape_given && !o.model.empty()) usage_error("--shape and --model exclude each other");
    o.device = resolve_device(o.device);
    if (o.batch_max && o.device == "cpu" && o.max_device_bytes == 0)
        usage_error("--batch max on the CPU needs --max-device-bytes (the KV caches' budget: "
                    "nothing else counts there)");
    return o;
}

// The pyr::KvParams the flags describe (KvFlags holds them as the C API's kv_* fields).
pyr::KvParams kv_params(const pyr_examples::KvFlags& f) {
    pyr::KvParams p;
    p.policy = f.policy;
    p.retention = f.defaults.kv_retention;
    p.rho = f.defaults.kv_rho;
    p.gamma = f.defaults.kv_gamma;
    p.recent_ratio = f.defaults.kv_recent_ratio;
    p.min_context = f.defaults.kv_min_context;
    p.sinks = f.defaults.kv_sinks;
    p.gen_e = f.defaults.kv_gen_e;
    p.prefill_shrink = f.defaults.kv_prefill_shrink;
    p.shrink_start = f.defaults.kv_shrink_start;
    p.obs_window = f.defaults.kv_obs_window;
    p.pool = f.defaults.kv_pool;
    return p;
}

}  // namespace bench
