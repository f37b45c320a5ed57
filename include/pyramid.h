/*
 * pyramid.h — the C ABI of pyramid, an embeddable LLaMA inference library with
 * PyramidInfer KV-cache compression.
 *
 * Objects
 *   pyr_engine   a loaded model (weights, tokenizer, backend). Thread-safe: any thread may
 *                create sessions on it or query it. Reference-counted: every session holds
 *                a reference, so pyr_engine_close() may be called before the sessions are
 *                destroyed; the memory is freed when the last of them goes. Sessions that
 *                step on different threads at the same time share the engine's forward
 *                passes: steps that arrive while one runs go through the model together in
 *                the next (batching; on a GPU it multiplies throughput). Each still gets
 *                its own results; on a GPU they may differ from a lone run within float
 *                rounding, as a batch takes other kernels.
 *   pyr_session  one conversation: its token history, sampler and KV cache. Use a session
 *                from one thread at a time; pyr_session_cancel() and the memory getters
 *                (pyr_session_kv_*, pyr_session_layer_*) may be called from any thread
 *                while the session lives.
 *
 * Errors
 *   Every function that can fail returns a pyr_status. On failure the handle keeps a
 *   message (pyr_engine_errmsg / pyr_session_errmsg) until the next call that can fail on
 *   that handle. Nothing ever aborts, exits or throws across this interface. A failed
 *   call leaves the session as it was before the call unless its documentation says
 *   otherwise.
 *
 * Strings
 *   All strings are UTF-8 and NUL-terminated. Returned `const char*` pointers are owned by
 *   the library; each function says how long its pointer stays valid.
 *
 * Typical use (pull-style streaming):
 *
 *   pyr_engine* engine = NULL;
 *   if (pyr_engine_open(pyr_default_model_dir(), NULL, &engine) != PYR_OK) {
 *       fprintf(stderr, "%s\n", pyr_engine_errmsg(engine));
 *       pyr_engine_close(engine);
 *       return 1;
 *   }
 *   pyr_session* session = NULL;
 *   pyr_session_create(engine, NULL, &session);
 *   pyr_session_feed_text(session, "def fibonacci(n):");
 *   pyr_status st;
 *   while ((st = pyr_session_next(session)) == PYR_OK)
 *       fputs(pyr_session_text(session), stdout);
 *   fputs(pyr_session_text(session), stdout);   // tail flushed at PYR_DONE
 *   pyr_session_destroy(session);
 *   pyr_engine_close(engine);
 */
#ifndef PYRAMID_H
#define PYRAMID_H

#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32) && defined(PYRAMID_SHARED)
#  if defined(PYRAMID_BUILDING)
#    define PYR_API __declspec(dllexport)
#  else
#    define PYR_API __declspec(dllimport)
#  endif
#elif defined(__GNUC__)
#  define PYR_API __attribute__((visibility("default")))
#else
#  define PYR_API
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* ---------------------------------------------------------------------------------------
 * Version
 * ------------------------------------------------------------------------------------- */

#define PYR_VERSION_MAJOR 0
#define PYR_VERSION_MINOR 1
#define PYR_VERSION_PATCH 0
/* Incremented on every incompatible change of this header (struct layouts, signatures,
 * enum values). Bindings compare it with pyr_abi_version() when they load. */
#define PYR_ABI_VERSION 2

/* "MAJOR.MINOR.PATCH". Static storage; never free it. Any thread. */
PYR_API const char* pyr_version_string(void);
/* The PYR_ABI_VERSION the library was built with. Any thread. */
PYR_API int32_t pyr_abi_version(void);

/* ---------------------------------------------------------------------------------------
 * Status codes
 * ------------------------------------------------------------------------------------- */

typedef enum pyr_status {
    PYR_OK = 0,                    /* success; for pyr_session_next: a token is ready */
    PYR_DONE = 1,                  /* generation finished: end-of-sequence or max_tokens */
    PYR_CANCELLED = 2,             /* pyr_session_cancel() stopped the call */
    PYR_ERR_INVALID_ARGUMENT = -1, /* NULL handle, bad parameter, wrong struct_size */
    PYR_ERR_IO = -2,               /* a file is missing or cannot be read */
    PYR_ERR_FORMAT = -3,           /* a model file is malformed (config, safetensors, tokenizer) */
    PYR_ERR_UNSUPPORTED = -4,      /* valid input that this build cannot run (device, dtype) */
    PYR_ERR_OUT_OF_MEMORY = -5,    /* an allocation or the device memory budget failed */
    PYR_ERR_CONTEXT_FULL = -6,     /* the tokens would not fit in the session's context */
    PYR_ERR_STATE = -7,            /* the call is not valid in the object's current state */
    PYR_ERR_INTERNAL = -8          /* a bug: please report the message */
} pyr_status;

/* A short constant description of a status ("ok", "invalid argument", ...). Static storage.
 * Unknown values give "unknown status". Any thread. */
PYR_API const char* pyr_status_str(pyr_status status);

/* ---------------------------------------------------------------------------------------
 * Logging (process-wide). Errors never depend on the log: they are always returned.
 * ------------------------------------------------------------------------------------- */

typedef enum pyr_log_level {
    PYR_LOG_DEBUG = 0,
    PYR_LOG_INFO = 1,
    PYR_LOG_WARN = 2,
    PYR_LOG_ERROR = 3,
    PYR_LOG_NONE = 4
} pyr_log_level;

/* Messages below `level` are dropped. Default PYR_LOG_WARN. Any thread. */
PYR_API void pyr_log_set_level(pyr_log_level level);

/* Receives each message that passes the level; `message` is valid during the call only.
 * The callback may be called from any thread that uses the library, one call at a time
 * (other threads' messages wait meanwhile); it may itself call the library, this function
 * included. NULL restores the default (standard error). Not wrapped by the language
 * bindings. */
typedef void (*pyr_log_callback)(pyr_log_level level, const char* message, void* user_data);
PYR_API void pyr_log_set_callback(pyr_log_callback callback, void* user_data);

/* ---------------------------------------------------------------------------------------
 * Engine: a loaded model
 * ------------------------------------------------------------------------------------- */

typedef struct pyr_engine pyr_engine;

typedef struct pyr_engine_params {
    uint32_t struct_size;      /* sizeof(pyr_engine_params); set by pyr_engine_params_init */
    const char* device;        /* "auto" (CUDA if present, else CPU), "cpu", "cuda", "cuda:N".
                                  NULL means "auto". Copied; need not outlive the call.
                                  On CUDA, every call leaves the calling thread's current
                                  device (cudaSetDevice) as it found it. */
    int32_t n_threads;         /* CPU worker threads; 0 = all hardware threads */
    int32_t prefill_chunk;     /* prefill tokens per forward (default 512): longer input is
                                  processed in chunks of this size, so that other sessions'
                                  decode steps, which join every forward, wait at most one
                                  chunk. A session's first prefill under a compressing KV
                                  policy is never split (its selection needs the whole
                                  prompt). 0 = no limit. */
    uint64_t max_device_bytes; /* memory budget, 0 = none: on a CUDA device for weights + KV
                                  + scratch; on the CPU for the sessions' KV caches (the
                                  weights are mapped from the checkpoint). A step that would
                                  pass it fails with PYR_ERR_OUT_OF_MEMORY and leaves its
                                  session as before the step; other sessions go on. */
} pyr_engine_params;

/* Fills `params` with defaults (struct_size set). NULL is a harmless no-op. Any thread. */
PYR_API void pyr_engine_params_init(pyr_engine_params* params);

/* The bundled demo model's directory (tiny-code-llama) as installed or built, so that a
 * program works without a model of its own. Static storage. Any thread. */
PYR_API const char* pyr_default_model_dir(void);

/* Loads the HF LLaMA checkpoint in directory `model_dir` (config.json, model.safetensors or
 * model.safetensors.index.json with its shards, tokenizer.model).
 * `params` may be NULL for defaults; otherwise params->struct_size must be
 * sizeof(pyr_engine_params) from a pyr_engine_params_init() call.
 * On success *out_engine is a new engine and PYR_OK is returned.
 * On failure a status is returned and, sqlite3_open-style, *out_engine is still set to a
 * handle whose pyr_engine_errmsg() says what went wrong (naming the file and the problem);
 * that handle can do nothing else and must be closed with pyr_engine_close().
 * Only when out_engine is NULL is no handle returned (PYR_ERR_INVALID_ARGUMENT).
 * Any thread. */
PYR_API pyr_status pyr_engine_open(const char* model_dir, const pyr_engine_params* params,
                                   pyr_engine** out_engine);

/* Releases the caller's reference. The engine lives on while sessions created from it
 * exist. NULL is a harmless no-op. Do not use the handle afterwards. */
PYR_API void pyr_engine_close(pyr_engine* engine);

/* The message of the last failure on this engine, or "" if there was none. The pointer is
 * valid until the next failing call on the engine or its close. NULL engine gives a
 * static message. */
PYR_API const char* pyr_engine_errmsg(const pyr_engine* engine);

/* Model facts; 0 (or "") for a NULL or failed engine. Any thread. */
PYR_API int32_t pyr_engine_n_layers(const pyr_engine* engine);
PYR_API int32_t pyr_engine_n_vocab(const pyr_engine* engine);
PYR_API int32_t pyr_engine_n_ctx_train(const pyr_engine* engine); /* max_position_embeddings */
PYR_API int32_t pyr_engine_bos_token(const pyr_engine* engine);
PYR_API int32_t pyr_engine_eos_token(const pyr_engine* engine);   /* the first eos id */
/* The device the engine runs on, e.g. "cpu". Valid while the engine lives. */
PYR_API const char* pyr_engine_device(const pyr_engine* engine);
/* Bytes of weights the engine holds (mapped or resident). */
PYR_API uint64_t pyr_engine_weights_bytes(const pyr_engine* engine);

/* Tokenizes UTF-8 `text` (adding BOS first if add_bos != 0) into `tokens`, which has room
 * for `capacity` ids. Returns the number of tokens the text needs; if that is more than
 * `capacity`, only `capacity` are written (call again with a larger buffer). Returns a
 * negative pyr_status on error (message on the engine). tokens may be NULL when capacity
 * is 0. Any thread. */
PYR_API int32_t pyr_engine_tokenize(pyr_engine* engine, const char* text, int32_t add_bos,
                                    int32_t* tokens, int32_t capacity);

/* ---------------------------------------------------------------------------------------
 * Session: one conversation
 * ------------------------------------------------------------------------------------- */

typedef struct pyr_session pyr_session;

#define PYR_SEED_RANDOM UINT64_MAX

typedef struct pyr_session_params {
    uint32_t struct_size;    /* sizeof(pyr_session_params); set by pyr_session_params_init */
    int32_t n_ctx;           /* context length in tokens; 0 = the model's max_position_embeddings */
    int32_t max_tokens;      /* tokens generated after each feed before PYR_DONE; 0 = no limit
                                (until end-of-sequence or the context is full). Default 256 */
    float temperature;       /* 0 = greedy (argmax). Default 0.8 */
    int32_t top_k;           /* keep the k most likely tokens; 0 = off. Default 40 */
    float top_p;             /* nucleus: keep the smallest set with this much mass; 1 = off.
                                Default 0.95 */
    float min_p;             /* drop tokens below min_p * p(max); 0 = off. Default 0.05 */
    float repeat_penalty;    /* divides positive / multiplies negative logits of tokens seen
                                in the last repeat_last_n tokens; 1 = off. Default 1.0 */
    int32_t repeat_last_n;   /* window of the repetition penalty; 0 = whole history. Default 64 */
    int32_t reserved0;
    uint64_t seed;           /* sampler seed; the same seed gives the same tokens.
                                PYR_SEED_RANDOM (default) draws one from the clock */

    /* KV cache compression (DESIGN.md section 5). The first prefill of a session (into an
     * empty cache) is compressed per layer; later tokens are compressed as generation.
     * Knobs that do not apply to the chosen policy are ignored. */
    const char* kv_policy;   /* "full" (default), "pyramid" (PyramidInfer), "streaming",
                                "h2o", "snapkv", "pyramidkv", or "snapshrink": SnapKV's
                                selection with the prefill shrinking from a middle layer and
                                PyramidInfer's recent window (docs/quality.md). Copied. */
    float kv_retention;      /* target mean retention in (0, 1] (kept / uncompressed tokens).
                                pyramid: solves rho, then gamma, then recent_ratio for it;
                                peers: their token budget. 1 keeps everything (generation
                                too). 0 (default) = unset: pyramid uses its knobs as given,
                                the peers use 0.5. This and the three knobs below are read
                                as the decimals they were written as (0.7f as 0.7) */
    float kv_rho;            /* pyramid: the deepest layer's retention floor. Default 0.9 */
    float kv_gamma;          /* pyramid: exponent of the layer curve. Default 1 */
    float kv_recent_ratio;   /* pyramid: recent window W = floor(ratio * P) + 1. Default 0.2 */
    int32_t kv_min_context;  /* pyramid: fewest context tokens a layer keeps. Default 64 */
    int32_t kv_sinks;        /* pyramid, streaming: first tokens always kept. Default 4 */
    int32_t kv_gen_e;        /* generation-phase block size E: compress every E new tokens.
                                Default 16; 0 = no generation-phase compression */
    int32_t kv_prefill_shrink; /* 1: only kept tokens go on to the next layer in prefill
                                  (deeper layers compute on fewer tokens); 0: every layer
                                  computes on all tokens, only caches are pruned.
                                  -1 (default) = the policy's own: on for pyramid and
                                  snapshrink, off for the others */
    int32_t kv_shrink_start; /* with shrinking, the first layer that shrinks; layers before it
                                prune only their caches and pass every token on, so that a
                                token is not lost before the layers that can judge it
                                (retrieval attention forms in middle layers).
                                -1 (default) = the policy's own: 2/5 of the layers for
                                snapshrink, 0 for the others */
    int32_t kv_obs_window;   /* queries whose attention scores the keys: snapkv/pyramidkv
                                default 32; pyramid default (-1 or 0) = its W recent rows */
    int32_t kv_pool;         /* max-pool kernel over the key scores (odd): snapkv/pyramidkv
                                default 7; pyramid default (-1 or 1) = none */
} pyr_session_params;

/* Fills `params` with defaults (struct_size set). NULL is a harmless no-op. Any thread. */
PYR_API void pyr_session_params_init(pyr_session_params* params);

/* Creates a session on `engine`. params may be NULL for defaults. On success *out_session
 * holds a new session. On failure the message is on the engine (pyr_engine_errmsg) and
 * *out_session is NULL. Any thread. */
PYR_API pyr_status pyr_session_create(pyr_engine* engine, const pyr_session_params* params,
                                      pyr_session** out_session);

/* Frees the session and its KV cache, and releases its engine reference. NULL is a
 * harmless no-op. No other call on the session may be in flight. */
PYR_API void pyr_session_destroy(pyr_session* session);

/* The message of the last failure on this session, or "". Valid until the next call on
 * the session. NULL session gives a static message. */
PYR_API const char* pyr_session_errmsg(const pyr_session* session);

/* Appends UTF-8 text to the session's input. A BOS token is put first when the session's
 * history is empty. Nothing is computed yet: the next pyr_session_prefill/next does it.
 * Fails with PYR_ERR_CONTEXT_FULL (input unchanged) if history + input would not fit in
 * n_ctx. Resets the max_tokens count. */
PYR_API pyr_status pyr_session_feed_text(pyr_session* session, const char* text);

/* Appends token ids exactly as given (no BOS is added). Ids must be in [0, n_vocab).
 * Otherwise as pyr_session_feed_text. */
PYR_API pyr_status pyr_session_feed_tokens(pyr_session* session, const int32_t* tokens,
                                           int32_t n_tokens);

/* Runs the model over the fed input that has not been processed yet, so that its KV cache
 * is filled and the logits of the last token are available. Returns PYR_OK (also when
 * there was nothing to do), PYR_CANCELLED or an error; then the history and the queued
 * input are as before the call, and the next call goes on from where this one stopped:
 * input longer than the engine's prefill_chunk runs in chunks, and those that completed
 * stay in the cache. One more case: PYR_ERR_OUT_OF_MEMORY from the KV policy compressing the
 * cache after a chunk ran (the device cannot take the moves now) leaves that chunk processed;
 * the cache is compressed after a later step. pyr_session_next() calls it implicitly. */
PYR_API pyr_status pyr_session_prefill(pyr_session* session);

/* Produces the next token: processes pending input, samples one token and returns
 *   PYR_OK         a token is ready: read pyr_session_token() and pyr_session_text();
 *   PYR_DONE       end-of-sequence was sampled, max_tokens were produced or the context is
 *                  full; pyr_session_text() holds the flushed tail of the text (maybe "");
 *                  further calls keep returning PYR_DONE until more input is fed;
 *   PYR_CANCELLED  pyr_session_cancel() was called; no token was produced (completed chunks
 *                  of pending input stay processed, as in pyr_session_prefill);
 *   an error       the message is on the session (after the out-of-memory case of
 *                  pyr_session_prefill, the next call samples from the step that ran).
 * The sampled token becomes part of the history (it is computed by the following call).
 * The end-of-sequence token is part of the history too but has no text. */
PYR_API pyr_status pyr_session_next(pyr_session* session);

/* The id of the token produced by the last PYR_OK (or end-of-sequence at PYR_DONE);
 * -1 if none. */
PYR_API int32_t pyr_session_token(const pyr_session* session);

/* The text produced by the last pyr_session_next(): only whole UTF-8 code points; an
 * incomplete character is held back until it completes, and flushed at PYR_DONE (invalid
 * bytes become U+FFFD). A generation left before PYR_DONE (more input fed, or a reset)
 * drops what it held back. Maybe "". Valid until the next call on the session. */
PYR_API const char* pyr_session_text(const pyr_session* session);

/* The logits (n_vocab floats, raw model output before any sampling transform) of the last
 * processed token, or NULL if none. Valid until the next feed/prefill/next/reset. On a GPU,
 * where pyr_session_next picks the token on the device, the first call after a step copies
 * them back; NULL then also means that copy failed (pyr_session_errmsg says why). */
PYR_API const float* pyr_session_logits(const pyr_session* session);
/* One logit of the same vector; 0 if out of range or none. */
PYR_API float pyr_session_logit(const pyr_session* session, int32_t token);

/* Asks a running (or the next) prefill/next/generate call on this session to stop: it
 * returns PYR_CANCELLED at the next layer or token boundary, and the request is used up.
 * Any thread, while the session lives. */
PYR_API void pyr_session_cancel(pyr_session* session);

/* Clears the history, pending input, KV cache and sampler state (the seed restarts). On a
 * GPU the fresh cache's page tables are made before the old cache is given back: when they
 * do not fit, PYR_ERR_OUT_OF_MEMORY and the session is as it was. */
PYR_API pyr_status pyr_session_reset(pyr_session* session);

/* Callback-style generation for C and C++ users (not wrapped by the bindings): feeds
 * `prompt` (may be NULL or "" to continue) and calls `on_token` for every produced token
 * with its id and text (the final call at the end carries token -1 and the flushed tail,
 * if any is left). Return non-zero from the callback to stop early (status PYR_OK).
 * Returns PYR_OK/PYR_DONE-style completion as PYR_OK, or PYR_CANCELLED, or an error.
 * It is pyr_session_feed_text then pyr_session_next until done, and fails as they do: a
 * prompt that was fed stays in the history when a later step fails or is cancelled, so to
 * retry, call it again with NULL (or pyr_session_reset to start over). */
typedef int32_t (*pyr_token_callback)(int32_t token, const char* text, void* user_data);
PYR_API pyr_status pyr_session_generate(pyr_session* session, const char* prompt,
                                        pyr_token_callback on_token, void* user_data);

/* ---------------------------------------------------------------------------------------
 * Memory. Getters are safe from any thread while the session lives; they report the state
 * after the last completed step. Out-of-range layers give 0.
 * ------------------------------------------------------------------------------------- */

/* Tokens in the session's history (fed and generated, processed or not). */
PYR_API int32_t pyr_session_n_tokens(const pyr_session* session);
/* Of them, the tokens processed by the model so far. A long prefill advances it chunk by
 * chunk (prefill_chunk), so another thread can show its progress. */
PYR_API int32_t pyr_session_n_processed(const pyr_session* session);
/* KV bytes the session's cache holds now (all layers). */
PYR_API uint64_t pyr_session_kv_bytes(const pyr_session* session);
/* KV bytes an uncompressed cache would hold for the same processed tokens. */
PYR_API uint64_t pyr_session_kv_bytes_full(const pyr_session* session);
/* Tokens cached and their KV bytes in one layer. */
PYR_API int32_t pyr_session_layer_tokens(const pyr_session* session, int32_t layer);
PYR_API uint64_t pyr_session_layer_bytes(const pyr_session* session, int32_t layer);

/* A parameter of the session's KV policy as used: "rho", "gamma", "recent_ratio",
 * "min_context", "sinks", "gen_e", "window" (W), "prefill_shrink", "shrink_start",
 * "obs_window", "pool",
 * "retention" (the target), "planned_retention" (pyramid's plan), "budget" (peers' tokens
 * per layer). Values that depend on the prompt length are known after the first prefill.
 * NaN for an unknown name, a NULL argument, or a value not known yet. Any thread. */
PYR_API double pyr_session_kv_param(const pyr_session* session, const char* name);

/* Which cache state pyr_session_layer_positions reports. */
typedef enum pyr_kv_when {
    PYR_KV_NOW = 0,           /* after the last completed step */
    PYR_KV_AFTER_PREFILL = 1  /* right after the session's first prefill */
} pyr_kv_when;

/* Copies the original positions of the tokens cached in `layer` (ascending) into `out`,
 * at most `capacity` of them, and returns how many there are (call with capacity 0 to
 * size the buffer). 0 for bad arguments. Any thread; during a step of this session (one
 * prefill chunk or one token) it waits for the step to end, as the positions are read from
 * the cache itself. The other memory getters never wait. */
PYR_API int32_t pyr_session_layer_positions(const pyr_session* session, int32_t layer,
                                            pyr_kv_when when, int32_t* out, int32_t capacity);

/* KV bytes a session with these params would need at its full context (uncompressed),
 * so callers can budget before creating it: what the engine's memory budget counts for it
 * (on a GPU, each layer's cache in whole pages of 64 tokens plus its page table, and the
 * session's last logits, n_vocab floats, which stay on the device for sampling). params
 * may be NULL for defaults. */
PYR_API uint64_t pyr_engine_session_bytes_estimate(const pyr_engine* engine,
                                                   const pyr_session_params* params);

#ifdef __cplusplus
}
#endif

#endif /* PYRAMID_H */
