package io.pyramid;

import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertThrows;
import static org.junit.Assert.assertTrue;

import java.util.Iterator;
import java.util.function.Consumer;
import org.junit.Test;

/** Failures throw PyramidException with the status and the library's message; closed
 *  objects throw instead of crashing. */
public class ErrorsTest extends WithModel {
    @Test
    public void missingModelDirectory() {
        PyramidException e = assertThrows(PyramidException.class,
            () -> new Model("/nonexistent/pyramid-model"));
        assertEquals(Status.ERR_IO, e.status());
        assertTrue(e.message(), e.message().contains("/nonexistent/pyramid-model"));
    }

    private static void badSessionParameter(Consumer<SessionParams> configure, String needle) {
        PyramidException e = assertThrows(PyramidException.class,
            () -> new Session(model, configure));
        assertEquals(Status.ERR_INVALID_ARGUMENT, e.status());
        assertTrue(e.message(), e.message().contains(needle));
    }

    @Test
    public void badSessionParameters() {
        badSessionParameter(p -> p.setTopP(0), "top_p");
        badSessionParameter(p -> p.setKvPolicy("nope"), "nope");
        badSessionParameter(p -> p.setMaxTokens(-1), "max_tokens");
    }

    @Test
    public void sessionErrorsCarryTheSessionMessage() {
        try (Session session = new Session(model, p -> p.setNCtx(8))) {
            PyramidException e = assertThrows(PyramidException.class,
                () -> session.generate(null).iterator().hasNext());
            assertEquals(Status.ERR_STATE, e.status());
            e = assertThrows(PyramidException.class,
                () -> session.feed("def f(x):\n    return x + 1\n\nprint(f(41))\n"));
            assertEquals(Status.ERR_CONTEXT_FULL, e.status());
            e = assertThrows(PyramidException.class, () -> session.feedTokens(new int[] {1, 999999}));
            assertTrue(e.message(), e.message().contains("999999"));
        }
    }

    @Test
    public void closingTheModelFirstKeepsSessionsWorking() {
        Model own = Reference.openModel();
        Session session = new Session(own, p -> {
            p.setTemperature(0);
            p.setMaxTokens(3);
        });
        own.close();
        own.close(); // idempotent
        StringBuilder text = new StringBuilder();
        session.generate("import os", text::append);
        assertTrue(session.nTokens() > 3);
        assertEquals(Status.ERR_STATE,
            assertThrows(PyramidException.class, () -> own.tokenize("x", true)).status());
        assertThrows(PyramidException.class, () -> new Session(own));
        session.close();
    }

    @Test
    public void closedSessionThrows() {
        Session session = new Session(model, p -> p.setMaxTokens(3));
        Iterator<String> stream = session.generate(Reference.FIBONACCI).iterator();
        session.close();
        assertTrue(session.isClosed());
        PyramidException e = assertThrows(PyramidException.class, stream::hasNext);
        assertEquals(Status.ERR_STATE, e.status());
        assertTrue(e.message(), e.message().contains("session is closed"));
        assertThrows(PyramidException.class, () -> session.feed("x"));
        assertThrows(PyramidException.class, session::memory);
        assertThrows(PyramidException.class, session::nTokens);
        session.cancel(); // nothing to cancel: a no-op
        session.close();
    }
}
