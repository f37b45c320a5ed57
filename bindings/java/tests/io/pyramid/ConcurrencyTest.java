package io.pyramid;

import static org.junit.Assert.assertArrayEquals;

import java.util.ArrayList;
import java.util.List;
import org.junit.Test;

/** Sessions on threads share the engine's forwards (it batches their steps) and each still
 * produces what it produces alone. */
public class ConcurrencyTest extends WithModel {
    private static int[] generate(String prompt) {
        try (Session session = greedy(16)) {
            return Reference.tokensOf(session.generateTokens(prompt), new StringBuilder());
        }
    }

    @Test
    public void sessionsOnThreadsGenerateWhatTheyGenerateAlone() throws Exception {
        String[] prompts = {Reference.FIBONACCI, "import os\nimport sys\n\ndef main():",
                            "class Stack:\n    def __init__(self):"};
        int[][] together = new int[prompts.length][];
        List<Thread> threads = new ArrayList<>();
        RuntimeException[] failure = new RuntimeException[1];
        for (int i = 0; i < prompts.length; ++i) {
            final int k = i;
            Thread thread = new Thread(() -> {
                try {
                    together[k] = generate(prompts[k]);
                } catch (RuntimeException e) {
                    failure[0] = e;
                }
            });
            threads.add(thread);
            thread.start();
        }
        for (Thread thread : threads) thread.join();
        if (failure[0] != null) throw failure[0];
        for (int i = 0; i < prompts.length; ++i)
            assertArrayEquals(prompts[i], generate(prompts[i]), together[i]);
    }
}
