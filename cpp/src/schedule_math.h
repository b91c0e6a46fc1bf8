// The noise-schedule arithmetic of runtime/schedulers/base.py, operation for operation: float32 where diffusers
// (and sdrt's numpy) compute in float32, float64 where they compute in float64, numpy's linspace/arange/interp
// formulas, Python's pow for `**`. The scheduler tables built on these equal the Python runtime's.
#pragma once

#include <string>
#include <vector>

#include "json.h"

namespace sdrt {

using Vec = std::vector<double>;
using VecF = std::vector<float>;

VecF torch_linspace_f32(double start, double end, int n);
Vec np_linspace(double start, double stop, int num);  // numpy.linspace(start, stop, num), float64
Vec np_arange(double start, double stop, double step);  // numpy.arange with a float step
double np_interp(double x, const VecF &fp);  // numpy.interp(x, arange(len(fp)), fp)
VecF cumprod_f32(const VecF &alphas);
VecF cosine_betas(int n, double max_beta = 0.999);
VecF rescale_zero_terminal_snr(const VecF &betas);
VecF train_sigmas(const VecF &alphas_cumprod);
Vec karras_sigmas(const Vec &in_sigmas, int n, const Json *sigma_min, const Json *sigma_max);
Vec exponential_sigmas(const Vec &in_sigmas, int n, const Json *sigma_min, const Json *sigma_max);  // log-spaced
double sigma_to_t(double sigma, const VecF &log_sigmas);
VecF log_f32(const VecF &x);  // numpy's float32 log (here: log rounded to float32)
double round_half_even(double x);  // numpy's round / rint

// Descending inference timesteps as DDIM, PNDM and the Euler schedulers space them (runtime's spaced_timesteps).
Vec spaced_timesteps(const std::string &spacing, int n, int num_train, int steps_offset, bool round_linspace);

}  // namespace sdrt
