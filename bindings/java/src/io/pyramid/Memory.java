package io.pyramid;

import java.util.Collections;
import java.util.List;

/** What a session's KV cache holds, in total and per layer. */
public final class Memory {
    /** Tokens and KV bytes cached in one layer. */
    public static final class Layer {
        private final int tokens;
        private final long bytes;

        Layer(int tokens, long bytes) {
            this.tokens = tokens;
            this.bytes = bytes;
        }

        public int tokens() {
            return tokens;
        }

        public long bytes() {
            return bytes;
        }
    }

    private final int nTokens;
    private final int nProcessed;
    private final long kvBytes;
    private final long kvBytesFull;
    private final List<Layer> layers;

    Memory(int nTokens, int nProcessed, long kvBytes, long kvBytesFull, List<Layer> layers) {
        this.nTokens = nTokens;
        this.nProcessed = nProcessed;
        this.kvBytes = kvBytes;
        this.kvBytesFull = kvBytesFull;
        this.layers = Collections.unmodifiableList(layers);
    }

    /** Tokens in the history (fed and generated). */
    public int nTokens() {
        return nTokens;
    }

    /** Of them, the tokens processed by the model so far (a prefill's progress). */
    public int nProcessed() {
        return nProcessed;
    }

    /** KV bytes held now, all layers. */
    public long kvBytes() {
        return kvBytes;
    }

    /** What an uncompressed cache would hold for the same tokens. */
    public long kvBytesFull() {
        return kvBytesFull;
    }

    /** kvBytes / kvBytesFull; 1 for an empty cache. */
    public double retention() {
        return kvBytesFull == 0 ? 1.0 : (double) kvBytes / kvBytesFull;
    }

    public List<Layer> layers() {
        return layers;
    }

    @Override
    public String toString() {
        StringBuilder perLayer = new StringBuilder();
        for (Layer layer : layers) perLayer.append(' ').append(layer.tokens());
        return String.format("KV cache %d of %d bytes (%.0f%%), tokens per layer:%s",
            kvBytes, kvBytesFull, 100 * retention(), perLayer);
    }
}
