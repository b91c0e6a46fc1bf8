// Widening a safetensors tensor's stored floats (F32, F16, BF16, F64) to float32: one place for the token tables
// (model.cpp) and LoRA files (lora.cpp).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>

namespace sdrt {

inline float half_to_float(uint16_t h) {
    uint32_t sign = uint32_t(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, mant = h & 0x3FF, bits;
    if (exp == 0) {
        float v = std::ldexp(float(mant), -24);
        return sign ? -v : v;
    }
    if (exp == 31) bits = sign | 0x7F800000u | (mant << 13);
    else bits = sign | ((exp + 112) << 23) | (mant << 13);
    float out;
    std::memcpy(&out, &bits, 4);
    return out;
}

// Bytes per element of a safetensors float dtype; 0 for any other dtype.
inline size_t float_width(const std::string &dtype) {
    return dtype == "F32" ? 4 : dtype == "F64" ? 8 : (dtype == "F16" || dtype == "BF16") ? 2 : 0;
}

// `count` elements of `dtype` at `p` (unaligned) into `out`.
inline void widen_floats(const char *p, size_t count, const std::string &dtype, float *out) {
    size_t width = float_width(dtype);
    for (size_t i = 0; i < count; ++i) {
        if (width == 4) {
            std::memcpy(&out[i], p + 4 * i, 4);
        } else if (width == 8) {
            double v;
            std::memcpy(&v, p + 8 * i, 8);
            out[i] = float(v);
        } else {
            uint16_t h;
            std::memcpy(&h, p + 2 * i, 2);
            if (dtype == "F16") {
                out[i] = half_to_float(h);
            } else {
                uint32_t bits = uint32_t(h) << 16;
                std::memcpy(&out[i], &bits, 4);
            }
        }
    }
}

}  // namespace sdrt
