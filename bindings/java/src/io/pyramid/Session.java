package io.pyramid;

import java.util.ArrayList;
import java.util.Iterator;
import java.util.List;
import java.util.NoSuchElementException;
import java.util.function.Consumer;

/**
 * One conversation (pyr_session): history, sampler, KV cache. Use it from one thread at a
 * time; {@link #cancel()} and {@link #memory()} work from any thread.
 *
 * <pre>{@code
 * try (Session s = new Session(model, p -> { p.setTemperature(0); p.setMaxTokens(64); })) {
 *     for (String piece : s.generate("def fibonacci(n):")) System.out.print(piece);
 * }
 * }</pre>
 */
public final class Session implements AutoCloseable {
    private final Handle<SWIGTYPE_p_pyr_session> handle;
    private final int nLayers;

    public Session(Model model) {
        this(model, p -> {});
    }

    /**
     * {@code configure} sets fields of the session params after pyr_session_params_init —
     * every field of the header's struct, by its generated setter (setTemperature,
     * setMaxTokens, setKvPolicy, setKvRetention, ...).
     *
     * @throws PyramidException ERR_INVALID_ARGUMENT with the library's message for a bad value
     */
    public Session(Model model, Consumer<SessionParams> configure) {
        nLayers = model.nLayers();
        SessionParams params = new SessionParams();
        SessionOut out = new SessionOut();
        try {
            Capi.pyr_session_params_init(params);
            configure.accept(params);
            SWIGTYPE_p_pyr_session session = model.handle.use(engine -> {
                Status status = Capi.pyr_session_create(engine, params, out.cast());
                if (status != Status.OK) {
                    throw new PyramidException(status, Capi.pyr_engine_errmsg(engine));
                }
                return out.value();
            });
            handle = new Handle<>(session, Capi::pyr_session_destroy, "session",
                Capi::pyr_session_cancel);
        } finally {
            params.delete();
            out.delete();
        }
    }

    /** Frees the session, cancelling a call in flight on another thread. Idempotent. */
    @Override
    public void close() {
        handle.close();
    }

    public boolean isClosed() {
        return handle.isClosed();
    }

    // ---- input ------------------------------------------------------------------------------

    private static Status check(SWIGTYPE_p_pyr_session s, Status status) {
        if (status.swigValue() < 0 || status == Status.CANCELLED) {
            throw new PyramidException(status, Capi.pyr_session_errmsg(s));
        }
        return status;
    }

    /** Appends UTF-8 text (BOS first when the history is empty); computes nothing yet. */
    public void feed(String text) {
        handle.use(s -> check(s, Capi.pyr_session_feed_text(s, text)));
    }

    /** Appends token ids as given (no BOS). */
    public void feedTokens(int[] tokens) {
        Int32Array buf = new Int32Array(Math.max(tokens.length, 1));
        try {
            for (int i = 0; i < tokens.length; i++) buf.setitem(i, tokens[i]);
            handle.use(s -> check(s, Capi.pyr_session_feed_tokens(s, buf.cast(), tokens.length)));
        } finally {
            buf.delete();
        }
    }

    /** Runs the model over the fed input now (generation does it implicitly). */
    public void prefill() {
        handle.use(s -> check(s, Capi.pyr_session_prefill(s)));
    }

    /** Clears history, KV cache and sampler state. */
    public void reset() {
        handle.use(s -> check(s, Capi.pyr_session_reset(s)));
    }

    /**
     * Stops the running (or the next) prefill or generation step, which then throws
     * PyramidException(CANCELLED). Any thread; a no-op on a closed session.
     */
    public void cancel() {
        try {
            handle.quick(s -> {
                Capi.pyr_session_cancel(s);
                return null;
            });
        } catch (PyramidException closed) {
            // nothing to cancel
        }
    }

    // ---- generation -------------------------------------------------------------------------

    /**
     * Feeds {@code prompt} (unless null) now and returns the generated text pieces, pulled
     * one token at a time as the caller iterates, until end-of-sequence, max_tokens or a full
     * context. One pass only. Errors (CANCELLED too) are thrown from hasNext/next.
     */
    public Iterable<String> generate(String prompt) {
        Iterable<Piece> pieces = generateTokens(prompt);
        return () -> new Iterator<String>() {
            private final Iterator<Piece> it = pieces.iterator();
            private String next;

            @Override
            public boolean hasNext() {
                while (next == null && it.hasNext()) {
                    String text = it.next().text();
                    if (!text.isEmpty()) next = text;
                }
                return next != null;
            }

            @Override
            public String next() {
                if (!hasNext()) throw new NoSuchElementException();
                String text = next;
                next = null;
                return text;
            }
        };
    }

    /** Streams {@link #generate(String)} into {@code onPiece}. */
    public void generate(String prompt, Consumer<String> onPiece) {
        for (String piece : generate(prompt)) onPiece.accept(piece);
    }

    /**
     * Like {@link #generate(String)}, with every sampled token id: a Piece per token, then
     * Piece(-1, tail) if text was held back until the end.
     */
    public Iterable<Piece> generateTokens(String prompt) {
        if (prompt != null) feed(prompt);
        Iterator<Piece> stream = new Stream();
        boolean[] taken = {false};
        return () -> {
            if (taken[0]) throw new IllegalStateException("a generation can be iterated once");
            taken[0] = true;
            return stream;
        };
    }

    /** Pulls pyr_session_next one step ahead of the caller. */
    private final class Stream implements Iterator<Piece> {
        private Piece next;
        private boolean done;

        @Override
        public boolean hasNext() {
            if (next == null && !done) next = handle.use(this::step);
            return next != null;
        }

        @Override
        public Piece next() {
            if (!hasNext()) throw new NoSuchElementException();
            Piece piece = next;
            next = null;
            return piece;
        }

        private Piece step(SWIGTYPE_p_pyr_session s) {
            Status status = check(s, Capi.pyr_session_next(s));
            String text = Capi.pyr_session_text(s);
            if (status == Status.OK) return new Piece(Capi.pyr_session_token(s), text);
            done = true; // DONE: the held-back tail of the text is flushed
            return text.isEmpty() ? null : new Piece(-1, text);
        }
    }

    // ---- state and memory (any thread) --------------------------------------------------------

    /** Tokens in the history (fed and generated). */
    public int nTokens() {
        return handle.quick(Capi::pyr_session_n_tokens);
    }

    /** The KV cache's bytes and tokens, in total and per layer. */
    public Memory memory() {
        return handle.quick(s -> {
            List<Memory.Layer> layers = new ArrayList<>(nLayers);
            for (int il = 0; il < nLayers; il++) {
                layers.add(new Memory.Layer(Capi.pyr_session_layer_tokens(s, il),
                    Capi.pyr_session_layer_bytes(s, il)));
            }
            return new Memory(Capi.pyr_session_n_tokens(s), Capi.pyr_session_n_processed(s),
                Capi.pyr_session_kv_bytes(s), Capi.pyr_session_kv_bytes_full(s), layers);
        });
    }

    /** A KV policy parameter as used ("rho", "window", "budget", ...); NaN if unknown. */
    public double kvParam(String name) {
        return handle.quick(s -> Capi.pyr_session_kv_param(s, name));
    }

    /** The raw logit of {@code token} after the last processed token (0 if none). */
    public float logit(int token) {
        return handle.quick(s -> Capi.pyr_session_logit(s, token));
    }
}
