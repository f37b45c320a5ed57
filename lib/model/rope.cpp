#include "model/rope.h"

#include <cmath>

#include "common/error.h"

namespace pyr {

static constexpr double kPi = 3.14159265358979323846;

// HF: inv_freq = 1.0 / (base ** (arange(0, dim, 2).float() / dim)), all in float32: the
// exponent is a float32 division, the power a float32 result, the inverse a float32 divide.
static std::vector<float> default_inv_freq(double base, int32_t head_dim) {
    std::vector<float> inv(size_t(head_dim / 2));
    for (int32_t i = 0; i < head_dim / 2; ++i) {
        float exponent = float(2 * i) / float(head_dim);
        float power = float(std::pow(double(float(base)), double(exponent)));
        inv[size_t(i)] = 1.0f / power;
    }
    return inv;
}

// HF _compute_dynamic_ntk_parameters: the base grows with the sequence length (double math
// in Python), then the default float32 frequencies.
static double dynamic_base(const ModelConfig& c, int32_t seq_len) {
    double base = double(c.rope_theta);
    const double max_pos = double(c.n_ctx_train);
    const double factor = double(c.rope_scaling.factor);
    const double dim = double(c.head_dim);
    if (c.n_ctx_train <= 0 || seq_len <= c.n_ctx_train || c.head_dim <= 2) return base;
    const double s = double(seq_len);
    return base * std::pow(factor * s / max_pos - (factor - 1.0), dim / (dim - 2.0));
}

// HF _compute_llama3_parameters: wavelength bands, in float32 tensor math (torch computes
// `scalar / tensor` as reciprocal(tensor) * scalar).
static void llama3_scale(const RopeScaling& rs, std::vector<float>& inv) {
    const float factor = rs.factor;
    const float low = rs.low_freq_factor;
    const float high = rs.high_freq_factor;
    const double old_len = double(rs.original_max_position);
    const float low_wavelen = float(old_len / double(low));
    const float high_wavelen = float(old_len / double(high));
    const float two_pi = float(2.0 * kPi);
    for (float& f : inv) {
        const float wavelen = (1.0f / f) * two_pi;
        if (wavelen > low_wavelen) {
            f = f / factor;  // low frequency: fully scaled
        } else if (!(wavelen < high_wavelen)) {  // medium band: interpolate
            const float smooth =
                ((1.0f / wavelen) * float(old_len) - low) / float(double(high) - double(low));
            f = (1.0f - smooth) * f / factor + smooth * f;
        }  // high frequency: unchanged
    }
}

std::vector<float> rope_inv_freq(const ModelConfig& c, int32_t seq_len) {
    PYR_ASSERT(c.head_dim > 0 && c.head_dim % 2 == 0);
    const RopeScaling& rs = c.rope_scaling;
    switch (rs.type) {
        case RopeScaling::Type::Default:
            return default_inv_freq(double(c.rope_theta), c.head_dim);
        case RopeScaling::Type::Linear: {
            std::vector<float> inv = default_inv_freq(double(c.rope_theta), c.head_dim);
            for (float& f : inv) f /= rs.factor;
            return inv;
        }
        case RopeScaling::Type::Dynamic:
            return default_inv_freq(dynamic_base(c, seq_len), c.head_dim);
        case RopeScaling::Type::Llama3: {
            std::vector<float> inv = default_inv_freq(double(c.rope_theta), c.head_dim);
            llama3_scale(rs, inv);
            return inv;
        }
    }
    fail(PYR_ERR_INTERNAL, "unknown RoPE scaling type");
}

void rope_cos_sin(const std::vector<float>& inv_freq, const int32_t* positions, int32_t n,
                  float* cos_out, float* sin_out) {
    const size_t n_freq = inv_freq.size();
    for (int32_t t = 0; t < n; ++t) {
        const float p = float(positions[t]);
        for (size_t i = 0; i < n_freq; ++i) {
            const double angle = double(p * inv_freq[i]);  // float32 product, as HF
            cos_out[size_t(t) * n_freq + i] = float(std::cos(angle));
            sin_out[size_t(t) * n_freq + i] = float(std::sin(angle));
        }
    }
}

}  // namespace pyr
