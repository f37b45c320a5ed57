/* pyramid.i — the SWIG interface shared by the Python, Java and Go bindings.
 *
 * It wraps include/pyramid.h as it is: every function, enum, constant and params struct
 * comes from the header at build time, so a field added there (the kv_* knobs, say) reaches
 * every language on the next build without a line changed here. Each language's file
 * (python/pyramid_python.i, java/pyramid_java.i, go/internal/capi/capi.swig) sets %module,
 * its renames and typemaps, then includes this one. The idiomatic layers (pyramid/*.py,
 * io/pyramid/*.java, bindings/go/*.go) are written over what this file exposes.
 *
 * What is adapted, and why:
 *  - the callback APIs (pyr_session_generate, pyr_log_set_callback) are hidden: pull-style
 *    streaming with pyr_session_next needs no SWIG directors (DESIGN.md section 3);
 *  - out-parameters (pyr_engine**, pyr_session**) and int32_t buffers have no mapping that
 *    is the same in every language, so each gets the same two helper types from cpointer.i
 *    and carrays.i instead of a typemap per language;
 *  - struct_size is set by the *_params_init functions only, and reserved fields are
 *    hidden, so that "every field a binding may set" is exactly what SWIG exposes;
 *  - const char* params fields point at interned copies (see pyr_swig_intern below).
 */

%{
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "pyramid.h"

/* A params struct only borrows its strings (the library copies them when the struct is
 * used), but a binding's string lives only for the duration of the setter call. SWIG's
 * default would malloc a copy on every assignment and never free it; instead each distinct
 * value is copied once and kept for the life of the process (a handful of policy and device
 * names in practice). Setters may run on any thread (Python releases the GIL). */
typedef struct pyr_swig_interned {
    struct pyr_swig_interned* next;
    char text[];
} pyr_swig_interned;

static const char* pyr_swig_intern(const char* s) {
    static pyr_swig_interned* head = NULL;
    static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
    if (!s) return NULL;
    pthread_mutex_lock(&lock);
    pyr_swig_interned* p = head;
    while (p && strcmp(p->text, s) != 0) p = p->next;
    if (!p) {
        size_t n = strlen(s) + 1;
        p = (pyr_swig_interned*)malloc(sizeof(*p) + n);
        if (p) {
            memcpy(p->text, s, n);
            p->next = head;
            head = p;
        }
    }
    pthread_mutex_unlock(&lock);
    return p ? p->text : NULL;
}
%}

%include <stdint.i>
%include <cpointer.i>
%include <carrays.i>

/* ---- hidden: callbacks, raw arrays, fields the library owns ---------------------------- */
%ignore pyr_session_generate;
%ignore pyr_token_callback;
%ignore pyr_log_set_callback;
%ignore pyr_log_callback;
%ignore pyr_session_logits;          /* n_vocab floats by raw pointer: pyr_session_logit reads one */
%immutable pyr_engine_params::struct_size;
%immutable pyr_session_params::struct_size;
%ignore pyr_session_params::reserved0;

/* SWIG skips the #define (it cannot evaluate UINT64_MAX); the C compiler can. */
%constant uint64_t PYR_SEED_RANDOM = UINT64_MAX;

%typemap(memberin) const char* "$1 = pyr_swig_intern($input);"

%include "pyramid.h"

/* ---- helper types for out-parameters and token buffers ---------------------------------
 * pyr_engine_out / pyr_session_out hold one handle for pyr_engine_open and
 * pyr_session_create (value() reads it, cast() is the pyr_engine** to pass);
 * pyr_int32_array(n) is a C buffer of n int32_t for tokenize, feed_tokens and
 * layer_positions (getitem/setitem, cast() is the int32_t*). */
%inline %{
typedef pyr_engine* pyr_engine_handle;   /* %pointer_class takes a type name, not a pointer */
typedef pyr_session* pyr_session_handle;
%}
%pointer_class(pyr_engine_handle, pyr_engine_out)
%pointer_class(pyr_session_handle, pyr_session_out)
%array_class(int32_t, pyr_int32_array)

