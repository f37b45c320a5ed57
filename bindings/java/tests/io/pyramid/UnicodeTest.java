package io.pyramid;

import static org.junit.Assert.assertArrayEquals;
import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertThrows;
import static org.junit.Assert.assertTrue;

import org.junit.Test;

/** Emoji and CJK text cross JNI unchanged, both ways (UTF-8 bytes, not modified UTF-8). */
public class UnicodeTest extends WithModel {
    @Test
    public void tokenizeSeesTheExactText() {
        int[] withBos = new int[Reference.EMOJI_CJK_IDS.length + 1];
        withBos[0] = model.bosToken();
        System.arraycopy(Reference.EMOJI_CJK_IDS, 0, withBos, 1, Reference.EMOJI_CJK_IDS.length);
        assertArrayEquals(withBos, model.tokenize(Reference.EMOJI_CJK, true));
        assertArrayEquals(Reference.EMOJI_CJK_IDS, model.tokenize(Reference.EMOJI_CJK, false));
    }

    private static void generatesLikeTheCli(String prompt) throws Exception {
        StringBuilder text = new StringBuilder();
        int[] tokens;
        try (Session session = new Session(model, p -> {
            p.setTemperature(0);
            p.setMaxTokens(24);
        })) {
            tokens = Reference.tokensOf(session.generateTokens(prompt), text);
        }
        Reference.Cli cli = Reference.cli(prompt);
        assertArrayEquals(cli.tokens, tokens);
        assertEquals(cli.text, text.toString());
    }

    @Test
    public void emojiPromptGeneratesLikeTheCli() throws Exception {
        generatesLikeTheCli(Reference.EMOJI_CJK);
    }

    @Test
    public void multibyteOutputArrivesWhole() throws Exception {
        generatesLikeTheCli(Reference.CJK_PREFIX);
    }

    @Test
    public void errorMessagesCarry4ByteCharacters() {
        String path = "/nonexistent/日本語 🎉 👩\u200d💻";
        PyramidException e = assertThrows(PyramidException.class, () -> new Model(path));
        assertEquals(Status.ERR_IO, e.status());
        assertTrue(e.message(), e.message().contains(path));
    }

    @Test
    public void stringFieldsRoundTrip() {
        String policy = "nöpe 🎉";
        PyramidException e = assertThrows(PyramidException.class, () -> new Session(model, p -> {
            p.setKvPolicy(policy);
            assertEquals(policy, p.getKvPolicy());
        }));
        assertTrue(e.message(), e.message().contains(policy));
    }
}
