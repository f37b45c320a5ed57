// The C ABI: handle structs, parameter checks, and the one place where C++ exceptions
// become a pyr_status plus a message on the handle. Nothing else in the library catches.
#include "pyramid.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <memory>
#include <mutex>
#include <new>
#include <random>
#include <string>
#include <sys/stat.h>

#include "common/error.h"
#include "common/log.h"
#include "engine/engine.h"
#include "engine/session.h"

struct pyr_engine {
    std::shared_ptr<pyr::Engine> engine;  // null when the open failed
    mutable std::mutex errmsg_mutex;
    std::string errmsg;
};

struct pyr_session {
    std::unique_ptr<pyr::Session> session;
    std::string errmsg;
};

namespace {

const char* const kNullHandle = "NULL handle passed to pyramid";

// Runs `fn` and turns every exception into a status, with the message stored by `report`.
template <class Fn, class Report>
pyr_status guarded(Fn&& fn, Report&& report) {
    try {
        return fn();
    } catch (const pyr::Error& e) {
        report(e.what());
        return e.status();
    } catch (const std::bad_alloc&) {
        report("out of memory");
        return PYR_ERR_OUT_OF_MEMORY;
    } catch (const std::exception& e) {
        report(std::string("internal error: ") + e.what());
        return PYR_ERR_INTERNAL;
    } catch (...) {
        report("internal error: unknown exception");
        return PYR_ERR_INTERNAL;
    }
}

void set_error(pyr_engine* e, const std::string& msg) {
    std::lock_guard<std::mutex> lock(e->errmsg_mutex);
    e->errmsg = msg;
}

template <class Fn>
pyr_status on_engine(pyr_engine* e, Fn&& fn) {
    if (!e) return PYR_ERR_INVALID_ARGUMENT;
    if (!e->engine) return PYR_ERR_STATE;  // its errmsg still says why the open failed
    return guarded(fn, [e](const std::string& m) { set_error(e, m); });
}

template <class Fn>
pyr_status on_session(pyr_session* s, Fn&& fn) {
    if (!s) return PYR_ERR_INVALID_ARGUMENT;
    s->errmsg.clear();
    return guarded(fn, [s](const std::string& m) { s->errmsg = m; });
}

template <class Params>
void check_struct_size(const Params* p, const char* name) {
    if (p && p->struct_size != sizeof(Params))
        pyr::fail(PYR_ERR_INVALID_ARGUMENT,
                  std::string(name) + ".struct_size is " + std::to_string(p->struct_size) +
                      ", expected " + std::to_string(sizeof(Params)) +
                      " (initialise it with " + name + "_init)");
}

pyr::SessionParams to_session_params(const pyr_session_params* p) {
    pyr_session_params d;
    pyr_session_params_init(&d);
    if (!p) p = &d;
    check_struct_size(p, "pyr_session_params");
    pyr::SessionParams s;
    s.n_ctx = p->n_ctx;
    s.max_tokens = p->max_tokens;
    s.sampling.temperature = p->temperature;
    s.sampling.top_k = p->top_k;
    s.sampling.top_p = p->top_p;
    s.sampling.min_p = p->min_p;
    s.sampling.repeat_penalty = p->repeat_penalty;
    s.sampling.repeat_last_n = p->repeat_last_n;
    s.sampling.seed = p->seed;
    if (p->seed == PYR_SEED_RANDOM)
        s.sampling.seed = std::random_device{}() ^
                          uint64_t(std::chrono::steady_clock::now().time_since_epoch().count());
    s.kv.policy = p->kv_policy ? p->kv_policy : "full";
    s.kv.retention = p->kv_retention;
    s.kv.rho = p->kv_rho;
    s.kv.gamma = p->kv_gamma;
    s.kv.recent_ratio = p->kv_recent_ratio;
    s.kv.min_context = p->kv_min_context;
    s.kv.sinks = p->kv_sinks;
    s.kv.gen_e = p->kv_gen_e;
    s.kv.prefill_shrink = p->kv_prefill_shrink;
    s.kv.shrink_start = p->kv_shrink_start;
    s.kv.obs_window = p->kv_obs_window;
    s.kv.pool = p->kv_pool;
    auto bad = [](const std::string& m) { pyr::fail(PYR_ERR_INVALID_ARGUMENT, m); };
    if (!(s.sampling.temperature >= 0.0f)) bad("temperature must be >= 0");
    if (s.sampling.top_k < 0) bad("top_k must be >= 0");
    if (!(s.sampling.top_p > 0.0f && s.sampling.top_p <= 1.0f)) bad("top_p must be in (0, 1]");
    if (!(s.sampling.min_p >= 0.0f && s.sampling.min_p <= 1.0f)) bad("min_p must be in [0, 1]");
    if (!(s.sampling.repeat_penalty > 0.0f)) bad("repeat_penalty must be > 0");
    if (s.sampling.repeat_last_n < 0) bad("repeat_last_n must be >= 0");
    return s;
}

bool is_directory(const char* path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

}  // namespace

extern "C" {

/* ---- version, status, log ---------------------------------------------------------- */

const char* pyr_version_string(void) {
#define PYR_STR2(x) #x
#define PYR_STR(x) PYR_STR2(x)
    return PYR_STR(PYR_VERSION_MAJOR) "." PYR_STR(PYR_VERSION_MINOR) "." PYR_STR(PYR_VERSION_PATCH);
}

int32_t pyr_abi_version(void) { return PYR_ABI_VERSION; }

const char* pyr_status_str(pyr_status status) {
    switch (status) {
        case PYR_OK: return "ok";
        case PYR_DONE: return "done";
        case PYR_CANCELLED: return "cancelled";
        case PYR_ERR_INVALID_ARGUMENT: return "invalid argument";
        case PYR_ERR_IO: return "i/o error";
        case PYR_ERR_FORMAT: return "bad model format";
        case PYR_ERR_UNSUPPORTED: return "unsupported";
        case PYR_ERR_OUT_OF_MEMORY: return "out of memory";
        case PYR_ERR_CONTEXT_FULL: return "context full";
        case PYR_ERR_STATE: return "invalid state";
        case PYR_ERR_INTERNAL: return "internal error";
    }
    return "unknown status";
}

void pyr_log_set_level(pyr_log_level level) { pyr::log_set_level(level); }
void pyr_log_set_callback(pyr_log_callback cb, void* user) { pyr::log_set_callback(cb, user); }

/* ---- engine ------------------------------------------------------------------------ */

void pyr_engine_params_init(pyr_engine_params* p) {
    if (!p) return;
    std::memset(p, 0, sizeof(*p));
    p->struct_size = sizeof(*p);
    p->device = "auto";
    p->prefill_chunk = pyr::EngineParams().prefill_chunk;
}

const char* pyr_default_model_dir(void) {
    // The installed copy wins; a build tree uses the source checkout's copy.
    return is_directory(PYR_MODEL_INSTALL_DIR) ? PYR_MODEL_INSTALL_DIR : PYR_MODEL_SOURCE_DIR;
}

pyr_status pyr_engine_open(const char* model_dir, const pyr_engine_params* params,
                           pyr_engine** out_engine) {
    if (!out_engine) return PYR_ERR_INVALID_ARGUMENT;
    *out_engine = nullptr;
    pyr_engine* e = new (std::nothrow) pyr_engine();
    if (!e) return PYR_ERR_OUT_OF_MEMORY;
    *out_engine = e;
    return guarded(
        [&] {
            if (!model_dir) pyr::fail(PYR_ERR_INVALID_ARGUMENT, "model_dir is NULL");
            check_struct_size(params, "pyr_engine_params");
            pyr::EngineParams ep;
            if (params) {
                ep.device = params->device ? params->device : "auto";
                ep.n_threads = params->n_threads;
                ep.max_device_bytes = params->max_device_bytes;
                ep.prefill_chunk = params->prefill_chunk;
            }
            e->engine = pyr::Engine::open(model_dir, ep);
            return PYR_OK;
        },
        [e](const std::string& m) { set_error(e, m); });
}

void pyr_engine_close(pyr_engine* engine) { delete engine; }

const char* pyr_engine_errmsg(const pyr_engine* engine) {
    if (!engine) return kNullHandle;
    std::lock_guard<std::mutex> lock(engine->errmsg_mutex);
    return engine->errmsg.c_str();
}

#define PYR_ENGINE_GETTER(type, name, expr)                        \
    type pyr_engine_##name(const pyr_engine* engine) {             \
        if (!engine || !engine->engine) return 0;                  \
        const pyr::Engine& eng = *engine->engine;                  \
        return type(expr);                                         \
    }
PYR_ENGINE_GETTER(int32_t, n_layers, eng.config().n_layer)
PYR_ENGINE_GETTER(int32_t, n_vocab, eng.config().n_vocab)
PYR_ENGINE_GETTER(int32_t, n_ctx_train, eng.config().n_ctx_train)
PYR_ENGINE_GETTER(int32_t, bos_token, eng.config().bos_token_id)
PYR_ENGINE_GETTER(int32_t, eos_token, eng.config().eos_token_ids.empty() ? -1 : eng.config().eos_token_ids[0])
PYR_ENGINE_GETTER(uint64_t, weights_bytes, eng.model().weights_bytes())
#undef PYR_ENGINE_GETTER

const char* pyr_engine_device(const pyr_engine* engine) {
    if (!engine || !engine->engine) return "";
    return engine->engine->device().c_str();
}

int32_t pyr_engine_tokenize(pyr_engine* engine, const char* text, int32_t add_bos,
                            int32_t* tokens, int32_t capacity) {
    int32_t count = 0;
    pyr_status st = on_engine(engine, [&] {
        if (!text) pyr::fail(PYR_ERR_INVALID_ARGUMENT, "text is NULL");
        if (capacity < 0 || (capacity > 0 && !tokens))
            pyr::fail(PYR_ERR_INVALID_ARGUMENT, "tokens is NULL or capacity < 0");
        auto ids = engine->engine->model().tokenizer().encode(text, add_bos != 0);
        if (ids.size() > size_t(INT32_MAX)) pyr::fail(PYR_ERR_INVALID_ARGUMENT, "text too long");
        count = int32_t(ids.size());
        std::copy_n(ids.begin(), std::min(count, capacity), tokens);  // tokens may be NULL when 0
        return PYR_OK;
    });
    return st == PYR_OK ? count : int32_t(st);
}

uint64_t pyr_engine_session_bytes_estimate(const pyr_engine* engine,
                                           const pyr_session_params* params) {
    if (!engine || !engine->engine) return 0;
    try {
        pyr::SessionParams sp = to_session_params(params);
        if (sp.n_ctx < 0) return 0;  // as pyr_session_create refuses it
        const pyr::Engine& eng = *engine->engine;
        return eng.kv_storage_bytes(sp.n_ctx > 0 ? sp.n_ctx : eng.config().n_ctx_train);
    } catch (...) {
        return 0;
    }
}

/* ---- session ----------------------------------------------------------------------- */

void pyr_session_params_init(pyr_session_params* p) {
    if (!p) return;
    std::memset(p, 0, sizeof(*p));
    pyr::SessionParams d;
    p->struct_size = sizeof(*p);
    p->n_ctx = d.n_ctx;
    p->max_tokens = d.max_tokens;
    p->temperature = d.sampling.temperature;
    p->top_k = d.sampling.top_k;
    p->top_p = d.sampling.top_p;
    p->min_p = d.sampling.min_p;
    p->repeat_penalty = d.sampling.repeat_penalty;
    p->repeat_last_n = d.sampling.repeat_last_n;
    p->seed = PYR_SEED_RANDOM;
    p->kv_policy = "full";
    pyr::KvParams kv;
    p->kv_retention = kv.retention;
    p->kv_rho = kv.rho;
    p->kv_gamma = kv.gamma;
    p->kv_recent_ratio = kv.recent_ratio;
    p->kv_min_context = kv.min_context;
    p->kv_sinks = kv.sinks;
    p->kv_gen_e = kv.gen_e;
    p->kv_prefill_shrink = kv.prefill_shrink;
    p->kv_shrink_start = kv.shrink_start;
    p->kv_obs_window = kv.obs_window;
    p->kv_pool = kv.pool;
}

pyr_status pyr_session_create(pyr_engine* engine, const pyr_session_params* params,
                              pyr_session** out_session) {
    if (out_session) *out_session = nullptr;
    return on_engine(engine, [&] {
        if (!out_session) pyr::fail(PYR_ERR_INVALID_ARGUMENT, "out_session is NULL");
        auto s = std::make_unique<pyr_session>();
        s->session = std::make_unique<pyr::Session>(engine->engine, to_session_params(params));
        *out_session = s.release();
        return PYR_OK;
    });
}

void pyr_session_destroy(pyr_session* session) { delete session; }

const char* pyr_session_errmsg(const pyr_session* s) { return s ? s->errmsg.c_str() : kNullHandle; }

pyr_status pyr_session_feed_text(pyr_session* s, const char* text) {
    return on_session(s, [&] {
        if (!text) pyr::fail(PYR_ERR_INVALID_ARGUMENT, "text is NULL");
        s->session->feed_text(text);
        return PYR_OK;
    });
}

pyr_status pyr_session_feed_tokens(pyr_session* s, const int32_t* tokens, int32_t n_tokens) {
    return on_session(s, [&] {
        if (n_tokens < 0 || (n_tokens > 0 && !tokens))
            pyr::fail(PYR_ERR_INVALID_ARGUMENT, "tokens is NULL or n_tokens < 0");
        s->session->feed_tokens(std::vector<int32_t>(tokens, tokens + n_tokens));
        return PYR_OK;
    });
}

pyr_status pyr_session_prefill(pyr_session* s) {
    return on_session(s, [&] {
        s->session->prefill();
        return PYR_OK;
    });
}

pyr_status pyr_session_next(pyr_session* s) {
    return on_session(s, [&] {
        return s->session->next() == pyr::StepResult::Token ? PYR_OK : PYR_DONE;
    });
}

int32_t pyr_session_token(const pyr_session* s) { return s ? s->session->token() : -1; }

const char* pyr_session_text(const pyr_session* s) { return s ? s->session->text().c_str() : ""; }

const float* pyr_session_logits(const pyr_session* s) {
    if (!s) return nullptr;
    // After a step that sampled on the GPU the logits are read back now, which can fail: the
    // message goes on the handle (its own, passed const for the caller's convenience).
    const float* logits = nullptr;
    on_session(const_cast<pyr_session*>(s), [&] {
        logits = s->session->logits();
        return PYR_OK;
    });
    return logits;
}

float pyr_session_logit(const pyr_session* s, int32_t token) {
    const float* l = pyr_session_logits(s);
    if (!l || token < 0 || token >= s->session->n_vocab()) return 0.0f;
    return l[token];
}

void pyr_session_cancel(pyr_session* s) {
    if (s) s->session->cancel();
}

pyr_status pyr_session_reset(pyr_session* s) {
    return on_session(s, [&] {
        s->session->reset();
        return PYR_OK;
    });
}

pyr_status pyr_session_generate(pyr_session* s, const char* prompt, pyr_token_callback on_token,
                                void* user_data) {
    return on_session(s, [&] {
        if (!on_token) pyr::fail(PYR_ERR_INVALID_ARGUMENT, "on_token callback is NULL");
        if (prompt && *prompt) s->session->feed_text(prompt);
        for (;;) {
            pyr::StepResult r = s->session->next();
            const std::string& text = s->session->text();
            if (r == pyr::StepResult::Done) {
                if (!text.empty()) on_token(-1, text.c_str(), user_data);
                return PYR_OK;
            }
            if (on_token(s->session->token(), text.c_str(), user_data) != 0) return PYR_OK;
        }
    });
}

/* ---- memory ------------------------------------------------------------------------ */

int32_t pyr_session_n_tokens(const pyr_session* s) { return s ? s->session->counts().n_tokens : 0; }
int32_t pyr_session_n_processed(const pyr_session* s) {
    return s ? s->session->counts().n_processed : 0;
}
uint64_t pyr_session_kv_bytes(const pyr_session* s) { return s ? s->session->counts().kv_bytes : 0; }
uint64_t pyr_session_kv_bytes_full(const pyr_session* s) {
    return s ? s->session->counts().kv_bytes_full : 0;
}

int32_t pyr_session_layer_tokens(const pyr_session* s, int32_t layer) {
    if (!s) return 0;
    const pyr::MemoryCounts m = s->session->counts();
    return layer >= 0 && size_t(layer) < m.layer_tokens.size() ? m.layer_tokens[size_t(layer)] : 0;
}

uint64_t pyr_session_layer_bytes(const pyr_session* s, int32_t layer) {
    if (!s) return 0;
    const pyr::MemoryCounts m = s->session->counts();
    return layer >= 0 && size_t(layer) < m.layer_bytes.size() ? m.layer_bytes[size_t(layer)] : 0;
}

double pyr_session_kv_param(const pyr_session* s, const char* name) {
    if (!s || !name) return std::nan("");
    try {
        return s->session->kv_param(name);
    } catch (...) {  // out of memory for the name's copy: no status to return it in
        return std::nan("");
    }
}

int32_t pyr_session_layer_positions(const pyr_session* s, int32_t layer, pyr_kv_when when,
                                    int32_t* out, int32_t capacity) {
    if (!s || layer < 0 || capacity < 0 || (capacity > 0 && !out)) return 0;
    if (when != PYR_KV_NOW && when != PYR_KV_AFTER_PREFILL) return 0;
    try {
        const std::vector<int32_t> pos = s->session->layer_positions(layer, when == PYR_KV_AFTER_PREFILL);
        const size_t n = std::min(pos.size(), size_t(capacity));
        std::copy(pos.begin(), pos.begin() + std::ptrdiff_t(n), out);
        return int32_t(pos.size());
    } catch (...) {  // out of memory for the copy: as for a bad argument
        return 0;
    }
}

}  // extern "C"
