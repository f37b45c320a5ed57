package pyramid_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"pyramid"
)

func TestCancelStopsALongPrefill(t *testing.T) {
	s := newSession(t, greedy(0))
	timer := time.AfterFunc(100*time.Millisecond, s.Cancel)
	defer timer.Stop()
	start := time.Now()
	n := 0
	err := s.GenerateTokens(context.Background(), longPrompt, func(int, string) bool {
		n++
		return true
	})
	wantError(t, err, pyramid.StatusCancelled, "cancel")
	if n != 0 || time.Since(start) > 30*time.Second {
		t.Fatalf("%d tokens in %v before the cancel took effect", n, time.Since(start))
	}
	// The prompt stays queued; cached are only the prefill chunks that completed (512
	// tokens by default), maybe none.
	if m, _ := s.Memory(); m.Layers[0].Tokens%512 != 0 || m.Layers[0].Tokens >= s.NTokens() || s.NTokens() < 1000 {
		t.Fatalf("not as the cancel left it: %v", m)
	}
}

func TestCancelAfterTheFirstPiece(t *testing.T) {
	s := newSession(t, greedy(0))
	n := 0
	err := s.GenerateTokens(context.Background(), fibonacci, func(int, string) bool {
		n++
		if n == 1 {
			done := make(chan struct{})
			go func() { s.Cancel(); close(done) }()
			<-done
		}
		return true
	})
	wantError(t, err, pyramid.StatusCancelled, "cancel")
	if n != 1 {
		t.Fatalf("%d pieces", n)
	}
	// The request was used up: the session goes on where it stopped.
	if err := s.GenerateTokens(context.Background(), "", func(int, string) bool { return false }); err != nil {
		t.Fatal(err)
	}
}

func TestContextEndsAGeneration(t *testing.T) {
	s := newSession(t, greedy(0))
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	err := s.Generate(ctx, longPrompt, func(string) bool { return true })
	if !errors.Is(err, pyramid.StatusCancelled) || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("%v", err)
	}
	// A context that ends after the generation leaves no cancel request behind.
	ctx, cancel = context.WithCancel(context.Background())
	s2 := newSession(t, greedy(2))
	if err := s2.Generate(ctx, fibonacci, func(string) bool { return true }); err != nil {
		t.Fatal(err)
	}
	cancel()
	if err := s2.Generate(context.Background(), "\n", func(string) bool { return true }); err != nil {
		t.Fatal(err)
	}
}

func TestCloseFromAnotherGoroutineInterruptsGeneration(t *testing.T) {
	s, err := model.NewSession(greedy(0))
	if err != nil {
		t.Fatal(err)
	}
	timer := time.AfterFunc(100*time.Millisecond, func() { s.Close() })
	defer timer.Stop()
	err = s.Generate(context.Background(), longPrompt, func(string) bool { return true })
	if !errors.Is(err, pyramid.StatusCancelled) && !errors.Is(err, pyramid.StatusState) {
		t.Fatalf("%v", err)
	}
	wantError(t, s.Feed("x"), pyramid.StatusState, "session is closed")
}
