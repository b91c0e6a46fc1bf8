// The normal stream itself: mt19937 words -> float uniforms -> Box-Muller in blocks of 16 (see noise.h).
//
// The AVX2 kernel is avx_mathfun's Cephes log/sincos in float32, as GCC compiles torch (mul+add contracted into
// FMA); std::fma gives the single rounding. This file is built with -ffp-contract=off so the compiler adds no
// contractions of its own. Constants are double literals rounded to float, as avx_mathfun declares them.
#include "noise.h"

#include <cmath>
#include <cstdlib>
#include <cstring>

#include "util.h"

namespace sdrt {

CpuKernel parse_cpu_kernel(const std::string &name) {
    if (name == "avx2" || name == "avx512") return CpuKernel::Avx2;
    if (name == "default") return CpuKernel::Default;
    throw input_error("cpu kernel \"" + name + "\" is not one of avx2, avx512, default");
}

CpuKernel torch_cpu_kernel() {
    const char *env = std::getenv("ATEN_CPU_CAPABILITY");
    if (env) {
        std::string v(env);
        for (auto &c : v) c = char(std::tolower(static_cast<unsigned char>(c)));
        if (v == "default" || v == "avx2" || v == "avx512") return parse_cpu_kernel(v);
    }
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return CpuKernel::Avx2;
#endif
    return CpuKernel::Default;
}

namespace {

inline float f(double v) { return static_cast<float>(v); }

const float kLogP[9] = {f(7.0376836292e-2), f(-1.1514610310e-1), f(1.1676998740e-1), f(-1.2420140846e-1),
                        f(1.4249322787e-1), f(-1.6668057665e-1), f(2.0000714765e-1), f(-2.4999993993e-1),
                        f(3.3333331174e-1)};

// avx_mathfun's log256_ps for x in (0, 1].
float log_ps(float x) {
    uint32_t bits;
    std::memcpy(&bits, &x, 4);
    float e = static_cast<float>(static_cast<int32_t>(bits >> 23) - 127) + 1.0f;
    uint32_t mbits = (bits & 0x807FFFFFu) | 0x3F000000u;  // mantissa in [0.5, 1)
    std::memcpy(&x, &mbits, 4);
    bool small = x < f(0.707106781186547524);
    if (small) e = e - 1.0f;
    x = (x - 1.0f) + (small ? x : 0.0f);
    float z = x * x;
    float y = kLogP[0];
    for (int i = 1; i < 9; ++i) y = std::fma(y, x, kLogP[i]);
    y = std::fma(y * x, z, e * f(-2.12194440e-4));
    y = std::fma(-z, 0.5f, y);
    return std::fma(e, f(0.693359375), x + y);
}

// avx_mathfun's sincos256_ps for x >= 0.
void sincos_ps(float x, float *sin_out, float *cos_out) {
    int32_t j = static_cast<int32_t>(x * f(1.27323954473516));  // 4/pi, truncated
    j = (j + 1) & ~1;
    float y = static_cast<float>(j);
    x = std::fma(y, f(-0.78515625), x);
    x = std::fma(y, f(-2.4187564849853515625e-4), x);
    x = std::fma(y, f(-3.77489497744594108e-8), x);
    float z = x * x;
    float c = std::fma(std::fma(f(2.443315711809948e-5), z, f(-1.388731625493765e-3)), z, f(4.166664568298827e-2));
    c = std::fma(c * z, z, -(z * 0.5f)) + 1.0f;
    float s = std::fma(f(-1.9515295891e-4), z, f(8.3321608736e-3));
    s = std::fma(s, z, f(-1.6666654611e-1));
    s = std::fma(s * z, x, x);
    bool first = (j & 2) == 0;
    float sv = first ? s : c, cv = first ? c : s;
    *sin_out = (j & 4) ? -sv : sv;
    *cos_out = (~(j - 2) & 4) ? -cv : cv;
}

}  // namespace

TorchCpuGenerator::TorchCpuGenerator(uint64_t seed, CpuKernel kernel) : kernel_(kernel) { manual_seed(seed); }

void TorchCpuGenerator::manual_seed(uint64_t seed) {
    mt_.seed(static_cast<uint32_t>(seed & 0xFFFFFFFFu));
    has_next_ = false;
}

void TorchCpuGenerator::fill16(float *b) {
    float out[16];
    for (int j = 0; j < 8; ++j) {
        float u1 = 1.0f - b[j], u2 = b[j + 8];
        float radius, sn, cs;
        if (kernel_ == CpuKernel::Avx2) {
            radius = std::sqrt(-2.0f * log_ps(u1));
            sincos_ps(f(2 * M_PI) * u2, &sn, &cs);
        } else {  // libm's logf/cosf/sinf, computed in double and rounded as runtime/noise.py does
            radius = std::sqrt(-2.0f * f(std::log(double(u1))));
            double theta = double(f(2 * M_PI * double(u2)));
            cs = f(std::cos(theta)), sn = f(std::sin(theta));
        }
        out[j] = radius * cs;
        out[j + 8] = radius * sn;
    }
    std::memcpy(b, out, sizeof out);
}

double TorchCpuGenerator::normal_double() {
    if (has_next_) {
        has_next_ = false;
        return next_normal_;
    }
    uint64_t w[4];
    for (auto &x : w) x = mt_();
    // random64 = first word << 32 | second word; a double uniform keeps its low 53 bits.
    double u1 = double(((w[0] & 0x1FFFFFu) << 32) | w[1]) * 0x1p-53;
    double u2 = double(((w[2] & 0x1FFFFFu) << 32) | w[3]) * 0x1p-53;
    double radius = std::sqrt(-2.0 * std::log1p(-u2));
    double theta = 2.0 * M_PI * u1;
    next_normal_ = radius * std::sin(theta);
    has_next_ = true;
    return radius * std::cos(theta);
}

void TorchCpuGenerator::randn(float *out, size_t n) {
    if (n < 16) {
        for (size_t i = 0; i < n; ++i) out[i] = static_cast<float>(normal_double());
        return;
    }
    // Every uniform is drawn into the output first; when n is not a multiple of 16 the last 16 outputs are then
    // redone from 16 fresh uniforms (the n % 16 drawn before are wasted, as in torch).
    for (size_t i = 0; i < n; ++i) out[i] = static_cast<float>(mt_() & 0xFFFFFFu) * 0x1p-24f;
    size_t full = n - n % 16;
    for (size_t i = 0; i < full; i += 16) fill16(out + i);
    if (n % 16) {
        float tail[16];
        for (auto &t : tail) t = static_cast<float>(mt_() & 0xFFFFFFu) * 0x1p-24f;
        fill16(tail);
        std::memcpy(out + n - 16, tail, sizeof tail);
    }
}

}  // namespace sdrt
