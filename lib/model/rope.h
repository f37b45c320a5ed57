// Rotary position embedding frequencies (HF rotate-half RoPE) for a model config: default,
// linear, dynamic (NTK) and llama3 scaling. Host-side math shared by every backend; it
// mimics HF's float32 arithmetic so that angles agree with transformers to ~1e-6 relative.
#pragma once

#include <cstdint>
#include <vector>

#include "model/config.h"

namespace pyr {

// The inverse frequencies f_i, i < head_dim/2, for a forward call whose largest position is
// seq_len - 1 (seq_len only matters for dynamic scaling: theta grows once seq_len exceeds
// max_position_embeddings). head_dim must be even.
std::vector<float> rope_inv_freq(const ModelConfig& config, int32_t seq_len);

// cos and sin of p * f_i for each of the n positions: cos, sin (n, n_freq), in float32 as
// HF computes them (angle = float(p) * f_i rounded to float, then cos/sin of it).
void rope_cos_sin(const std::vector<float>& inv_freq, const int32_t* positions, int32_t n,
                  float* cos_out, float* sin_out);

}  // namespace pyr
