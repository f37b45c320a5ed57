package io.pyramid;

import java.util.function.Consumer;

/**
 * A loaded model (pyr_engine): weights, tokenizer, device. Thread-safe. Sessions keep the
 * native engine alive, so a Model may be closed before its Sessions.
 *
 * <pre>{@code
 * try (Model model = new Model(null, p -> p.setDevice("cpu"))) { ... }
 * }</pre>
 */
public final class Model implements AutoCloseable {
    private final String path;
    final Handle<SWIGTYPE_p_pyr_engine> handle;

    /** The bundled demo model on the default device. */
    public Model() {
        this(null, p -> {});
    }

    public Model(String path) {
        this(path, p -> {});
    }

    /**
     * Loads the HF LLaMA checkpoint in directory {@code path} ({@code null}: the bundled
     * model). {@code configure} sets fields of the engine params after their defaults
     * (setDevice, setNThreads, setMaxDeviceBytes, setPrefillChunk).
     *
     * @throws PyramidException with the library's message, e.g. ERR_IO naming the file
     */
    public Model(String path, Consumer<EngineParams> configure) {
        NativeLoader.checkAbi();
        this.path = path != null ? path : defaultModelDir();
        EngineParams params = new EngineParams();
        EngineOut out = new EngineOut();
        try {
            Capi.pyr_engine_params_init(params);
            configure.accept(params);
            Status status = Capi.pyr_engine_open(this.path, params, out.cast());
            SWIGTYPE_p_pyr_engine engine = out.value();
            if (status != Status.OK) {
                // sqlite3_open style: even a failed open returns a handle with the message.
                String message = Capi.pyr_engine_errmsg(engine);
                Capi.pyr_engine_close(engine);
                throw new PyramidException(status, message);
            }
            handle = new Handle<>(engine, Capi::pyr_engine_close, "model", null);
        } finally {
            params.delete();
            out.delete();
        }
    }

    /** The bundled demo model's directory (tiny-code-llama). */
    public static String defaultModelDir() {
        return Capi.pyr_default_model_dir();
    }

    public static String version() {
        return Capi.pyr_version_string();
    }

    /** Releases this reference; open Sessions keep working. Idempotent. */
    @Override
    public void close() {
        handle.close();
    }

    public boolean isClosed() {
        return handle.isClosed();
    }

    public String path() {
        return path;
    }

    public int nLayers() {
        return handle.quick(Capi::pyr_engine_n_layers);
    }

    public int nVocab() {
        return handle.quick(Capi::pyr_engine_n_vocab);
    }

    public int bosToken() {
        return handle.quick(Capi::pyr_engine_bos_token);
    }

    public int eosToken() {
        return handle.quick(Capi::pyr_engine_eos_token);
    }

    public String device() {
        return handle.quick(Capi::pyr_engine_device);
    }

    public long weightsBytes() {
        return handle.quick(Capi::pyr_engine_weights_bytes);
    }

    /** The token ids of {@code text}, with BOS first if {@code addBos}. */
    public int[] tokenize(String text, boolean addBos) {
        return handle.use(engine -> {
            int flag = addBos ? 1 : 0;
            int n = check(engine, Capi.pyr_engine_tokenize(engine, text, flag, null, 0));
            Int32Array buf = new Int32Array(Math.max(n, 1));
            try {
                n = check(engine, Capi.pyr_engine_tokenize(engine, text, flag, buf.cast(), n));
                int[] ids = new int[n];
                for (int i = 0; i < n; i++) ids[i] = buf.getitem(i);
                return ids;
            } finally {
                buf.delete();
            }
        });
    }

    /** A new session on this model; see {@link Session#Session(Model, Consumer)}. */
    public Session newSession(Consumer<SessionParams> configure) {
        return new Session(this, configure);
    }

    private static int check(SWIGTYPE_p_pyr_engine engine, int result) {
        if (result < 0) {
            throw new PyramidException(Status.swigToEnum(result), Capi.pyr_engine_errmsg(engine));
        }
        return result;
    }

    @Override
    public String toString() {
        return "Model(" + path + (isClosed() ? ", closed)" : ", " + device() + ")");
    }
}
