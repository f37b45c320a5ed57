/* The C API used from plain C (this file is compiled as C11): handles, errors, streaming,
 * the callback variant, context overflow, and cancel from a second thread.
 * Prints "N passed, N failed" and exits non-zero on any failure. */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "pyramid.h"

static atomic_int g_passed, g_failed; /* CHECKs run on several threads too */

#define CHECK(cond)                                                             \
    do {                                                                        \
        if (cond) {                                                             \
            ++g_passed;                                                         \
        } else {                                                                \
            ++g_failed;                                                         \
            fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
        }                                                                       \
    } while (0)

static int contains(const char* haystack, const char* needle) {
    return haystack && strstr(haystack, needle) != NULL;
}

static pyr_engine* open_bundled(void) {
    pyr_engine_params ep;
    pyr_engine_params_init(&ep);
    ep.device = "cpu";
    pyr_engine* engine = NULL;
    pyr_status st = pyr_engine_open(PYR_TEST_MODEL_DIR, &ep, &engine);
    if (st != PYR_OK) {
        fprintf(stderr, "cannot open the bundled model: %s\n", pyr_engine_errmsg(engine));
        exit(1);
    }
    return engine;
}

static pyr_session* greedy_session(pyr_engine* engine, int32_t max_tokens, int32_t n_ctx) {
    pyr_session_params sp;
    pyr_session_params_init(&sp);
    sp.temperature = 0.0f;
    sp.max_tokens = max_tokens;
    sp.n_ctx = n_ctx;
    pyr_session* session = NULL;
    CHECK(pyr_session_create(engine, &sp, &session) == PYR_OK);
    return session;
}

static void test_version_and_status(void) {
    CHECK(pyr_abi_version() == PYR_ABI_VERSION);
    CHECK(strlen(pyr_version_string()) >= 5);
    CHECK(strcmp(pyr_status_str(PYR_OK), "ok") == 0);
    CHECK(strcmp(pyr_status_str(PYR_ERR_CONTEXT_FULL), "context full") == 0);
    CHECK(strcmp(pyr_status_str((pyr_status)12345), "unknown status") == 0);
}

static void test_null_handles(void) {
    CHECK(pyr_engine_open(PYR_TEST_MODEL_DIR, NULL, NULL) == PYR_ERR_INVALID_ARGUMENT);
    CHECK(pyr_session_create(NULL, NULL, NULL) == PYR_ERR_INVALID_ARGUMENT);
    CHECK(pyr_session_feed_text(NULL, "x") == PYR_ERR_INVALID_ARGUMENT);
    CHECK(pyr_session_feed_tokens(NULL, NULL, 0) == PYR_ERR_INVALID_ARGUMENT);
    CHECK(pyr_session_next(NULL) == PYR_ERR_INVALID_ARGUMENT);
    CHECK(pyr_session_prefill(NULL) == PYR_ERR_INVALID_ARGUMENT);
    CHECK(pyr_session_reset(NULL) == PYR_ERR_INVALID_ARGUMENT);
    CHECK(pyr_session_generate(NULL, "x", NULL, NULL) == PYR_ERR_INVALID_ARGUMENT);
    CHECK(strlen(pyr_engine_errmsg(NULL)) > 0);
    CHECK(strlen(pyr_session_errmsg(NULL)) > 0);
    CHECK(pyr_session_token(NULL) == -1);
    CHECK(pyr_session_kv_bytes(NULL) == 0);
    CHECK(pyr_session_layer_tokens(NULL, 0) == 0);
    CHECK(pyr_engine_n_layers(NULL) == 0);
    pyr_session_cancel(NULL);
    pyr_session_destroy(NULL);
    pyr_engine_close(NULL);
    pyr_engine_params_init(NULL);
    pyr_session_params_init(NULL);
}

static void test_open_errors(void) {
    pyr_engine* engine = NULL;
    pyr_status st = pyr_engine_open("/nonexistent/pyramid-model", NULL, &engine);
    CHECK(st == PYR_ERR_IO);
    CHECK(engine != NULL); /* sqlite3_open style: a handle carrying the message */
    CHECK(contains(pyr_engine_errmsg(engine), "/nonexistent/pyramid-model"));
    pyr_session* session = NULL;
    CHECK(pyr_session_create(engine, NULL, &session) == PYR_ERR_STATE);
    CHECK(session == NULL);
    pyr_engine_close(engine);

    pyr_engine_params ep;
    pyr_engine_params_init(&ep);
    ep.struct_size = 3;
    engine = NULL;
    CHECK(pyr_engine_open(PYR_TEST_MODEL_DIR, &ep, &engine) == PYR_ERR_INVALID_ARGUMENT);
    CHECK(contains(pyr_engine_errmsg(engine), "struct_size"));
    pyr_engine_close(engine);

    pyr_engine_params_init(&ep);
    ep.device = "tpu:7";
    engine = NULL;
    CHECK(pyr_engine_open(PYR_TEST_MODEL_DIR, &ep, &engine) == PYR_ERR_INVALID_ARGUMENT);
    CHECK(contains(pyr_engine_errmsg(engine), "tpu:7"));
    pyr_engine_close(engine);
}

static void test_session_errors(pyr_engine* engine) {
    pyr_session_params sp;
    pyr_session_params_init(&sp);
    sp.struct_size = sizeof(sp) - 4;
    pyr_session* session = NULL;
    CHECK(pyr_session_create(engine, &sp, &session) == PYR_ERR_INVALID_ARGUMENT);
    CHECK(contains(pyr_engine_errmsg(engine), "struct_size"));
    CHECK(session == NULL);

    pyr_session_params_init(&sp);
    sp.kv_policy = "no-such-policy";
    CHECK(pyr_session_create(engine, &sp, &session) == PYR_ERR_INVALID_ARGUMENT);
    CHECK(contains(pyr_engine_errmsg(engine), "no-such-policy"));

    pyr_session_params_init(&sp);
    sp.top_p = 0.0f;
    CHECK(pyr_session_create(engine, &sp, &session) == PYR_ERR_INVALID_ARGUMENT);
    CHECK(contains(pyr_engine_errmsg(engine), "top_p"));

    session = greedy_session(engine, 4, 16);
    CHECK(pyr_session_next(session) == PYR_ERR_STATE); /* nothing fed */
    CHECK(contains(pyr_session_errmsg(session), "feed"));
    int32_t bad[2] = {1, 999999};
    CHECK(pyr_session_feed_tokens(session, bad, 2) == PYR_ERR_INVALID_ARGUMENT);
    CHECK(contains(pyr_session_errmsg(session), "999999"));
    CHECK(pyr_session_n_tokens(session) == 0); /* nothing was queued */

    /* A prompt longer than the context: a clear status, the session untouched. */
    const char* long_prompt = "def f(x):\n    return x + 1\n\nprint(f(41))\n";
    CHECK(pyr_session_feed_text(session, long_prompt) == PYR_ERR_CONTEXT_FULL);
    CHECK(contains(pyr_session_errmsg(session), "context"));
    CHECK(pyr_session_n_tokens(session) == 0);
    CHECK(pyr_session_feed_text(session, "x = 1") == PYR_OK);
    pyr_status st;
    int produced = 0;
    while ((st = pyr_session_next(session)) == PYR_OK) ++produced;
    CHECK(st == PYR_DONE);
    CHECK(produced <= 4);
    CHECK(pyr_session_next(session) == PYR_DONE); /* stays done */
    pyr_session_destroy(session);
}

/* ---- streaming: pull and callback give the same greedy tokens ------------------------ */

typedef struct {
    int32_t tokens[64];
    int n;
    char text[4096];
} collected;

static int32_t collect(int32_t token, const char* text, void* user) {
    collected* c = (collected*)user;
    if (token >= 0 && c->n < 64) c->tokens[c->n++] = token;
    strncat(c->text, text, sizeof(c->text) - strlen(c->text) - 1);
    return 0;
}

static void test_streaming(pyr_engine* engine) {
    collected pull, push;
    memset(&pull, 0, sizeof pull);
    memset(&push, 0, sizeof push);

    pyr_session* session = greedy_session(engine, 24, 0);
    CHECK(pyr_session_feed_text(session, "def fibonacci(n):") == PYR_OK);
    pyr_status st;
    while ((st = pyr_session_next(session)) == PYR_OK)
        collect(pyr_session_token(session), pyr_session_text(session), &pull);
    CHECK(st == PYR_DONE);
    collect(-1, pyr_session_text(session), &pull);
    CHECK(pull.n > 0);
    CHECK(strlen(pull.text) > 0);
    CHECK(pyr_session_kv_bytes(session) > 0);
    CHECK(pyr_session_kv_bytes(session) == pyr_session_kv_bytes_full(session));
    uint64_t sum = 0;
    for (int32_t il = 0; il < pyr_engine_n_layers(engine); ++il) sum += pyr_session_layer_bytes(session, il);
    CHECK(sum == pyr_session_kv_bytes(session));

    CHECK(pyr_session_reset(session) == PYR_OK);
    CHECK(pyr_session_kv_bytes(session) == 0);
    CHECK(pyr_session_generate(session, "def fibonacci(n):", collect, &push) == PYR_OK);
    CHECK(push.n == pull.n);
    CHECK(memcmp(push.tokens, pull.tokens, sizeof(int32_t) * (size_t)pull.n) == 0);
    CHECK(strcmp(push.text, pull.text) == 0);
    pyr_session_destroy(session);
}

/* ---- cancel from a second thread during a long prefill -------------------------------- */

typedef struct {
    pyr_session* session;
    atomic_int go; /* set once the main thread is about to prefill */
} cancel_job;

static void* cancel_later(void* arg) {
    cancel_job* job = (cancel_job*)arg;
    while (!atomic_load(&job->go)) {
    }
    struct timespec ts = {0, 100 * 1000 * 1000};
    nanosleep(&ts, NULL);
    pyr_session_cancel(job->session);
    return NULL;
}

static void test_cancel_from_thread(pyr_engine* engine) {
    /* ~1500 tokens of code: a prefill that takes far longer than 100 ms on a CPU. */
    char* prompt = malloc(64 * 1024);
    prompt[0] = '\0';
    for (int i = 0; i < 60; ++i)
        strcat(prompt, "def add(a, b):\n    return a + b\n\nresult = add(1, 2)\n");
    pyr_session* session = greedy_session(engine, 1, 0);
    CHECK(pyr_session_feed_text(session, prompt) == PYR_OK);
    int32_t n_fed = pyr_session_n_tokens(session);
    CHECK(n_fed > 1000);

    cancel_job job = {session, 0};
    pthread_t thread;
    pthread_create(&thread, NULL, cancel_later, &job);
    atomic_store(&job.go, 1);
    pyr_status st = pyr_session_prefill(session);
    pthread_join(thread, NULL);
    CHECK(st == PYR_CANCELLED);
    /* The input still queued; cached are only the prefill chunks that completed (the
     * default prefill_chunk: 512 tokens), maybe none. */
    CHECK(pyr_session_n_tokens(session) == n_fed);
    int32_t done = pyr_session_layer_tokens(session, 0);
    CHECK(done % 512 == 0 && done < n_fed);
    /* The request was used up: the next call runs to the end. */
    CHECK(pyr_session_next(session) == PYR_OK);
    CHECK(pyr_session_layer_tokens(session, 0) == n_fed);
    pyr_session_destroy(session);
    free(prompt);
}

/* ---- sessions on several threads share the engine's forwards (batching) ------------- */

typedef struct {
    pyr_engine* engine;
    const char* prompt;
    collected out;
    pyr_status status;
} generate_job;

static void* generate_on_thread(void* arg) {
    generate_job* job = (generate_job*)arg;
    pyr_session* session = greedy_session(job->engine, 20, 0);
    job->status = pyr_session_generate(session, job->prompt, collect, &job->out);
    pyr_session_destroy(session);
    return NULL;
}

static void test_concurrent_sessions(pyr_engine* engine) {
    const char* prompts[3] = {"def fibonacci(n):", "import os\nimport sys\n\ndef main():",
                              "class Stack:\n    def __init__(self):"};
    generate_job together[3], alone[3];
    memset(together, 0, sizeof together);
    memset(alone, 0, sizeof alone);
    pthread_t threads[3];
    for (int i = 0; i < 3; ++i) {
        together[i].engine = alone[i].engine = engine;
        together[i].prompt = alone[i].prompt = prompts[i];
        pthread_create(&threads[i], NULL, generate_on_thread, &together[i]);
    }
    for (int i = 0; i < 3; ++i) pthread_join(threads[i], NULL);
    for (int i = 0; i < 3; ++i) {
        generate_on_thread(&alone[i]);
        CHECK(together[i].status == PYR_OK);
        CHECK(together[i].out.n == alone[i].out.n);
        CHECK(memcmp(together[i].out.tokens, alone[i].out.tokens,
                     sizeof(int32_t) * (size_t)alone[i].out.n) == 0);
        CHECK(strcmp(together[i].out.text, alone[i].out.text) == 0);
    }
}

/* Closing the engine before its sessions is allowed: sessions keep it alive. */
static void test_close_order(void) {
    pyr_engine* engine = open_bundled();
    pyr_session* session = greedy_session(engine, 3, 64);
    pyr_engine_close(engine);
    CHECK(pyr_session_feed_text(session, "import os") == PYR_OK);
    CHECK(pyr_session_next(session) == PYR_OK);
    pyr_session_destroy(session);
}

/* A log callback that calls the library on its own thread: it unregisters itself (the
 * library's log lock was taken again by the same thread: a deadlock before). */
static atomic_int g_logged;
static void log_once(pyr_log_level level, const char* message, void* user_data) {
    (void)level;
    (void)user_data;
    if (contains(message, "n_ctx")) ++g_logged;
    pyr_log_set_callback(NULL, NULL);
}

static void test_log_callback_reentry(pyr_engine* engine) {
    pyr_log_set_callback(log_once, NULL);
    pyr_session* session = greedy_session(engine, 1, 1 << 20); /* past the trained context: a warning */
    CHECK(atomic_load(&g_logged) == 1);
    pyr_session_destroy(session);
    session = greedy_session(engine, 1, 1 << 20); /* to standard error now */
    CHECK(atomic_load(&g_logged) == 1);
    pyr_session_destroy(session);
}

int main(void) {
    test_version_and_status();
    test_null_handles();
    test_open_errors();
    pyr_engine* engine = open_bundled();
    test_session_errors(engine);
    test_streaming(engine);
    test_cancel_from_thread(engine);
    test_concurrent_sessions(engine);
    test_log_callback_reentry(engine);
    pyr_engine_close(engine);
    test_close_order();
    printf("%d passed, %d failed\n", atomic_load(&g_passed), atomic_load(&g_failed));
    return atomic_load(&g_failed) == 0 ? 0 : 1;
}
