// Streams a completion from the bundled model token by token, as a chat UI would, then a
// second turn in the same session, and prints what the KV cache holds. Ctrl-C cancels.
//
//	cmake --build build --target example-go               # after tools/test.sh
//
// (cgo needs CGO_LDFLAGS="-L$PWD/build/lib -Wl,-rpath,$PWD/build/lib" when run by hand:
// cd examples/go && go run . ['prompt' ...])
//
// Greedy (temperature 0), so the first turn is the text of
// `build/bin/pyramid-cli --prompt 'def fibonacci(n):' --temperature 0 --max-tokens 64`.
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"strconv"

	"pyramid"
)

func main() {
	turns := os.Args[1:]
	if len(turns) == 0 {
		turns = []string{"def fibonacci(n):", "\n\ndef factorial(n):"}
	}
	if err := run(turns); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}

func run(turns []string) error {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()

	model, err := pyramid.Open("")
	if err != nil {
		return err
	}
	defer model.Close()
	session, err := model.NewSession(func(p pyramid.SessionParams) {
		p.SetTemperature(0)
		p.SetMaxTokens(64)
	})
	if err != nil {
		return err
	}
	defer session.Close()

	fmt.Printf("pyramid %s on %s: %s\n", pyramid.Version(), model.Device(), model.Path())
	for _, prompt := range turns {
		fmt.Printf("\n>>> %s\n%s", strconv.Quote(prompt), prompt)
		err := session.Generate(ctx, prompt, func(piece string) bool { // history carries over
			fmt.Print(piece)
			return true
		})
		fmt.Println()
		if err != nil {
			return err
		}
	}
	memory, err := session.Memory()
	if err != nil {
		return err
	}
	fmt.Printf("\n%v\n", memory)
	return nil
}
