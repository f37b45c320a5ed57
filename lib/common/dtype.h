// Element types of weights and their conversions to fp32.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>

namespace pyr {

enum class DType { F32, F16, BF16 };

inline size_t dtype_size(DType t) { return t == DType::F32 ? 4 : 2; }
inline const char* dtype_name(DType t) {
    return t == DType::F32 ? "F32" : t == DType::F16 ? "F16" : "BF16";
}

inline float bf16_to_f32(uint16_t h) {
    uint32_t bits = uint32_t(h) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

// IEEE half -> float, exact for every input (subnormals, inf, nan included).
inline float f16_to_f32(uint16_t h) {
    uint32_t sign = uint32_t(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f;
    uint32_t mant = h & 0x3ff;
    uint32_t bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (mant << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (mant << 13);
    } else if (mant == 0) {
        bits = sign;
    } else {  // subnormal: normalise
        int e = -1;
        do {
            mant <<= 1;
            ++e;
        } while (!(mant & 0x400));
        bits = sign | (uint32_t(112 - e) << 23) | ((mant & 0x3ff) << 13);
    }
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

// Converts n elements of type `t` at `src` to fp32.
void convert_to_f32(DType t, const void* src, float* dst, size_t n);

}  // namespace pyr
