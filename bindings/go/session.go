package pyramid

import (
	"context"
	"math"
	"sync"
	"sync/atomic"

	"pyramid/internal/capi"
)

// SessionParams is the SWIG proxy of pyr_session_params, with a setter per field of the
// header's struct (SetTemperature, SetMaxTokens, SetKvPolicy, SetKvRetention, ...).
// Options receive it after pyr_session_params_init has filled in the defaults.
type SessionParams = capi.SessionParams

// SessionOption sets session parameters:
//
//	model.NewSession(func(p pyramid.SessionParams) { p.SetTemperature(0); p.SetMaxTokens(64) })
type SessionOption func(SessionParams)

// Session is one conversation (pyr_session): history, sampler, KV cache. Use it from one
// goroutine at a time; Cancel, Memory and NTokens may be called from any goroutine.
type Session struct {
	h       *handle[capi.Struct_SS_pyr_session]
	nLayers int
}

// NewSession creates a session; a bad parameter gives StatusInvalidArgument with the
// library's message.
func (m *Model) NewSession(opts ...SessionOption) (*Session, error) {
	params := capi.NewSessionParams()
	defer capi.DeleteSessionParams(params)
	capi.Pyr_session_params_init(params)
	for _, opt := range opts {
		opt(params)
	}
	out := capi.NewSessionOut()
	defer capi.DeleteSessionOut(out)
	s := &Session{}
	err := m.h.use(func(e capi.Struct_SS_pyr_engine) error {
		s.nLayers = capi.Pyr_engine_n_layers(e)
		if status := Status(capi.Pyr_session_create(e, params, out.Cast())); status != StatusOK {
			return &Error{Status: status, Message: capi.Pyr_engine_errmsg(e)}
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	s.h = newHandle(out.Value(), "session", capi.Pyr_session_destroy, capi.Pyr_session_cancel)
	return s, nil
}

// Close frees the session, cancelling a call in flight on another goroutine. Idempotent.
func (s *Session) Close() error {
	s.h.close()
	return nil
}

// call runs one status-returning C call; CANCELLED and errors become *Error.
func (s *Session) call(f func(capi.Struct_SS_pyr_session) capi.Enum_SS_pyr_status) (status Status, err error) {
	err = s.h.use(func(p capi.Struct_SS_pyr_session) error {
		status = Status(f(p))
		if status < 0 || status == StatusCancelled {
			return &Error{Status: status, Message: capi.Pyr_session_errmsg(p)}
		}
		return nil
	})
	return status, err
}

// Feed appends UTF-8 text (BOS first when the history is empty); it computes nothing yet.
func (s *Session) Feed(text string) error {
	_, err := s.call(func(p capi.Struct_SS_pyr_session) capi.Enum_SS_pyr_status {
		return capi.Pyr_session_feed_text(p, text)
	})
	return err
}

// FeedTokens appends token ids as given (no BOS).
func (s *Session) FeedTokens(ids []int) error {
	buf := capi.NewInt32Array(atLeastOne(len(ids)))
	defer capi.DeleteInt32Array(buf)
	for i, id := range ids {
		buf.Setitem(i, id)
	}
	_, err := s.call(func(p capi.Struct_SS_pyr_session) capi.Enum_SS_pyr_status {
		return capi.Pyr_session_feed_tokens(p, buf.Cast(), len(ids))
	})
	return err
}

// Prefill runs the model over the fed input now (generation does it implicitly).
func (s *Session) Prefill() error {
	_, err := s.call(capi.Pyr_session_prefill)
	return err
}

// Reset clears history, KV cache and sampler state.
func (s *Session) Reset() error {
	_, err := s.call(capi.Pyr_session_reset)
	return err
}

// Cancel stops the running (or the next) prefill or generation step, which then returns
// an *Error with StatusCancelled. Any goroutine; a no-op on a closed session.
func (s *Session) Cancel() {
	_ = s.h.quick(capi.Pyr_session_cancel)
}

// Generate feeds prompt (unless "") and calls yield with each piece of generated text until
// end-of-sequence, max_tokens or a full context, or until yield returns false. Ending ctx
// cancels the generation, even inside a long prefill.
func (s *Session) Generate(ctx context.Context, prompt string, yield func(piece string) bool) error {
	return s.GenerateTokens(ctx, prompt, func(_ int, piece string) bool {
		return piece == "" || yield(piece)
	})
}

// GenerateTokens is Generate with every sampled token id: yield(id, text) per token, then
// yield(-1, tail) if text was held back until the end. text holds whole UTF-8 characters
// only and may be "".
func (s *Session) GenerateTokens(ctx context.Context, prompt string, yield func(token int, piece string) bool) (err error) {
	if prompt != "" {
		if err := s.Feed(prompt); err != nil {
			return err
		}
	}
	defer s.watch(ctx, &err)()
	for {
		var token int
		var text string
		status, err := s.call(func(p capi.Struct_SS_pyr_session) capi.Enum_SS_pyr_status {
			status := capi.Pyr_session_next(p)
			token, text = capi.Pyr_session_token(p), capi.Pyr_session_text(p)
			return status
		})
		switch {
		case err != nil:
			return err
		case status == StatusDone:
			if text != "" {
				yield(-1, text)
			}
			return nil
		case !yield(token, text):
			return nil
		}
	}
}

// watch cancels the session when ctx ends during a generation and returns the function
// that stops watching. A cancel request that no call consumed would stop the session's
// next call (pyr_session_cancel is sticky), so one that raced with the end of the
// generation is used up here by an (otherwise harmless) prefill.
func (s *Session) watch(ctx context.Context, result *error) (stop func()) {
	if ctx == nil || ctx.Done() == nil {
		return func() {}
	}
	var fired int32 // atomic; sync/atomic.Bool needs Go 1.19
	var wg sync.WaitGroup
	done := make(chan struct{})
	wg.Add(1)
	go func() {
		defer wg.Done()
		select {
		case <-ctx.Done():
			atomic.StoreInt32(&fired, 1)
			s.Cancel()
		case <-done:
		}
	}()
	return func() {
		close(done)
		wg.Wait()
		if atomic.LoadInt32(&fired) == 0 {
			return
		}
		if e, ok := (*result).(*Error); ok && e.Status == StatusCancelled {
			e.cause = ctx.Err() // errors.Is(err, context.Canceled) holds
			return
		}
		_, _ = s.call(capi.Pyr_session_prefill)
	}
}

// NTokens is the number of tokens in the history (0 once closed).
func (s *Session) NTokens() (n int) {
	_ = s.h.quick(func(p capi.Struct_SS_pyr_session) { n = capi.Pyr_session_n_tokens(p) })
	return n
}

// Memory reports the KV cache's bytes and tokens, in total and per layer.
func (s *Session) Memory() (m Memory, err error) {
	err = s.h.quick(func(p capi.Struct_SS_pyr_session) {
		m.NTokens = capi.Pyr_session_n_tokens(p)
		m.NProcessed = capi.Pyr_session_n_processed(p)
		m.KVBytes = capi.Pyr_session_kv_bytes(p)
		m.KVBytesFull = capi.Pyr_session_kv_bytes_full(p)
		m.Retention = 1
		if m.KVBytesFull > 0 {
			m.Retention = float64(m.KVBytes) / float64(m.KVBytesFull)
		}
		m.Layers = make([]LayerMemory, s.nLayers)
		for il := range m.Layers {
			m.Layers[il] = LayerMemory{capi.Pyr_session_layer_tokens(p, il),
				capi.Pyr_session_layer_bytes(p, il)}
		}
	})
	return m, err
}

// KVParam is a KV policy parameter as used ("rho", "window", "budget", ...); ok is false
// if the name is unknown, the value not known yet, or the session closed.
func (s *Session) KVParam(name string) (value float64, ok bool) {
	value = math.NaN()
	_ = s.h.quick(func(p capi.Struct_SS_pyr_session) { value = capi.Pyr_session_kv_param(p, name) })
	return value, !math.IsNaN(value)
}
