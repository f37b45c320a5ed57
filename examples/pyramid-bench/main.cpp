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
#include <algorithm>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <exception>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "backend/backend.h"
#include "backend/cpu/cpu_backend.h"
#include "common/error.h"
#include "common/thread_pool.h"
#include "kv/kv_cache.h"
#include "kv/kv_params.h"
#include "kv/kv_policy.h"
#include "kv_flags.h"
#include "model/model.h"
#include "pyramid.h"

// Decode steps are marked as NVTX ranges named "decode", so that a profiler can take them
// alone (tools/gpu_check.sh profile: ncu --nvtx --nvtx-include "decode/"). Header-only.
#if __has_include(<nvtx3/nvToolsExt.h>)
#include <nvtx3/nvToolsExt.h>
#define PYR_RANGE_PUSH(name) nvtxRangePushA(name)
#define PYR_RANGE_POP() nvtxRangePop()
#else
#define PYR_RANGE_PUSH(name) ((void)0)
#define PYR_RANGE_POP() ((void)0)
#endif

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
    return std::chrono::duration<double>(Clock::now() - t0).count();
}

// ---- options --------------------------------------------------------------------------

struct Options {
    std::string shape = "llama2-7b";
    std::string model;            // --model DIR: a checkpoint instead of random weights
    std::string device = "auto";
    std::string dtype = "f16";
    bool dtype_given = false;
    int32_t batch = 1, prompt = 512, gen = 256;
    bool batch_max = false;       // --batch max: the largest batch that fits (find_max_batch)
    int32_t prefill_batch = 0;    // sequences per prefill forward, 0 = all
    int32_t warmup = 1, repeat = 1, threads = 0;
    uint64_t seed = 42;
    uint64_t max_device_bytes = 0;
    double bandwidth_gbs = 0;     // --bandwidth-gbs: measured copy bandwidth, 0 = not given
    bool json = false;
    pyr_examples::KvFlags kv;
};

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

[[noreturn]] void usage_error(const std::string& msg) {
    std::fprintf(stderr, "pyramid-bench: %s (see --help)\n", msg.c_str());
    std::exit(2);
}

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

constexpr int32_t kMaxBatch = 4096;

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

// ---- model shapes and random host weights ---------------------------------------------

pyr::ModelConfig shape_config(const std::string& shape) {
    pyr::ModelConfig c;
    c.n_vocab = 32000;
    c.n_ctx_train = 4096;
    c.rms_norm_eps = 1e-5f;
    c.rope_theta = 10000.0f;
    c.head_dim = 128;
    if (shape == "llama2-7b") {
        c.n_embd = 4096, c.n_ff = 11008, c.n_layer = 32, c.n_head = 32, c.n_head_kv = 32;
    } else if (shape == "llama2-13b") {
        c.n_embd = 5120, c.n_ff = 13824, c.n_layer = 40, c.n_head = 40, c.n_head_kv = 40;
    } else if (shape == "llama3-8b") {  // 4 query heads a KV head; a 128256-token vocabulary
        c.n_embd = 4096, c.n_ff = 14336, c.n_layer = 32, c.n_head = 32, c.n_head_kv = 8;
        c.n_vocab = 128256;
        c.n_ctx_train = 8192;
        c.rope_theta = 500000.0f;
    } else {  // tiny: grouped-query attention, so that path is exercised too
        c.n_embd = 512, c.n_ff = 1376, c.n_layer = 8, c.n_head = 8, c.n_head_kv = 4;
        c.head_dim = 64;
    }
    c.dtype = pyr::DType::F16;
    return c;
}

uint64_t splitmix64(uint64_t x) {
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

// float -> IEEE half, round to nearest even. Magnitudes below the smallest normal half
// (6.1e-5) become 0: harmless for random weights, and it keeps this short.
uint16_t f32_to_f16(float f) {
    uint32_t x;
    std::memcpy(&x, &f, 4);
    const uint32_t sign = (x >> 16) & 0x8000u;
    const int32_t exp = int32_t((x >> 23) & 0xff) - 127 + 15;
    const uint32_t mant = x & 0x7fffffu;
    if (exp <= 0) return uint16_t(sign);
    if (exp >= 31) return uint16_t(sign | 0x7c00u);
    uint32_t h = sign | (uint32_t(exp) << 10) | (mant >> 13);
    const uint32_t rest = mant & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;  // a carry rounds into the exponent
    return uint16_t(h);
}

uint16_t f32_to_bf16(float f) {
    uint32_t x;
    std::memcpy(&x, &f, 4);
    return uint16_t((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

// Random weights in host memory for the CPU backend (the CUDA backend makes its own on the
// device). Same distribution as CudaBackend::randomize: uniform, scaled by 1/sqrt(fan-in)
// so that activations stay O(1), norms near 1 -- so the CPU runs the same kind of numbers.
struct HostWeights {
    std::deque<std::vector<uint16_t>> buffers;  // a deque: adding one never moves the others
    pyr::ModelWeights weights;
    uint64_t bytes = 0;
};

std::shared_ptr<HostWeights> make_host_weights(const pyr::ModelConfig& c, bool bf16, uint64_t seed) {
    auto hw = std::make_shared<HostWeights>();
    const pyr::DType dt = bf16 ? pyr::DType::BF16 : pyr::DType::F16;
    uint64_t stream = 0;
    auto make = [&](int64_t rows, int64_t cols, float scale, float offset) {
        std::vector<uint16_t>& buf = hw->buffers.emplace_back(size_t(rows * cols));
        const uint64_t s = seed + 1000003ull * ++stream;
        for (size_t i = 0; i < buf.size(); ++i) {
            const uint64_t r = splitmix64(s ^ splitmix64(uint64_t(i)));
            const float u = float(r >> 40) * (2.0f / 16777216.0f) - 1.0f;  // 24 bits -> [-1, 1)
            const float w = offset + scale * u;
            buf[i] = bf16 ? f32_to_bf16(w) : f32_to_f16(w);
        }
        hw->bytes += buf.size() * 2;
        return pyr::Tensor{dt, rows, cols, buf.data()};
    };
    auto matrix = [&](int64_t rows, int64_t cols) {
        return make(rows, cols, 1.0f / std::sqrt(float(cols)), 0.0f);
    };
    auto norm = [&](int64_t n) { return make(n, 1, 0.1f, 1.0f); };
    const int64_t q_dim = int64_t(c.n_head) * c.head_dim, kv_dim = int64_t(c.n_head_kv) * c.head_dim;
    pyr::ModelWeights& w = hw->weights;
    w.tok_embd = make(c.n_vocab, c.n_embd, 1.0f, 0.0f);
    w.output_norm = norm(c.n_embd);
    w.output = matrix(c.n_vocab, c.n_embd);
    for (int il = 0; il < c.n_layer; ++il) {
        pyr::LayerWeights L;
        L.attn_norm = norm(c.n_embd);
        L.wq = matrix(q_dim, c.n_embd);
        L.wk = matrix(kv_dim, c.n_embd);
        L.wv = matrix(kv_dim, c.n_embd);
        L.wo = matrix(c.n_embd, q_dim);
        L.ffn_norm = norm(c.n_embd);
        L.w_gate = matrix(c.n_ff, c.n_embd);
        L.w_up = matrix(c.n_ff, c.n_embd);
        L.w_down = matrix(c.n_embd, c.n_ff);
        w.layers.push_back(L);
    }
    return hw;
}

// ---- the backend under test -----------------------------------------------------------

struct Target {
    pyr::ModelConfig config;
    std::string shape;              // the --shape name or the checkpoint directory
    std::string dtype;              // of the weights the backend computes with
    std::shared_ptr<const pyr::Model> model;  // with --model
    std::unique_ptr<pyr::Backend> backend;
    uint64_t host_weight_bytes = 0;  // the weights' size where the backend is the CPU
    std::unique_ptr<pyr::ThreadPool> host;  // --threads: the sequences' after_step
};

int cuda_index(const std::string& device) {
    return device == "cpu" ? -1 : std::atoi(device.c_str() + 5);
}

// Fails before any weights are made when the device is not there.
void check_device(const std::string& device) {
    const int idx = cuda_index(device), n = pyr::cuda_device_count();
    if (idx >= n)
        pyr::fail(PYR_ERR_UNSUPPORTED,
                  "device '" + device + "': " +
                      (n > 0 ? "this machine has " + std::to_string(n) + " CUDA device(s)"
                             : std::string("no CUDA device (no GPU, no driver, or a build "
                                           "without CUDA)")) +
                      "; use --device cpu");
}

std::string lower(std::string s) {
    for (char& ch : s) ch = char(std::tolower(static_cast<unsigned char>(ch)));
    return s;
}

// The model's config (and the checkpoint with --model), before any weights are made, so
// that the flags can be checked against it cheaply.
Target describe_target(const Options& o) {
    Target t;
    if (o.model.empty()) {
        t.config = shape_config(o.shape);
        t.shape = o.shape;
        t.dtype = o.dtype;
    } else {
        std::fprintf(stderr, "pyramid-bench: loading %s...\n", o.model.c_str());
        t.model = pyr::Model::load(o.model);
        t.config = t.model->config();
        t.shape = o.model;
        const pyr::DType dt = t.model->weights().tok_embd.dtype;
        // The CUDA backend keeps F16 and BF16 as they are and narrows F32 to F16.
        t.dtype = o.device != "cpu" && dt == pyr::DType::F32 ? "f16" : lower(pyr::dtype_name(dt));
        t.host_weight_bytes = t.model->weights_bytes();
    }
    return t;
}

void open_backend(const Options& o, Target& t) {
    const bool bf16 = o.dtype == "bf16";
    if (o.device == "cpu") {
        if (t.model) {
            t.backend = pyr::make_cpu_backend(t.model, o.threads, o.max_device_bytes);
            return;
        }
        std::fprintf(stderr, "pyramid-bench: making random %s weights (%s) on the host...\n",
                     t.shape.c_str(), o.dtype.c_str());
        std::shared_ptr<HostWeights> hw = make_host_weights(t.config, bf16, o.seed);
        t.host_weight_bytes = hw->bytes;
        const pyr::ModelWeights& w = hw->weights;
        // The backend holds views into hw; passing it as the owner keeps it alive as long.
        t.backend = std::make_unique<pyr::CpuBackend>(t.config, w, o.threads, std::move(hw),
                                                      o.max_device_bytes);
        return;
    }
    if (t.model) {
        std::fprintf(stderr, "pyramid-bench: uploading weights to %s...\n", o.device.c_str());
        t.backend = pyr::make_cuda_backend(t.model, cuda_index(o.device), o.max_device_bytes);
    } else {
        std::fprintf(stderr, "pyramid-bench: making random %s weights (%s) on %s...\n",
                     t.shape.c_str(), o.dtype.c_str(), o.device.c_str());
        t.backend = pyr::make_cuda_backend_random(t.config, bf16, o.seed, cuda_index(o.device),
                                                  o.max_device_bytes);
    }
}

// ---- the timed policy -----------------------------------------------------------------

// Forwards every call to the real policy and adds up the wall time spent in on_layer: the
// host-side keep/drop decisions inside the forward (between layers in a first prefill, at
// its end later on the CUDA backend), which run one after another. after_step, between
// steps, runs for all sequences at once on the host threads (after_steps) and is clocked
// there.
class TimedPolicy final : public pyr::KvPolicy {
public:
    explicit TimedPolicy(std::unique_ptr<pyr::KvPolicy> inner) : inner_(std::move(inner)) {}

    const char* name() const override { return inner_->name(); }
    void begin_step(int32_t n_tokens, bool first_prefill) override {
        inner_->begin_step(n_tokens, first_prefill);
    }
    pyr::ObservationRequest observe(int il) const override { return inner_->observe(il); }
    std::optional<std::vector<int32_t>> on_layer(int il, const pyr::Observation& obs,
                                                 const pyr::KvCache& cache) override {
        const Clock::time_point t0 = Clock::now();
        auto keep = inner_->on_layer(il, obs, cache);
        seconds_ += seconds_since(t0);
        return keep;
    }
    bool shrink_prefill(int il) const override { return inner_->shrink_prefill(il); }
    void after_step(pyr::KvCache& cache) override { inner_->after_step(cache); }
    void abort_step() override { inner_->abort_step(); }
    double param(const std::string& name) const override { return inner_->param(name); }

    // The time accumulated since the last call.
    double take_seconds() {
        const double s = seconds_;
        seconds_ = 0;
        return s;
    }

private:
    std::unique_ptr<pyr::KvPolicy> inner_;
    double seconds_ = 0;
};

// ---- one run --------------------------------------------------------------------------

int32_t argmax(const std::vector<float>& v) {
    return int32_t(std::max_element(v.begin(), v.end()) - v.begin());
}

struct Sequence {
    std::unique_ptr<pyr::KvCache> cache;
    std::unique_ptr<TimedPolicy> policy;
    std::vector<int32_t> prompt;
    std::vector<float> logits;  // of the last token fed (when the host picks the next token)
    pyr::DeviceSample pick;     // greedy on the device, where the backend samples there
    int32_t next_token() const { return pick.token >= 0 ? pick.token : argmax(logits); }
    // The step's outputs: the token picked on the device (only its id comes back, as in a
    // Session), or the logits for the host's argmax.
    void wants_next(pyr::SequenceStep& step, bool on_device) {
        pick.token = -1;
        step.logits = on_device ? nullptr : logits.data();
        step.sample = on_device ? &pick : nullptr;
    }
};

struct KvBytes {
    uint64_t bytes = 0, full = 0;
    double retention() const { return full ? double(bytes) / double(full) : 1.0; }
};

struct RunResult {
    double prefill_s = 0, prefill_forward_s = 0, prefill_select_s = 0;
    double decode_s = 0, decode_forward_s = 0, decode_select_s = 0;
    std::vector<double> step_s;      // each decode step
    KvBytes kv_prefill, kv_end;      // summed over the sequences
    double mean_kv_read = 0;         // KV bytes the attention read per decode step
    uint64_t kv_held_max = 0;        // the most memory the caches held (DeviceMemory::kv),
                                     // seen after each forward
    pyr::DeviceMemory memory;        // with the run's caches still alive
    pyr::BackendStats steps;         // how the backend ran the run's decode steps
    nlohmann::json params;           // the first sequence's policy parameters as used
    // KV rows (a token's keys and values in a layer) the caches' retains moved, summed over
    // the sequences, and the bytes of one
    uint64_t rows_moved_prefill = 0, rows_moved_decode = 0, row_bytes = 0;
};

uint64_t rows_moved(const std::vector<Sequence>& seqs) {
    uint64_t n = 0;
    for (const Sequence& s : seqs) n += s.cache->storage().rows_moved();
    return n;
}

KvBytes kv_bytes(const std::vector<Sequence>& seqs) {
    KvBytes k;
    for (const Sequence& s : seqs) k.bytes += s.cache->bytes(), k.full += s.cache->bytes_full();
    return k;
}

std::vector<Sequence> new_sequences(pyr::Backend& backend, const pyr::ModelConfig& c,
                                    const pyr::KvParams& kv, int32_t batch, int32_t n_prompt,
                                    int32_t n_ctx, std::mt19937_64& rng) {
    // Ids 0..2 are usually <unk>, <s>, </s>: leave them out of the prompts.
    std::uniform_int_distribution<int32_t> token(3, c.n_vocab - 1);
    std::vector<Sequence> seqs(static_cast<size_t>(batch));
    for (Sequence& s : seqs) {
        s.cache = std::make_unique<pyr::KvCache>(c.n_layer, backend.new_kv_storage(n_ctx));
        s.policy = std::make_unique<TimedPolicy>(pyr::make_kv_policy(kv, c.n_layer));
        s.prompt.resize(size_t(n_prompt));
        for (int32_t& t : s.prompt) t = token(rng);
        s.logits.assign(size_t(c.n_vocab), 0.0f);
    }
    return seqs;
}

double take_selection_seconds(std::vector<Sequence>& seqs) {
    double s = 0;
    for (Sequence& q : seqs) s += q.policy->take_seconds();
    return s;
}

// Sequences [first, end) have processed n tokens: their after_step, spread over the host
// threads as the engine's sessions run theirs, each on its own thread (the caches' storage
// is safe for that). Returns the wall time it took; the first error is rethrown.
double after_steps(pyr::ThreadPool& host, std::vector<Sequence>& seqs, size_t first, size_t end,
                   int32_t n) {
    const Clock::time_point t0 = Clock::now();
    std::mutex mutex;
    std::exception_ptr error;
    host.parallel_for(int64_t(end - first), [&](int64_t b, int64_t e) {
        try {
            for (int64_t i = b; i < e; ++i) {
                Sequence& s = seqs[first + size_t(i)];
                s.cache->set_n_processed(n);
                s.policy->after_step(*s.cache);
            }
        } catch (...) {
            std::lock_guard<std::mutex> lock(mutex);
            if (!error) error = std::current_exception();
        }
    });
    if (error) std::rethrow_exception(error);
    return seconds_since(t0);
}

// The first prefill of every sequence, as Session::prefill does it for one: in one batched
// forward, or `group` sequences per forward (0: all).
void run_prefill(pyr::Backend& backend, pyr::ThreadPool& host, std::vector<Sequence>& seqs,
                 int32_t n_prompt, int32_t group, RunResult& r) {
    std::vector<int32_t> positions(static_cast<size_t>(n_prompt));
    for (int32_t i = 0; i < n_prompt; ++i) positions[size_t(i)] = i;
    std::vector<pyr::SequenceStep> steps(seqs.size());
    for (size_t i = 0; i < seqs.size(); ++i) {
        Sequence& s = seqs[i];
        steps[i] = {s.prompt.data(), positions.data(), n_prompt, s.cache.get(), s.policy.get()};
        s.wants_next(steps[i], backend.samples_on_device());
    }
    const size_t per_forward = group > 0 ? size_t(group) : seqs.size();
    const Clock::time_point t0 = Clock::now();
    double after_s = 0;
    for (size_t first = 0; first < seqs.size(); first += per_forward) {
        const size_t end = std::min(seqs.size(), first + per_forward);
        for (size_t i = first; i < end; ++i) seqs[i].policy->begin_step(n_prompt, true);
        const Clock::time_point tf = Clock::now();
        backend.forward(steps.data() + first, int(end - first));
        r.prefill_forward_s += seconds_since(tf);
        r.kv_held_max = std::max(r.kv_held_max, backend.device_memory().kv);
        after_s += after_steps(host, seqs, first, end, n_prompt);
    }
    r.prefill_s = seconds_since(t0);
    r.prefill_select_s = take_selection_seconds(seqs) + after_s;
    r.kv_prefill = kv_bytes(seqs);
}

// n_gen greedy steps, all sequences in one batched forward per step.
void run_decode(pyr::Backend& backend, pyr::ThreadPool& host, std::vector<Sequence>& seqs,
                int32_t n_prompt, int32_t n_gen, RunResult& r) {
    const size_t n = seqs.size();
    std::vector<int32_t> tokens(n), positions(n);
    std::vector<pyr::SequenceStep> steps(n);
    double kv_read = 0, after_s = 0;
    const Clock::time_point t0 = Clock::now();
    for (int32_t g = 0; g < n_gen; ++g) {
        const Clock::time_point ts = Clock::now();
        for (size_t i = 0; i < n; ++i) {
            Sequence& s = seqs[i];
            tokens[i] = s.next_token();
            positions[i] = n_prompt + g;
            steps[i] = {&tokens[i], &positions[i], 1, s.cache.get(), s.policy.get()};
            s.wants_next(steps[i], backend.samples_on_device());
            s.policy->begin_step(1, false);
        }
        const Clock::time_point tf = Clock::now();
        PYR_RANGE_PUSH("decode");
        backend.forward(steps.data(), int(n));
        PYR_RANGE_POP();
        r.decode_forward_s += seconds_since(tf);
        // Before after_step compresses: the cache as this step's attention read it.
        kv_read += double(kv_bytes(seqs).bytes);
        r.kv_held_max = std::max(r.kv_held_max, backend.device_memory().kv);
        after_s += after_steps(host, seqs, 0, n, n_prompt + g + 1);
        r.step_s.push_back(seconds_since(ts));
    }
    r.decode_s = seconds_since(t0);
    r.decode_select_s = take_selection_seconds(seqs) + after_s;
    r.mean_kv_read = n_gen > 0 ? kv_read / n_gen : 0.0;
    r.kv_end = kv_bytes(seqs);
}

// A knob for JSON: integral values as integers, the others to 7 significant digits (the
// knobs are floats: 0.2f written as a double would read 0.20000000298023224).
nlohmann::json tidy(double v) {
    if (!std::isfinite(v)) return nullptr;
    if (v == std::floor(v) && std::fabs(v) < 1e15) return int64_t(v);
    char buf[32];
    std::snprintf(buf, sizeof buf, "%.7g", v);
    return std::strtod(buf, nullptr);
}

// The policy's parameters as it used them (what pyr_session_kv_param reports).
nlohmann::json policy_params(const pyr::KvPolicy& p) {
    nlohmann::json j = nlohmann::json::object();
    for (const char* name : pyr_examples::kKvParamNames) {
        const double v = p.param(name);
        if (!std::isnan(v)) j[name] = tidy(v);
    }
    return j;
}

RunResult run_once(Target& t, const pyr::KvParams& kv, int32_t batch, int32_t n_prompt,
                   int32_t prefill_batch, int32_t n_gen, std::mt19937_64& rng) {
    std::vector<Sequence> seqs =
        new_sequences(*t.backend, t.config, kv, batch, n_prompt, n_prompt + n_gen, rng);
    RunResult r;
    const pyr::BackendStats start = t.backend->stats();
    run_prefill(*t.backend, *t.host, seqs, n_prompt, prefill_batch, r);
    const pyr::BackendStats before = t.backend->stats();
    r.rows_moved_prefill = rows_moved(seqs);
    run_decode(*t.backend, *t.host, seqs, n_prompt, n_gen, r);
    const pyr::BackendStats after = t.backend->stats();
    r.rows_moved_decode = rows_moved(seqs) - r.rows_moved_prefill;
    r.row_bytes = seqs.front().cache->storage().bytes_per_token();
    r.steps = {after.graph_replays - before.graph_replays,
               after.graph_captures - before.graph_captures,
               after.direct_decode_steps - before.direct_decode_steps};
    r.steps.prefill_attention_tensor_cores =
        before.prefill_attention_tensor_cores - start.prefill_attention_tensor_cores;
    r.steps.prefill_attention_cuda_cores =
        before.prefill_attention_cuda_cores - start.prefill_attention_cuda_cores;
    r.memory = t.backend->device_memory();
    r.params = policy_params(*seqs.front().policy);
    return r;
}

// ---- batch max ------------------------------------------------------------------------

struct BatchSearch {
    uint64_t limit = 0, weights = 0;       // bytes
    uint64_t kv_per_sequence = 0;          // the most the caches of one sequence held
    uint64_t scratch = 0, scratch_per_sequence = 0;  // for one sequence; for each more
    int32_t estimate = 0;
    struct Try {
        int32_t batch;
        bool fits;
        std::string error;  // why it did not
    };
    std::vector<Try> tries;
};

// The largest batch whose whole run (prefill, then G steps) fits the backend's memory limit.
// A run of one sequence gives the most KV memory a sequence holds and the scratch (working
// buffers) for one; a prefill of two, the scratch each more sequence adds. Runs are tried at
// the batch that leaves room for, then 1/16 fewer after each out-of-memory, until one fits.
// The estimate is a little high where buffers grow in doublings or a compressing prefill
// holds a layer's whole prompt for a moment; low only where a compressing policy keeps a
// little less for other prompts than for the first. Returns the batch found.
int32_t find_max_batch(Target& t, const pyr::KvParams& kv, int32_t n_prompt,
                       int32_t prefill_batch, int32_t n_gen, std::mt19937_64& rng,
                       BatchSearch& search) {
    std::fprintf(stderr, "pyramid-bench: batch max: one sequence, then a prefill of two...\n");
    const RunResult one = run_once(t, kv, 1, n_prompt, 0, n_gen, rng);
    const RunResult two = run_once(t, kv, 2, n_prompt, 0, 0, rng);
    search.limit = one.memory.limit;
    search.weights = one.memory.weights;
    search.kv_per_sequence = std::max<uint64_t>(one.kv_held_max, 1);
    search.scratch = one.memory.scratch;
    search.scratch_per_sequence = two.memory.scratch > one.memory.scratch
                                      ? two.memory.scratch - one.memory.scratch : 0;
    if (search.limit == 0)
        pyr::fail(PYR_ERR_INVALID_ARGUMENT, "--batch max: the backend reports no memory limit");
    // weights + scratch + (B - 1) * scratch_per_sequence + B * kv_per_sequence <= limit, where
    // the scratch grows with the sequences prefilled together (prefill_batch: no further)
    const uint64_t first = search.weights + search.scratch + search.kv_per_sequence;
    const uint64_t room = search.limit > first ? search.limit - first : 0;
    uint64_t more = room / (search.kv_per_sequence + search.scratch_per_sequence);
    if (prefill_batch > 0 && more + 1 > uint64_t(prefill_batch)) {
        const uint64_t grown = uint64_t(prefill_batch - 1) * search.scratch_per_sequence;
        if (room > grown) more = (room - grown) / search.kv_per_sequence;
    }
    search.estimate = int32_t(std::min<uint64_t>(more + 1, kMaxBatch));
    for (int32_t b = search.estimate;;) {
        std::fprintf(stderr, "pyramid-bench: batch max: trying %d sequences (each %.2f MiB KV "
                             "and %.2f MiB scratch; limit %.1f MiB)...\n",
                     b, double(search.kv_per_sequence) / 1048576,
                     double(search.scratch_per_sequence) / 1048576, double(search.limit) / 1048576);
        try {
            run_once(t, kv, b, n_prompt, prefill_batch, n_gen, rng);
            search.tries.push_back({b, true, ""});
            return b;
        } catch (const pyr::Error& e) {
            if (e.status() != PYR_ERR_OUT_OF_MEMORY || b == 1) throw;
            search.tries.push_back({b, false, e.what()});
            b -= std::max(1, b / 16);
        }
    }
}

// ---- report ---------------------------------------------------------------------------

double median(std::vector<double> v) {
    if (v.empty()) return 0;
    std::sort(v.begin(), v.end());
    const size_t m = v.size() / 2;
    return v.size() % 2 ? v[m] : 0.5 * (v[m - 1] + v[m]);
}

double ratio(double a, double b) { return b > 0 ? a / b : NAN; }

// The numbers reported: every time is the median over the timed runs, each on its own
// (the decode rate is the median rate, as --repeat promises); the byte counts come from
// the last run (they differ between runs only through the random prompts).
struct Summary {
    double prefill_ms = 0, prefill_forward_ms = 0, prefill_select_ms = 0, prefill_tok_s = 0;
    double decode_ms = 0, decode_forward_ms = 0, decode_select_ms = 0, decode_tok_s = 0;
    double decode_ms_per_step = 0, total_tok_s = 0;
    double weight_bytes = 0, bytes_per_step = 0, achieved_gbs = 0;
};

template <class F>
double median_of(const std::vector<RunResult>& runs, F field) {
    std::vector<double> v;
    for (const RunResult& r : runs) v.push_back(field(r));
    return median(std::move(v));
}

Summary summarize(const Options& o, const Target& t, const std::vector<RunResult>& runs) {
    const double tokens_prefill = double(o.batch) * o.prompt, tokens_decode = double(o.batch) * o.gen;
    Summary s;
    const double prefill_s = median_of(runs, [](const RunResult& r) { return r.prefill_s; });
    s.prefill_ms = 1e3 * prefill_s;
    s.prefill_forward_ms = 1e3 * median_of(runs, [](const RunResult& r) { return r.prefill_forward_s; });
    s.prefill_select_ms = 1e3 * median_of(runs, [](const RunResult& r) { return r.prefill_select_s; });
    s.prefill_tok_s = ratio(tokens_prefill, prefill_s);
    s.decode_tok_s = o.gen > 0 ? median_of(runs, [&](const RunResult& r) {
        return ratio(tokens_decode, r.decode_s);
    }) : NAN;
    const double decode_s = o.gen > 0 ? tokens_decode / s.decode_tok_s : 0.0;  // the median rate's
    s.decode_ms = 1e3 * decode_s;
    s.decode_forward_ms = 1e3 * median_of(runs, [](const RunResult& r) { return r.decode_forward_s; });
    s.decode_select_ms = 1e3 * median_of(runs, [](const RunResult& r) { return r.decode_select_s; });
    s.decode_ms_per_step = o.gen > 0 ? s.decode_ms / o.gen : NAN;
    s.total_tok_s = ratio(tokens_prefill + tokens_decode, prefill_s + decode_s);
    const RunResult& last = runs.back();
    s.weight_bytes = double(last.memory.weights ? last.memory.weights : t.host_weight_bytes);
    s.bytes_per_step = s.weight_bytes + last.mean_kv_read;
    s.achieved_gbs = o.gen > 0 ? s.bytes_per_step / (s.decode_ms_per_step * 1e-3) / 1e9 : NAN;
    return s;
}

nlohmann::json null_if_nan(double v) { return std::isfinite(v) ? nlohmann::json(v) : nlohmann::json(); }

nlohmann::json kv_json(const KvBytes& k) {
    return {{"bytes", k.bytes}, {"bytes_full", k.full}, {"retention", k.retention()}};
}

nlohmann::json run_json(const RunResult& r) {
    std::vector<double> steps_ms;
    for (double s : r.step_s) steps_ms.push_back(1e3 * s);
    return {{"prefill_ms", 1e3 * r.prefill_s},
            {"prefill_forward_ms", 1e3 * r.prefill_forward_s},
            {"prefill_selection_ms", 1e3 * r.prefill_select_s},
            {"decode_ms", 1e3 * r.decode_s},
            {"decode_forward_ms", 1e3 * r.decode_forward_s},
            {"decode_selection_ms", 1e3 * r.decode_select_s},
            {"decode_step_ms",
             {{"min", steps_ms.empty() ? 0.0 : *std::min_element(steps_ms.begin(), steps_ms.end())},
              {"median", median(steps_ms)},
              {"max", steps_ms.empty() ? 0.0 : *std::max_element(steps_ms.begin(), steps_ms.end())}}}};
}

nlohmann::json search_json(const BatchSearch& b) {
    nlohmann::json tries = nlohmann::json::array();
    for (const BatchSearch::Try& t : b.tries) {
        nlohmann::json j = {{"batch", t.batch}, {"fits", t.fits}};
        if (!t.fits) j["error"] = t.error;
        tries.push_back(j);
    }
    return {{"limit_bytes", b.limit},
            {"weights_bytes", b.weights},
            {"kv_per_sequence_bytes", b.kv_per_sequence},
            {"scratch_bytes", b.scratch},
            {"scratch_per_sequence_bytes", b.scratch_per_sequence},
            {"estimate", b.estimate},
            {"tries", tries}};
}

nlohmann::json report_json(const Options& o, const Target& t, const pyr::KvParams& kv,
                           const std::vector<RunResult>& runs, const Summary& s,
                           const BatchSearch* search) {
    const RunResult& last = runs.back();
    nlohmann::json runs_j = nlohmann::json::array();
    for (const RunResult& r : runs) runs_j.push_back(run_json(r));
    nlohmann::json bw = {{"weight_bytes", s.weight_bytes},
                         {"mean_kv_bytes_per_step", last.mean_kv_read},
                         {"bytes_per_step", s.bytes_per_step},
                         {"achieved_gbs", null_if_nan(s.achieved_gbs)}};
    if (o.bandwidth_gbs > 0) {
        bw["bandwidth_gbs"] = o.bandwidth_gbs;
        bw["fraction"] = null_if_nan(s.achieved_gbs / o.bandwidth_gbs);
    }
    return {
        {"device", t.backend->device_name()},
        {"sampling", t.backend->samples_on_device() ? "device" : "host"},
        {"shape", t.shape},
        {"dtype", t.dtype},
        {"batch", o.batch},
        {"prefill_batch", o.prefill_batch > 0 ? nlohmann::json(std::min(o.prefill_batch, o.batch))
                                              : nlohmann::json(o.batch)},
        {"prompt", o.prompt},
        {"gen", o.gen},
        {"repeat", o.repeat},
        {"warmup", o.warmup},
        {"seed", o.seed},
        {"policy", kv.policy},
        {"retention", kv.retention > 0 ? tidy(kv.retention) : nlohmann::json()},
        {"kv_params", last.params},
        {"prefill_ms", s.prefill_ms},
        {"prefill_forward_ms", s.prefill_forward_ms},
        {"prefill_tokens_per_s", s.prefill_tok_s},
        {"decode_ms", s.decode_ms},
        {"decode_forward_ms", s.decode_forward_ms},
        {"decode_tokens_per_s", null_if_nan(s.decode_tok_s)},
        {"decode_ms_per_step", null_if_nan(s.decode_ms_per_step)},
        {"total_tokens_per_s", null_if_nan(s.total_tok_s)},
        {"selection",
         {{"prefill_ms", s.prefill_select_ms},
          {"prefill_fraction", null_if_nan(ratio(s.prefill_select_ms, s.prefill_ms))},
          {"decode_ms", s.decode_select_ms},
          {"decode_fraction", null_if_nan(ratio(s.decode_select_ms, s.decode_ms))}}},
        {"kv_after_prefill", kv_json(last.kv_prefill)},
        {"kv_end", kv_json(last.kv_end)},
        {"device_memory",
         {{"weights", last.memory.weights},
          {"kv", last.memory.kv},
          {"scratch", last.memory.scratch},
          {"peak", last.memory.peak}}},
        {"bandwidth", bw},
        {"bytes_per_step", s.bytes_per_step},
        {"decode_steps",
         {{"graph_replays", last.steps.graph_replays},
          {"graph_captures", last.steps.graph_captures},
          {"launched", last.steps.direct_decode_steps}}},
        {"prefill_attention_launches",
         {{"tensor_cores", last.steps.prefill_attention_tensor_cores},
          {"cuda_cores", last.steps.prefill_attention_cuda_cores}}},
        {"kv_rows_moved",
         {{"prefill", last.rows_moved_prefill},
          {"decode", last.rows_moved_decode},
          {"bytes_per_row", last.row_bytes}}},
        {"runs", runs_j},
        {"batch_search", search ? search_json(*search) : nlohmann::json()},
    };
}

std::string human_bytes(double b) {
    const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
    int u = 0;
    while (b >= 1024.0 && u < 4) b /= 1024.0, ++u;
    char buf[32];
    std::snprintf(buf, sizeof buf, "%.2f %s", b, units[u]);
    return buf;
}

void print_table(const Options& o, const Target& t, const pyr::KvParams& kv,
                 const std::vector<RunResult>& runs, const Summary& s, const BatchSearch* search) {
    const RunResult& last = runs.back();
    std::printf("pyramid-bench: %s, %s %s, batch %d, prompt %d, gen %d, kv %s",
                t.backend->device_name().c_str(), t.shape.c_str(), t.dtype.c_str(), o.batch,
                o.prompt, o.gen, kv.policy.c_str());
    if (kv.retention > 0) std::printf(" (retention %.3g)", double(kv.retention));
    std::printf("%s\n", o.repeat > 1 ? (", median of " + std::to_string(o.repeat) + " runs").c_str() : "");
    if (search) {
        std::printf("  batch max: %d sequences fit %s (estimate %d: each %s KV, %s scratch; tries:",
                    o.batch, human_bytes(double(search->limit)).c_str(), search->estimate,
                    human_bytes(double(search->kv_per_sequence)).c_str(),
                    human_bytes(double(search->scratch_per_sequence)).c_str());
        for (const BatchSearch::Try& tr : search->tries)
            std::printf(" %d %s", tr.batch, tr.fits ? "fits" : "out of memory,");
        std::printf(")\n");
    }
    std::printf("  %-9s %12s %14s\n", "phase", "time", "tokens/s");
    std::printf("  %-9s %9.1f ms %14.1f   (forward %.1f ms)\n", "prefill", s.prefill_ms,
                s.prefill_tok_s, s.prefill_forward_ms);
    if (o.gen > 0)
        std::printf("  %-9s %9.1f ms %14.1f   (%.3f ms/step; forward %.1f ms)\n", "decode",
                    s.decode_ms, s.decode_tok_s, s.decode_ms_per_step, s.decode_forward_ms);
    std::printf("  %-9s %9.1f ms %14.1f\n", "total", s.prefill_ms + s.decode_ms, s.total_tok_s);
    std::printf("  selection overhead: prefill %.3f ms (%.2f%%), decode %.3f ms (%.2f%%)\n",
                s.prefill_select_ms, 100 * ratio(s.prefill_select_ms, s.prefill_ms),
                s.decode_select_ms, 100 * ratio(s.decode_select_ms, s.decode_ms));
    std::printf("  kv cache, %d sequence(s): after prefill %s of %s (retention %.3f), end %s of %s "
                "(retention %.3f)\n",
                o.batch, human_bytes(double(last.kv_prefill.bytes)).c_str(),
                human_bytes(double(last.kv_prefill.full)).c_str(), last.kv_prefill.retention(),
                human_bytes(double(last.kv_end.bytes)).c_str(),
                human_bytes(double(last.kv_end.full)).c_str(), last.kv_end.retention());
    if (last.rows_moved_prefill + last.rows_moved_decode > 0) {
        std::printf("  kv rows moved by retains: prefill %llu (%s)",
                    (unsigned long long)last.rows_moved_prefill,
                    human_bytes(double(last.rows_moved_prefill * last.row_bytes)).c_str());
        if (o.gen > 0)
            std::printf(", decode %llu (%s, %.1f a step)", (unsigned long long)last.rows_moved_decode,
                        human_bytes(double(last.rows_moved_decode * last.row_bytes)).c_str(),
                        double(last.rows_moved_decode) / o.gen);
        std::printf("\n");
    }
    const pyr::DeviceMemory& m = last.memory;
    if (m.weights || m.peak)
        std::printf("  device memory: weights %s, kv %s, scratch %s, peak %s\n",
                    human_bytes(double(m.weights)).c_str(), human_bytes(double(m.kv)).c_str(),
                    human_bytes(double(m.scratch)).c_str(), human_bytes(double(m.peak)).c_str());
    const pyr::BackendStats& g = last.steps;
    if (g.graph_replays + g.graph_captures + g.direct_decode_steps > 0)
        std::printf("  decode steps: %llu replayed from CUDA graphs, %llu captured, %llu launched "
                    "kernel by kernel\n",
                    (unsigned long long)g.graph_replays, (unsigned long long)g.graph_captures,
                    (unsigned long long)g.direct_decode_steps);
    if (g.prefill_attention_tensor_cores + g.prefill_attention_cuda_cores > 0)
        std::printf("  prefill attention: %llu launches on tensor cores, %llu on CUDA cores\n",
                    (unsigned long long)g.prefill_attention_tensor_cores,
                    (unsigned long long)g.prefill_attention_cuda_cores);
    if (o.gen > 0) {
        std::printf("  decode bandwidth model: %s per step (weights %s + kv %s) -> %.1f GB/s",
                    human_bytes(s.bytes_per_step).c_str(), human_bytes(s.weight_bytes).c_str(),
                    human_bytes(last.mean_kv_read).c_str(), s.achieved_gbs);
        if (o.bandwidth_gbs > 0)
            std::printf(", %.1f%% of %.1f GB/s", 100 * s.achieved_gbs / o.bandwidth_gbs,
                        o.bandwidth_gbs);
        std::printf("\n");
    }
}

// ---- main -----------------------------------------------------------------------------

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

int main(int argc, char** argv) {
    const Options o = parse_args(argc, argv);
    try {
        return run(o);
    } catch (const pyr::Error& e) {
        std::fprintf(stderr, "pyramid-bench: %s (%s)\n", e.what(), pyr_status_str(e.status()));
    } catch (const std::exception& e) {
        std::fprintf(stderr, "pyramid-bench: %s\n", e.what());
    }
    return 1;
}
