"""What a session's KV cache holds, per layer."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List


@dataclass(frozen=True)
class LayerMemory:
    tokens: int  # tokens cached in this layer
    bytes: int   # their KV bytes


@dataclass(frozen=True)
class Memory:
    n_tokens: int        # tokens in the history (fed and generated)
    n_processed: int     # of them, processed by the model so far (a prefill's progress)
    kv_bytes: int        # KV bytes held now, all layers
    kv_bytes_full: int   # what an uncompressed cache would hold for the same tokens
    retention: float     # kv_bytes / kv_bytes_full; 1.0 for an empty cache
    layers: List[LayerMemory]

    def __str__(self) -> str:
        per_layer = " ".join(str(layer.tokens) for layer in self.layers)
        return (f"KV cache {self.kv_bytes} of {self.kv_bytes_full} bytes "
                f"({self.retention:.0%}), tokens per layer: {per_layer}")
