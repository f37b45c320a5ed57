package io.pyramid;

import static org.junit.Assert.assertEquals;

import java.util.ArrayList;
import java.util.List;
import org.junit.AfterClass;
import org.junit.BeforeClass;
import org.junit.Test;

/** Sessions on threads share the engine's forwards (it batches their steps) and each still
 * produces what it produces alone. */
public class ConcurrencyTest {
    private static Model model;

    @BeforeClass
    public static void open() {
        model = Reference.openModel();
    }

    @AfterClass
    public static void close() {
        model.close();
    }

    private static List<Integer> generate(String prompt) {
        List<Integer> ids = new ArrayList<>();
        try (Session session = new Session(model, p -> {
                 p.setTemperature(0);
                 p.setMaxTokens(16);
             })) {
            for (Piece piece : session.generateTokens(prompt))
                if (piece.token() >= 0) ids.add(piece.token());
        }
        return ids;
    }

    @Test
    public void sessionsOnThreadsGenerateWhatTheyGenerateAlone() throws Exception {
        String[] prompts = {"def fibonacci(n):", "import os\nimport sys\n\ndef main():",
                            "class Stack:\n    def __init__(self):"};
        List<List<Integer>> together = new ArrayList<>();
        List<Thread> threads = new ArrayList<>();
        RuntimeException[] failure = new RuntimeException[1];
        for (String prompt : prompts) {
            List<Integer> out = new ArrayList<>();
            together.add(out);
            Thread thread = new Thread(() -> {
                try {
                    out.addAll(generate(prompt));
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
            assertEquals(prompts[i], generate(prompts[i]), together.get(i));
    }
}
