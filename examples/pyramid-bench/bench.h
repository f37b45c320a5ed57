// pyramid-bench's parts (see main.cpp): the options (options.cpp), the backend under test
// and its weights (target.cpp), the timed runs and the batch-max search (run.cpp), and the
// report (report.cpp).
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "backend/backend.h"
#include "common/thread_pool.h"
#include "kv/kv_params.h"
#include "kv_flags.h"
#include "model/model.h"

namespace bench {

using Clock = std::chrono::steady_clock;

inline double seconds_since(Clock::time_point t0) {
    return std::chrono::duration<double>(Clock::now() - t0).count();
}

constexpr int32_t kMaxBatch = 4096;  // --batch and --prefill-batch at the most

// ---- options.cpp ------------------------------------------------------------------------

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

// Exits 2 with the message and a pointer to --help.
[[noreturn]] void usage_error(const std::string& msg);
// The command line; --help prints the usage and exits, bad flags are usage errors.
Options parse_args(int argc, char** argv);
// The pyr::KvParams the flags describe (KvFlags holds them as the C API's kv_* fields).
pyr::KvParams kv_params(const pyr_examples::KvFlags& f);

// ---- target.cpp -------------------------------------------------------------------------

struct Target {
    pyr::ModelConfig config;
    std::string shape;              // the --shape name or the checkpoint directory
    std::string dtype;              // of the weights the backend computes with
    std::shared_ptr<const pyr::Model> model;  // with --model
    std::unique_ptr<pyr::Backend> backend;
    uint64_t host_weight_bytes = 0;  // the weights' size where the backend is the CPU
    std::unique_ptr<pyr::ThreadPool> host;  // --threads: the sequences' after_step
};

// Fails before any weights are made when the device is not there.
void check_device(const std::string& device);
// The model's config (and the checkpoint with --model), before any weights are made, so
// that the flags can be checked against it cheaply.
Target describe_target(const Options& o);
// The backend with its weights: random ones made on the device (CUDA) or the host (CPU),
// or the checkpoint's.
void open_backend(const Options& o, Target& t);

// ---- run.cpp ----------------------------------------------------------------------------

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

// One run: B sequences' batched prefill (prefill_batch at a time; 0: all), then n_gen
// batched decode steps.
RunResult run_once(Target& t, const pyr::KvParams& kv, int32_t batch, int32_t n_prompt,
                   int32_t prefill_batch, int32_t n_gen, std::mt19937_64& rng);

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

// The largest batch whose whole run fits the backend's memory limit (run.cpp says how it
// is found); the search's measures and tries go to `search`.
int32_t find_max_batch(Target& t, const pyr::KvParams& kv, int32_t n_prompt,
                       int32_t prefill_batch, int32_t n_gen, std::mt19937_64& rng,
                       BatchSearch& search);

// A knob for JSON: integral values as integers, the others to 7 significant digits.
nlohmann::json tidy(double v);

// ---- report.cpp -------------------------------------------------------------------------

// The numbers reported: every time is the median over the timed runs, each on its own
// (the decode rate is the median rate, as --repeat promises); the byte counts come from
// the last run (they differ between runs only through the random prompts).
struct Summary {
    double prefill_ms = 0, prefill_forward_ms = 0, prefill_select_ms = 0, prefill_tok_s = 0;
    double decode_ms = 0, decode_forward_ms = 0, decode_select_ms = 0, decode_tok_s = 0;
    double decode_ms_per_step = 0, total_tok_s = 0;
    double weight_bytes = 0, bytes_per_step = 0, achieved_gbs = 0;
};


Summary summarize(const Options& o, const Target& t, const std::vector<RunResult>& runs);
nlohmann::json report_json(const Options& o, const Target& t, const pyr::KvParams& kv,
                           const std::vector<RunResult>& runs, const Summary& s,
                           const BatchSearch* search);
void print_table(const Options& o, const Target& t, const pyr::KvParams& kv,
                 const std::vector<RunResult>& runs, const Summary& s, const BatchSearch* search);

}  // namespace bench
