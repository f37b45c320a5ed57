package io.pyramid;

/** One step of a generation: the sampled token id (-1 for text flushed at the end) and its
 *  text (whole UTF-8 characters only; may be empty). */
public final class Piece {
    private final int token;
    private final String text;

    Piece(int token, String text) {
        this.token = token;
        this.text = text;
    }

    public int token() {
        return token;
    }

    public String text() {
        return text;
    }

    @Override
    public String toString() {
        return token + ":" + text;
    }
}
