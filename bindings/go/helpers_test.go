package pyramid_test

import (
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"pyramid"
)

// ctest sets PYRAMID_CLI to build/bin/pyramid-cli and PYRAMID_TEST_DATA to tests/data.

const (
	fibonacci = "def fibonacci(n):"
	// 2-, 3- and 4-byte UTF-8 characters and a ZWJ sequence.
	emojiCJK = "# 日本語 🎉 emoji 👩\u200d💻\nprint('你好')"
	// Greedy generation after it produces CJK characters assembled from byte tokens.
	cjkPrefix = "s = '日本語"
)

// sentencepiece's encode of emojiCJK with the bundled tokenizer.model (no BOS).
var emojiCJKIDs = []int{
	444, 4004, 233, 154, 168, 233, 159, 175, 235, 173, 161, 4004, 243, 162, 145, 140, 448,
	719, 4071, 4010, 4004, 243, 162, 148, 172, 229, 131, 144, 243, 162, 149, 190, 13, 1254,
	621, 231, 192, 163, 232, 168, 192, 738,
}

// About 1500 tokens of code: a first prefill of seconds on a CPU.
var longPrompt = strings.Repeat("def add(a, b):\n    return a + b\n\nresult = add(1, 2)\n", 60)

var model *pyramid.Model

func TestMain(m *testing.M) {
	var err error
	model, err = pyramid.Open("", cpu)
	if err != nil {
		panic(err)
	}
	code := m.Run()
	model.Close()
	os.Exit(code)
}

func cpu(p pyramid.EngineParams) { p.SetDevice("cpu") }

func greedy(maxTokens int) pyramid.SessionOption {
	return func(p pyramid.SessionParams) {
		p.SetTemperature(0)
		p.SetMaxTokens(maxTokens)
	}
}

func newSession(t *testing.T, opts ...pyramid.SessionOption) *pyramid.Session {
	t.Helper()
	s, err := model.NewSession(opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// generateAll collects the token ids and the text of a generation.
func generateAll(t *testing.T, s *pyramid.Session, prompt string) ([]int, string) {
	t.Helper()
	var ids []int
	var text strings.Builder
	err := s.GenerateTokens(context.Background(), prompt, func(id int, piece string) bool {
		if id >= 0 {
			ids = append(ids, id)
		}
		text.WriteString(piece)
		return true
	})
	if err != nil {
		t.Fatal(err)
	}
	return ids, text.String()
}

type cliOutput struct {
	Tokens []int  `json:"tokens"`
	Text   string `json:"text"`
}

// cli runs pyramid-cli --json greedily for 24 tokens: the C library's own output.
func cli(t *testing.T, prompt string) cliOutput {
	t.Helper()
	exe := os.Getenv("PYRAMID_CLI")
	if exe == "" {
		t.Skip("PYRAMID_CLI is not set (pyramid-cli not built)")
	}
	raw, err := exec.Command(exe, "--prompt", prompt, "--temperature", "0",
		"--max-tokens", "24", "--device", "cpu", "--json").Output()
	if err != nil {
		t.Fatal(err)
	}
	var out cliOutput
	if err := json.Unmarshal(raw, &out); err != nil {
		t.Fatal(err)
	}
	return out
}

// referenceGreedy is HF transformers' greedy continuation of fibonacci, first 24 ids
// (tests/data/fixtures/bundled_reference.json prompts[0]).
func referenceGreedy(t *testing.T) []int {
	t.Helper()
	dir := os.Getenv("PYRAMID_TEST_DATA")
	if dir == "" {
		t.Skip("PYRAMID_TEST_DATA is not set")
	}
	raw, err := os.ReadFile(filepath.Join(dir, "fixtures", "bundled_reference.json"))
	if err != nil {
		t.Fatal(err)
	}
	var fixture struct {
		Prompts []struct {
			Text   string `json:"text"`
			Greedy []int  `json:"greedy"`
		} `json:"prompts"`
	}
	if err := json.Unmarshal(raw, &fixture); err != nil {
		t.Fatal(err)
	}
	if fixture.Prompts[0].Text != fibonacci {
		t.Fatalf("unexpected fixture prompt %q", fixture.Prompts[0].Text)
	}
	return fixture.Prompts[0].Greedy[:24]
}

func equalIDs(a, b []int) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}
