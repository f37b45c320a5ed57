#include "common/dtype.h"

namespace pyr {

void convert_to_f32(DType t, const void* src, float* dst, size_t n) {
    switch (t) {
        case DType::F32:
            std::memcpy(dst, src, n * 4);
            break;
        case DType::F16: {
            const auto* s = static_cast<const uint16_t*>(src);
            for (size_t i = 0; i < n; ++i) dst[i] = f16_to_f32(s[i]);
            break;
        }
        case DType::BF16: {
            const auto* s = static_cast<const uint16_t*>(src);
            for (size_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(s[i]);
            break;
        }
    }
}

}  // namespace pyr
