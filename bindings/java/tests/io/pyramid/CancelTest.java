package io.pyramid;

import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertThrows;
import static org.junit.Assert.assertTrue;

import java.util.ArrayList;
import java.util.Iterator;
import java.util.List;
import org.junit.AfterClass;
import org.junit.BeforeClass;
import org.junit.Test;

/** cancel() and close() from another thread stop a running generation. */
public class CancelTest {
    private static Model model;

    @BeforeClass
    public static void open() {
        model = Reference.openModel();
    }

    @AfterClass
    public static void close() {
        model.close();
    }

    private static Session unlimited() {
        return new Session(model, p -> {
            p.setTemperature(0);
            p.setMaxTokens(0);
        });
    }

    private static Thread after(long millis, Runnable action) {
        Thread thread = new Thread(() -> {
            try {
                Thread.sleep(millis);
            } catch (InterruptedException e) {
                return;
            }
            action.run();
        });
        thread.start();
        return thread;
    }

    @Test
    public void cancelStopsALongPrefill() throws Exception {
        try (Session session = unlimited()) {
            List<Piece> pieces = new ArrayList<>();
            long start = System.nanoTime();
            Thread canceller = after(100, session::cancel);
            PyramidException e = assertThrows(PyramidException.class, () -> {
                for (Piece piece : session.generateTokens(Reference.LONG_PROMPT)) pieces.add(piece);
            });
            canceller.join();
            assertEquals(Status.CANCELLED, e.status());
            assertEquals(0, pieces.size()); // stopped inside the first prefill
            assertTrue((System.nanoTime() - start) / 1e9 < 30);
            assertEquals(0, session.memory().kvBytes()); // as before the call
            assertTrue(session.nTokens() > 1000);       // the prompt stays queued
        }
    }

    @Test
    public void cancelAfterTheFirstPiece() throws Exception {
        try (Session session = unlimited()) {
            Iterator<Piece> stream = session.generateTokens(Reference.FIBONACCI).iterator();
            assertTrue(stream.hasNext());
            stream.next();
            Thread canceller = new Thread(session::cancel);
            canceller.start();
            canceller.join();
            PyramidException e = assertThrows(PyramidException.class, stream::hasNext);
            assertEquals(Status.CANCELLED, e.status());
            // The request was used up: the session goes on where it stopped.
            Iterator<Piece> more = session.generateTokens(null).iterator();
            assertTrue(more.hasNext());
        }
    }

    @Test
    public void closeFromAnotherThreadInterruptsGeneration() throws Exception {
        Session session = unlimited();
        Thread closer = after(100, session::close);
        PyramidException e = assertThrows(PyramidException.class, () -> {
            for (String piece : session.generate(Reference.LONG_PROMPT)) {
                assertTrue(piece != null);
            }
        });
        closer.join();
        assertTrue(e.status() == Status.CANCELLED || e.status() == Status.ERR_STATE);
        assertTrue(session.isClosed());
    }
}
