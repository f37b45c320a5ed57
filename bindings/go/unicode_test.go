package pyramid_test

import (
	"errors"
	"strings"
	"testing"

	"pyramid"
)

func TestTokenizeSeesTheExactText(t *testing.T) {
	ids, err := model.Tokenize(emojiCJK, false)
	if err != nil || !equalIDs(ids, emojiCJKIDs) {
		t.Fatalf("%v %v", err, ids)
	}
	ids, err = model.Tokenize(emojiCJK, true)
	if err != nil || ids[0] != model.BOS() || !equalIDs(ids[1:], emojiCJKIDs) {
		t.Fatalf("%v %v", err, ids)
	}
}

func generatesLikeTheCLI(t *testing.T, prompt string) string {
	ids, text := generateAll(t, newSession(t, greedy(24)), prompt)
	want := cli(t, prompt)
	if !equalIDs(ids, want.Tokens) || text != want.Text {
		t.Fatalf("got %v %q, pyramid-cli %v %q", ids, text, want.Tokens, want.Text)
	}
	return text
}

func TestEmojiPromptGeneratesLikeTheCLI(t *testing.T) {
	generatesLikeTheCLI(t, emojiCJK)
}

func TestMultibyteOutputArrivesWhole(t *testing.T) {
	text := generatesLikeTheCLI(t, cjkPrefix)
	if strings.IndexFunc(text, func(r rune) bool { return r > 0x7f }) < 0 {
		t.Fatalf("expected non-ASCII output, got %q", text)
	}
}

func TestErrorMessagesCarry4ByteCharacters(t *testing.T) {
	path := "/nonexistent/日本語 🎉 👩\u200d💻"
	_, err := pyramid.Open(path)
	var e *pyramid.Error
	if !errors.As(err, &e) || e.Status != pyramid.StatusIO || !strings.Contains(e.Message, path) {
		t.Fatalf("%v", err)
	}
}

func TestStringFieldsRoundTrip(t *testing.T) {
	policy := "nöpe 🎉"
	_, err := model.NewSession(func(p pyramid.SessionParams) {
		p.SetKvPolicy(policy)
		if got := p.GetKvPolicy(); got != policy {
			t.Errorf("kv_policy %q", got)
		}
	})
	var e *pyramid.Error
	if !errors.As(err, &e) || !strings.Contains(e.Message, policy) {
		t.Fatalf("%v", err)
	}
}
