package io.pyramid;

import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertThrows;
import static org.junit.Assert.assertTrue;

import java.util.ArrayList;
import java.util.Iterator;
import java.util.List;
import org.junit.Test;

/** cancel() and close() from another thread stop a running generation. */
public class CancelTest extends WithModel {
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
        try (Session session = greedy(0)) {
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
            assertTrue(session.nTokens() > 1000); // the prompt stays queued
            // cached are only the prefill chunks that completed (512 tokens by default)
            int done = session.memory().layers().get(0).tokens();
            assertTrue(done % 512 == 0 && done < session.nTokens());
        }
    }

    @Test
    public void cancelAfterTheFirstPiece() throws Exception {
        try (Session session = greedy(0)) {
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
        Session session = greedy(0);
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
