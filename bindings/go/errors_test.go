package pyramid_test

import (
	"context"
	"errors"
	"strings"
	"testing"

	"pyramid"
)

func wantError(t *testing.T, err error, status pyramid.Status, needle string) {
	t.Helper()
	var e *pyramid.Error
	if !errors.As(err, &e) || !errors.Is(err, status) || !strings.Contains(e.Message, needle) {
		t.Fatalf("want %v containing %q, got %v", status, needle, err)
	}
}

func TestMissingModelDirectory(t *testing.T) {
	_, err := pyramid.Open("/nonexistent/pyramid-model")
	wantError(t, err, pyramid.StatusIO, "/nonexistent/pyramid-model")
}

func TestBadSessionParameters(t *testing.T) {
	cases := []struct {
		set    pyramid.SessionOption
		needle string
	}{
		{func(p pyramid.SessionParams) { p.SetTopP(0) }, "top_p"},
		{func(p pyramid.SessionParams) { p.SetKvPolicy("nope") }, "nope"},
		{func(p pyramid.SessionParams) { p.SetMaxTokens(-1) }, "max_tokens"},
	}
	for _, c := range cases {
		_, err := model.NewSession(c.set)
		wantError(t, err, pyramid.StatusInvalidArgument, c.needle)
	}
}

func TestSessionErrorsCarryTheSessionMessage(t *testing.T) {
	s := newSession(t, func(p pyramid.SessionParams) { p.SetNCtx(8) })
	wantError(t, s.Generate(context.Background(), "", func(string) bool { return true }),
		pyramid.StatusState, "feed")
	wantError(t, s.Feed("def f(x):\n    return x + 1\n\nprint(f(41))\n"),
		pyramid.StatusContextFull, "context")
	wantError(t, s.FeedTokens([]int{1, 999999}), pyramid.StatusInvalidArgument, "999999")
}

func TestClosingTheModelFirstKeepsSessionsWorking(t *testing.T) {
	own, err := pyramid.Open("", cpu)
	if err != nil {
		t.Fatal(err)
	}
	s, err := own.NewSession(greedy(3))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	own.Close()
	own.Close() // idempotent
	if ids, _ := generateAll(t, s, "import os"); len(ids) == 0 {
		t.Fatal("no tokens")
	}
	_, err = own.Tokenize("x", true)
	wantError(t, err, pyramid.StatusState, "model is closed")
	_, err = own.NewSession()
	wantError(t, err, pyramid.StatusState, "model is closed")
}

func TestClosedSessionFails(t *testing.T) {
	s, err := model.NewSession(greedy(3))
	if err != nil {
		t.Fatal(err)
	}
	s.Close()
	wantError(t, s.Feed("x"), pyramid.StatusState, "session is closed")
	wantError(t, s.Generate(context.Background(), "x", func(string) bool { return true }),
		pyramid.StatusState, "session is closed")
	_, err = s.Memory()
	wantError(t, err, pyramid.StatusState, "session is closed")
	if s.NTokens() != 0 {
		t.Fatal("a closed session has no tokens")
	}
	s.Cancel() // nothing to cancel: a no-op
	s.Close()
}
