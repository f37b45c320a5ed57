package io.pyramid;

import static org.junit.Assume.assumeTrue;

import java.io.ByteArrayOutputStream;
import java.io.InputStream;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.List;
import java.util.regex.Matcher;
import java.util.regex.Pattern;

/** Test inputs, and pyramid-cli --json (path in -Dpyramid.cli) as the C library's output. */
final class Reference {
    static final String FIBONACCI = "def fibonacci(n):";
    /** 2-, 3- and 4-byte UTF-8 characters and a ZWJ sequence. */
    static final String EMOJI_CJK = "# 日本語 🎉 emoji 👩\u200d💻\nprint('你好')";
    /** Greedy generation after it produces CJK characters assembled from byte tokens. */
    static final String CJK_PREFIX = "s = '日本語";
    /** tests/data/fixtures/bundled_reference.json prompts[0].greedy, first 24 (HF transformers). */
    static final int[] FIBONACCI_GREEDY_24 = {
        13, 260, 374, 13, 260, 4061, 590, 267, 975, 1238, 4025, 4011, 4024, 13, 260, 374,
        13, 260, 350, 293, 4022, 1976, 4015, 1547};
    /** sentencepiece's encode of EMOJI_CJK with the bundled tokenizer.model (no BOS). */
    static final int[] EMOJI_CJK_IDS = {
        444, 4004, 233, 154, 168, 233, 159, 175, 235, 173, 161, 4004, 243, 162, 145, 140, 448,
        719, 4071, 4010, 4004, 243, 162, 148, 172, 229, 131, 144, 243, 162, 149, 190, 13, 1254,
        621, 231, 192, 163, 232, 168, 192, 738};
    /** About 1500 tokens of code: a first prefill of seconds on a CPU. */
    static final String LONG_PROMPT =
        "def add(a, b):\n    return a + b\n\nresult = add(1, 2)\n".repeat(60);

    /** The "tokens" and "text" of `pyramid-cli --json` for a greedy run of 24 tokens. */
    static final class Cli {
        final int[] tokens;
        final String text;

        Cli(int[] tokens, String text) {
            this.tokens = tokens;
            this.text = text;
        }
    }

    private Reference() {}

    static Cli cli(String prompt) throws Exception {
        String exe = System.getProperty("pyramid.cli");
        assumeTrue("-Dpyramid.cli is not set (pyramid-cli not built)", exe != null);
        Process p = new ProcessBuilder(exe, "--prompt", prompt, "--temperature", "0",
            "--max-tokens", "24", "--device", "cpu", "--json").start();
        String json;
        try (InputStream in = p.getInputStream()) {
            ByteArrayOutputStream out = new ByteArrayOutputStream();
            in.transferTo(out);
            json = out.toString(StandardCharsets.UTF_8);
        }
        if (p.waitFor() != 0) throw new AssertionError("pyramid-cli failed: " + json);
        Matcher tokens = Pattern.compile("\"tokens\":\\[([0-9,]*)\\]").matcher(json);
        Matcher text = Pattern.compile("\"text\":\"((?:[^\"\\\\]|\\\\.)*)\"").matcher(json);
        if (!tokens.find() || !text.find()) throw new AssertionError("unexpected JSON: " + json);
        List<Integer> ids = new ArrayList<>();
        for (String id : tokens.group(1).split(",")) if (!id.isEmpty()) ids.add(Integer.parseInt(id));
        return new Cli(ids.stream().mapToInt(Integer::intValue).toArray(), unescape(text.group(1)));
    }

    /** A JSON string body (RFC 8259 escapes) to its text. */
    private static String unescape(String s) {
        StringBuilder out = new StringBuilder();
        for (int i = 0; i < s.length(); i++) {
            char c = s.charAt(i);
            if (c != '\\') {
                out.append(c);
                continue;
            }
            char e = s.charAt(++i);
            switch (e) {
                case 'n': out.append('\n'); break;
                case 't': out.append('\t'); break;
                case 'r': out.append('\r'); break;
                case 'b': out.append('\b'); break;
                case 'f': out.append('\f'); break;
                case 'u': out.append((char) Integer.parseInt(s.substring(i + 1, i + 5), 16)); i += 4; break;
                default: out.append(e); // \" \\ \/
            }
        }
        return out.toString();
    }

    static Model openModel() {
        return new Model(null, p -> p.setDevice("cpu"));
    }

    static int[] tokensOf(Iterable<Piece> pieces, StringBuilder text) {
        List<Integer> ids = new ArrayList<>();
        for (Piece piece : pieces) {
            if (piece.token() >= 0) ids.add(piece.token());
            text.append(piece.text());
        }
        return ids.stream().mapToInt(Integer::intValue).toArray();
    }
}
