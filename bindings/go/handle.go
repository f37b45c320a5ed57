package pyramid

import "sync"

// handle is a native pointer used by several goroutines and closed exactly once. The C
// handles are not safe to use once freed, so every call takes the pointer from here, which
// fails with StatusState after close. close() while another goroutine is inside a native
// call interrupts it (a session cancels) and waits for it to return before freeing.
type handle[T any] struct {
	mu        sync.Mutex
	idle      sync.Cond
	ptr       T
	closed    bool
	busy      int
	what      string
	destroy   func(T)
	interrupt func(T)
}

func newHandle[T any](ptr T, what string, destroy, interrupt func(T)) *handle[T] {
	h := &handle[T]{ptr: ptr, what: what, destroy: destroy, interrupt: interrupt}
	h.idle.L = &h.mu
	return h
}

// use runs a call that may take long; close waits for it.
func (h *handle[T]) use(call func(T) error) error {
	h.mu.Lock()
	if h.closed {
		h.mu.Unlock()
		return closedError(h.what)
	}
	h.busy++
	ptr := h.ptr
	h.mu.Unlock()
	defer func() {
		h.mu.Lock()
		h.busy--
		h.idle.Broadcast()
		h.mu.Unlock()
	}()
	return call(ptr)
}

// quick runs a short call (getters, cancel) under the lock, so close cannot race it.
func (h *handle[T]) quick(call func(T)) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.closed {
		return closedError(h.what)
	}
	call(h.ptr)
	return nil
}

func (h *handle[T]) isClosed() bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.closed
}

func (h *handle[T]) close() {
	h.mu.Lock()
	if h.closed {
		h.mu.Unlock()
		return
	}
	h.closed = true // from here on, new calls fail
	if h.busy > 0 && h.interrupt != nil {
		h.interrupt(h.ptr)
	}
	for h.busy > 0 {
		h.idle.Wait()
	}
	ptr := h.ptr
	h.mu.Unlock()
	h.destroy(ptr)
}
