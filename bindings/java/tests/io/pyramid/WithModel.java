package io.pyramid;

import org.junit.AfterClass;
import org.junit.BeforeClass;

/** The bundled model on the CPU, opened once per test class, and greedy sessions on it. */
abstract class WithModel {
    protected static Model model;

    @BeforeClass
    public static void openModel() {
        model = Reference.openModel();
    }

    @AfterClass
    public static void closeModel() {
        model.close();
    }

    /** A greedy session; maxTokens 0: no limit. */
    static Session greedy(int maxTokens) {
        return new Session(model, p -> {
            p.setTemperature(0);
            p.setMaxTokens(maxTokens);
        });
    }
}
