package io.pyramid;

import java.nio.charset.StandardCharsets;

/** Strings to and from the UTF-8 bytes that cross JNI (see pyramid_java.i for why). */
final class Utf8 {
    private Utf8() {}

    static byte[] encode(String s) {
        return s == null ? null : s.getBytes(StandardCharsets.UTF_8);
    }

    static String decode(byte[] bytes) {
        return bytes == null ? null : new String(bytes, StandardCharsets.UTF_8);
    }
}
