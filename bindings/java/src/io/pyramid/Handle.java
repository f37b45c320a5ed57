package io.pyramid;

import java.util.function.Consumer;
import java.util.function.Function;

/**
 * A native handle used by several threads and closed exactly once. The C handles are not
 * safe to use once freed, so every call takes the pointer from here, which throws
 * (ERR_STATE) after close. close() while another thread is inside a native call interrupts
 * it (a session cancels) and waits for it to return before freeing the handle.
 */
final class Handle<T> {
    private T ptr;
    private int busy;
    private final String what;
    private final Consumer<T> destroy;
    private final Consumer<T> interrupt;

    Handle(T ptr, Consumer<T> destroy, String what, Consumer<T> interrupt) {
        this.ptr = ptr;
        this.destroy = destroy;
        this.what = what;
        this.interrupt = interrupt;
    }

    synchronized boolean isClosed() {
        return ptr == null;
    }

    /** Runs a call that may take long; close() waits for it. */
    <R> R use(Function<T, R> call) {
        T p;
        synchronized (this) {
            if (ptr == null) throw PyramidException.closed(what);
            busy++;
            p = ptr;
        }
        try {
            return call.apply(p);
        } finally {
            synchronized (this) {
                busy--;
                notifyAll();
            }
        }
    }

    /** Runs a short call (getters, cancel) under the lock, so close() cannot race it. */
    synchronized <R> R quick(Function<T, R> call) {
        if (ptr == null) throw PyramidException.closed(what);
        return call.apply(ptr);
    }

    void close() {
        T p;
        synchronized (this) {
            if (ptr == null) return;
            p = ptr;
            ptr = null; // from here on, new calls throw
            if (busy > 0 && interrupt != null) interrupt.accept(p);
            boolean interrupted = false;
            while (busy > 0) {
                try {
                    wait();
                } catch (InterruptedException e) {
                    interrupted = true;
                }
            }
            if (interrupted) Thread.currentThread().interrupt();
        }
        destroy.accept(p);
    }
}
