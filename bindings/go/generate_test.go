package pyramid_test

import (
	"context"
	"math"
	"strings"
	"testing"

	"pyramid"
	"pyramid/internal/capi"
)

func TestGreedyTokensMatchReferenceAndCLI(t *testing.T) {
	ids, text := generateAll(t, newSession(t, greedy(24)), fibonacci)
	if want := referenceGreedy(t); !equalIDs(ids, want) {
		t.Fatalf("tokens %v, HF reference %v", ids, want)
	}
	want := cli(t, fibonacci)
	if !equalIDs(ids, want.Tokens) || text != want.Text {
		t.Fatalf("got %v %q, pyramid-cli %v %q", ids, text, want.Tokens, want.Text)
	}
}

func TestPrefillChunkIsAnEngineSetter(t *testing.T) {
	// Chunks of 7 tokens: the same greedy tokens as one prefill (default policy: full).
	chunked, err := pyramid.Open("", cpu, func(p pyramid.EngineParams) { p.SetPrefillChunk(7) })
	if err != nil {
		t.Fatal(err)
	}
	defer chunked.Close()
	s, err := chunked.NewSession(greedy(24))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	ids, _ := generateAll(t, s, fibonacci)
	if want := referenceGreedy(t); !equalIDs(ids, want) {
		t.Fatalf("tokens %v, HF reference %v", ids, want)
	}
}

func TestGenerateStreamsTextAndStopsWhenAsked(t *testing.T) {
	var pieces []string
	err := newSession(t, greedy(24)).Generate(context.Background(), fibonacci, func(piece string) bool {
		if piece == "" {
			t.Error("empty piece")
		}
		pieces = append(pieces, piece)
		return true
	})
	if err != nil || len(pieces) == 0 {
		t.Fatal(err, pieces)
	}
	if want := cli(t, fibonacci).Text; strings.Join(pieces, "") != want {
		t.Fatalf("got %q, want %q", strings.Join(pieces, ""), want)
	}

	n := 0
	err = newSession(t, greedy(24)).Generate(context.Background(), fibonacci, func(string) bool {
		n++
		return n < 3
	})
	if err != nil || n != 3 {
		t.Fatal(err, n)
	}
}

func TestMemoryReportsEveryLayer(t *testing.T) {
	s := newSession(t, greedy(8))
	generateAll(t, s, fibonacci)
	m, err := s.Memory()
	if err != nil {
		t.Fatal(err)
	}
	var sum uint64
	for _, layer := range m.Layers {
		if layer.Tokens <= 0 {
			t.Errorf("empty layer in %v", m)
		}
		sum += layer.Bytes
	}
	if len(m.Layers) != model.NLayers() || m.KVBytes == 0 || sum != m.KVBytes ||
		m.KVBytesFull != m.KVBytes || m.Retention != 1 || m.NTokens != s.NTokens() ||
		m.NProcessed != m.NTokens-1 { // the last sampled token is queued
		t.Fatalf("inconsistent memory: %+v", m)
	}
}

func TestParamsAreTheGeneratedStructSetters(t *testing.T) {
	s := newSession(t, func(p pyramid.SessionParams) {
		p.SetKvPolicy("pyramid")
		p.SetKvRetention(0.5)
		p.SetTemperature(0)
		p.SetMaxTokens(4)
		if p.GetKvPolicy() != "pyramid" || p.GetSeed() != capi.PYR_SEED_RANDOM {
			t.Errorf("params: %q %d", p.GetKvPolicy(), p.GetSeed())
		}
	})
	generateAll(t, s, strings.Repeat("x = 1\n", 40))
	if v, ok := s.KVParam("retention"); !ok || math.Abs(v-0.5) > 1e-6 {
		t.Fatalf("retention %v %v", v, ok)
	}
	if _, ok := s.KVParam("no-such-knob"); ok {
		t.Fatal("unknown knob reported")
	}
}

func TestFeedTokensContinuesLikeText(t *testing.T) {
	ids, err := model.Tokenize(fibonacci, true)
	if err != nil || ids[0] != model.BOS() {
		t.Fatal(err, ids)
	}
	a := newSession(t, greedy(6))
	if err := a.FeedTokens(ids); err != nil {
		t.Fatal(err)
	}
	idsA, textA := generateAll(t, a, "")
	idsB, textB := generateAll(t, newSession(t, greedy(6)), fibonacci)
	if !equalIDs(idsA, idsB) || textA != textB {
		t.Fatalf("%v %q vs %v %q", idsA, textA, idsB, textB)
	}
}

func TestStatusValuesMatchTheHeader(t *testing.T) {
	pairs := map[pyramid.Status]capi.Enum_SS_pyr_status{
		pyramid.StatusOK: capi.PYR_OK, pyramid.StatusDone: capi.PYR_DONE,
		pyramid.StatusCancelled: capi.PYR_CANCELLED, pyramid.StatusInvalidArgument: capi.PYR_ERR_INVALID_ARGUMENT,
		pyramid.StatusIO: capi.PYR_ERR_IO, pyramid.StatusFormat: capi.PYR_ERR_FORMAT,
		pyramid.StatusUnsupported: capi.PYR_ERR_UNSUPPORTED, pyramid.StatusOutOfMemory: capi.PYR_ERR_OUT_OF_MEMORY,
		pyramid.StatusContextFull: capi.PYR_ERR_CONTEXT_FULL, pyramid.StatusState: capi.PYR_ERR_STATE,
		pyramid.StatusInternal: capi.PYR_ERR_INTERNAL,
	}
	for status, c := range pairs {
		if int(status) != int(c) {
			t.Errorf("%v is %d in Go, %d in pyramid.h", status, int(status), int(c))
		}
	}
}
