// pyramid-bench's report: the medians over the timed runs, as a table or one JSON object.
#include <algorithm>
#include <cmath>
#include <cstdio>

#include "bench.h"

namespace bench {

namespace {

// ---- report ---------------------------------------------------------------------------

double median(std::vector<double> v) {
    if (v.empty()) return 0;
    std::sort(v.begin(), v.end());
    const size_t m = v.size() / 2;
    return v.size() % 2 ? v[m] : 0.5 * (v[m - 1] + v[m]);
}

double ratio(double a, double b) { return b > 0 ? a / b : NAN; }

template <class F>
double median_of(const std::vector<RunResult>& runs, F field) {
    std::vector<double> v;
    for (const RunResult& r : runs) v.push_back(field(r));
    return median(std::move(v));
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

std::string human_bytes(double b) {
    const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
    int u = 0;
    while (b >= 1024.0 && u < 4) b /= 1024.0, ++u;
    char buf[32];
    std::snprintf(buf, sizeof buf, "%.2f %s", b, units[u]);
    return buf;
}

}  // namespace

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

}  // namespace bench
