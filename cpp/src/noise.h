// torch's CPU normal stream: the latents and step noise diffusers draws for a seed, without torch.
//
// TorchCpuGenerator(seed).randn(n) returns what torch.randn(n, generator=torch.Generator("cpu").manual_seed(seed))
// returns, and successive calls continue the stream. It is the C++ twin of runtime/noise.py (read that file's
// docstring for what torch does); the AVX2 kernel's Box-Muller is replayed with true fused multiply-adds.
#pragma once

#include <cstdint>
#include <random>
#include <string>
#include <vector>

namespace sdrt {

enum class CpuKernel { Avx2, Default };

// The ATen kernel torch would use here: ATEN_CPU_CAPABILITY if set, else AVX2+FMA (AVX512 CPUs use the AVX2
// randn kernel too), else the default (libm) kernel.
CpuKernel torch_cpu_kernel();
CpuKernel parse_cpu_kernel(const std::string &name);  // "avx2", "avx512", "default"; throws on others

class TorchCpuGenerator {
public:
    explicit TorchCpuGenerator(uint64_t seed, CpuKernel kernel = torch_cpu_kernel());
    void manual_seed(uint64_t seed);
    // The next n float32 standard normals of the stream, written to out[0..n).
    void randn(float *out, size_t n);
    std::vector<float> randn(size_t n) {
        std::vector<float> v(n);
        randn(v.data(), n);
        return v;
    }
    CpuKernel kernel() const { return kernel_; }

private:
    std::mt19937 mt_;  // the standard's seeding and tempering are mt19937's init_genrand, as torch's
    CpuKernel kernel_;
    bool has_next_ = false;
    double next_normal_ = 0.0;
    double normal_double();
    void fill16(float *block);
};

}  // namespace sdrt
