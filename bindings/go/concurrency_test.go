package pyramid_test

import (
	"context"
	"sync"
	"testing"

	"pyramid"
)

// Sessions generating on goroutines at once share the engine's forwards (it batches their
// steps); each still produces what it produces alone.
func TestSessionsOnGoroutinesGenerateWhatTheyGenerateAlone(t *testing.T) {
	prompts := []string{fibonacci, "import os\nimport sys\n\ndef main():", "class Stack:\n    def __init__(self):"}
	together := make([][]int, len(prompts))
	errs := make([]error, len(prompts))
	sessions := make([]*pyramid.Session, len(prompts))
	for i := range prompts {
		sessions[i] = newSession(t, greedy(16))
	}
	var wg sync.WaitGroup
	for i := range prompts {
		wg.Add(1)
		go func(i int) { // no t.Fatal here: only the test's goroutine may stop it
			defer wg.Done()
			errs[i] = sessions[i].GenerateTokens(context.Background(), prompts[i], func(id int, _ string) bool {
				if id >= 0 {
					together[i] = append(together[i], id)
				}
				return true
			})
		}(i)
	}
	wg.Wait()
	for i, p := range prompts {
		if errs[i] != nil {
			t.Fatal(errs[i])
		}
		alone, _ := generateAll(t, newSession(t, greedy(16)), p)
		if !equalIDs(together[i], alone) {
			t.Errorf("prompt %q: together %v, alone %v", p, together[i], alone)
		}
	}
}
