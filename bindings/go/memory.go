package pyramid

import (
	"fmt"
	"strings"
)

// LayerMemory is what one layer's KV cache holds.
type LayerMemory struct {
	Tokens int    // tokens cached
	Bytes  uint64 // their KV bytes
}

// Memory is what a session's KV cache holds, in total and per layer.
type Memory struct {
	NTokens     int     // tokens in the history (fed and generated)
	NProcessed  int     // of them, processed by the model so far (a prefill's progress)
	KVBytes     uint64  // KV bytes held now, all layers
	KVBytesFull uint64  // what an uncompressed cache would hold for the same tokens
	Retention   float64 // KVBytes / KVBytesFull; 1 for an empty cache
	Layers      []LayerMemory
}

func (m Memory) String() string {
	perLayer := make([]string, len(m.Layers))
	for i, layer := range m.Layers {
		perLayer[i] = fmt.Sprint(layer.Tokens)
	}
	return fmt.Sprintf("KV cache %d of %d bytes (%.0f%%), tokens per layer: %s",
		m.KVBytes, m.KVBytesFull, 100*m.Retention, strings.Join(perLayer, " "))
}
