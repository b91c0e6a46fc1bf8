// See schedule_math.h. Each function names the Python it mirrors; the order of operations is kept.
#include "schedule_math.h"

#include <algorithm>
#include <cmath>

#include "util.h"

namespace sdrt {

VecF torch_linspace_f32(double start, double end, int n) {
    float lo = float(start), hi = float(end);
    if (n == 1) return {lo};
    double step = double((hi - lo) / float(n - 1));
    VecF out(n);
    for (int k = 0; k < n; ++k) {
        double first = double(lo) + step * k;
        double second = double(hi) - step * (n - 1 - k);
        out[k] = float(k < n / 2 ? first : second);
    }
    return out;
}

Vec np_linspace(double start, double stop, int num) {
    Vec y(num);
    if (num <= 0) return y;
    int div = num - 1;
    double delta = stop - start;
    double step = div > 0 ? delta / div : NAN;
    for (int k = 0; k < num; ++k) {
        double v = (div > 0 && step != 0) ? k * step : (div > 0 ? double(k) / div * delta : k * delta);
        y[k] = v + start;
    }
    if (num > 1) y[num - 1] = stop;
    return y;
}

Vec np_arange(double start, double stop, double step) {
    double len_f = std::ceil((stop - start) / step);
    if (!(len_f > 0)) return {};
    size_t len = size_t(len_f);
    Vec out(len);
    out[0] = start;
    if (len == 1) return out;
    out[1] = start + step;
    double delta = out[1] - start;  // numpy's DOUBLE_fill
    for (size_t i = 2; i < len; ++i) out[i] = start + double(i) * delta;
    return out;
}

double np_interp(double x, const VecF &fp) {
    const long n = long(fp.size());
    if (x < 0) return fp[0];
    if (x > double(n - 1)) return fp[n - 1];
    long j = std::min(long(std::floor(x)), n - 1);
    if (j == n - 1 || double(j) == x) return fp[j];
    double slope = (double(fp[j + 1]) - double(fp[j])) / (double(j + 1) - double(j));
    double r = slope * (x - double(j)) + double(fp[j]);
    if (std::isnan(r)) r = slope * (x - double(j + 1)) + double(fp[j + 1]);
    return r;
}

VecF cumprod_f32(const VecF &alphas) {
    VecF out(alphas.size());
    double p = 1.0;
    for (size_t i = 0; i < alphas.size(); ++i) out[i] = float(p *= double(alphas[i]));
    return out;
}

VecF cosine_betas(int n, double max_beta) {
    auto alpha_bar = [](double t) { return std::pow(std::cos((t + 0.008) / 1.008 * M_PI / 2), 2.0); };
    VecF out(n);
    for (int i = 0; i < n; ++i)
        out[i] = float(std::min(1 - alpha_bar(double(i + 1) / n) / alpha_bar(double(i) / n), max_beta));
    return out;
}

VecF rescale_zero_terminal_snr(const VecF &betas) {
    VecF one_minus(betas.size());
    for (size_t i = 0; i < betas.size(); ++i) one_minus[i] = 1.0f - betas[i];
    VecF root = cumprod_f32(one_minus);
    for (auto &r : root) r = std::sqrt(r);
    float first = root.front(), last = root.back();
    float scale = first / (first - last);
    VecF bar(root.size());
    for (size_t i = 0; i < root.size(); ++i) {
        float r = (root[i] - last) * scale;
        bar[i] = r * r;
    }
    VecF out(betas.size());
    out[0] = 1.0f - bar[0];
    for (size_t i = 1; i < bar.size(); ++i) out[i] = 1.0f - bar[i] / bar[i - 1];
    return out;
}

VecF train_sigmas(const VecF &ac) {
    VecF out(ac.size());
    for (size_t i = 0; i < ac.size(); ++i) out[i] = std::sqrt((1.0f - ac[i]) / ac[i]);
    return out;
}

Vec karras_sigmas(const Vec &in_sigmas, int n, const Json *sigma_min, const Json *sigma_max) {
    double lo = (sigma_min && !sigma_min->is_null()) ? sigma_min->as_number() : in_sigmas.back();
    double hi = (sigma_max && !sigma_max->is_null()) ? sigma_max->as_number() : in_sigmas.front();
    Vec ramp = np_linspace(0, 1, n);
    double min_inv = std::pow(lo, 1 / 7.0), max_inv = std::pow(hi, 1 / 7.0);
    Vec out(n);
    for (int i = 0; i < n; ++i) out[i] = std::pow(max_inv + ramp[i] * (min_inv - max_inv), 7.0);
    return out;
}

Vec exponential_sigmas(const Vec &in_sigmas, int n, const Json *sigma_min, const Json *sigma_max) {
    double lo = (sigma_min && !sigma_min->is_null()) ? sigma_min->as_number() : in_sigmas.back();
    double hi = (sigma_max && !sigma_max->is_null()) ? sigma_max->as_number() : in_sigmas.front();
    Vec l = np_linspace(std::log(hi), std::log(lo), n), out(l.size());
    for (size_t i = 0; i < l.size(); ++i) out[i] = std::exp(l[i]);
    return out;
}

double sigma_to_t(double sigma, const VecF &log_sigmas) {
    double log_sigma = std::log(std::max(sigma, 1e-10));
    long n = long(log_sigmas.size()), low = 0;
    for (long j = 0; j < n; ++j)
        if (log_sigma - double(log_sigmas[j]) >= 0) low = j;  // argmax of the cumulative count: the last such j
    low = std::min(low, n - 2);
    double w = (double(log_sigmas[low]) - log_sigma) / double(log_sigmas[low] - log_sigmas[low + 1]);
    w = std::min(std::max(w, 0.0), 1.0);
    return (1 - w) * double(low) + w * double(low + 1);
}

VecF log_f32(const VecF &x) {
    VecF out(x.size());
    for (size_t i = 0; i < x.size(); ++i) out[i] = float(std::log(double(x[i])));
    return out;
}

double round_half_even(double x) { return std::nearbyint(x); }  // the default rounding mode: to nearest, even

Vec spaced_timesteps(const std::string &spacing, int n, int num_train, int steps_offset, bool round_linspace) {
    Vec out;
    if (spacing == "linspace") {
        Vec lin = np_linspace(0, num_train - 1, n);
        for (auto &v : lin) v = round_linspace ? round_half_even(v) : double(float(v));
        out.assign(lin.rbegin(), lin.rend());
    } else if (spacing == "leading") {
        int ratio = num_train / n;
        for (int k = n - 1; k >= 0; --k) out.push_back(double(k * ratio) + steps_offset);
    } else if (spacing == "trailing") {
        for (double v : np_arange(num_train, 0, -double(num_train) / n)) out.push_back(round_half_even(v) - 1.0);
    } else {
        throw model_error("timestep_spacing \"" + spacing + "\" is not supported; use one of leading, trailing, linspace");
    }
    return out;
}

}  // namespace sdrt
