// The traced schedulers' shared machinery (scheduler_traced.cpp, scheduler_dpm_solver.cpp): symbolic arrays (Sym:
// float64 coefficients over the step's input arrays), the Tracer that records a step as coefficient rows, and the
// Traced base class whose update() applies them as runtime/schedulers/traced.py does:
//     base = [sample, output, history..., (noise)];  x0 = sum base[k] c[k] (clamped if clip_sample)
//     out_j = sum [base..., x0][k] c[m + j (m + 1) + k]   for out = (prev, new history...)
// with exactly-zero coefficients skipped and terms summed in order, as numpy does, so the results match bit for bit.
// Internal to the library: not part of the C ABI.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "schedule_math.h"
#include "scheduler.h"
#include "util.h"

namespace sdrt::traced {

struct Sym {
    Vec v;
    Sym operator+(const Sym &o) const {
        Sym r{v};
        for (size_t i = 0; i < v.size(); ++i) r.v[i] += o.v[i];
        return r;
    }
    Sym operator-(const Sym &o) const { return *this + o * -1.0; }
    Sym operator*(double s) const {
        Sym r{v};
        for (auto &x : r.v) x *= s;
        return r;
    }
    Sym operator/(double s) const {
        Sym r{v};
        for (auto &x : r.v) x /= s;
        return r;
    }
};

struct Tracer {
    int m;
    bool clip;
    std::vector<Sym> basis;  // sample, output, history..., noise, then x0 (index m)
    bool has_x0 = false;
    Sym x0_expr;
    Tracer(int m_, int hist, bool noise, bool clip_) : m(m_), clip(clip_) {
        (void)hist, (void)noise;
        for (int i = 0; i <= m; ++i) {
            Sym s{Vec(size_t(m + 1), 0.0)};
            s.v[size_t(i)] = 1.0;
            basis.push_back(s);
        }
    }
    Sym sample() const { return basis[0]; }
    Sym output() const { return basis[1]; }
    Sym history(int k) const { return basis[size_t(2 + k)]; }
    Sym noise(int hist) const { return basis[size_t(2 + hist)]; }
    Sym zero() const { return Sym{Vec(size_t(m + 1), 0.0)}; }
    Sym x0(const Sym &e) {
        if (has_x0) throw Error(SDRT_ERR_INTERNAL, "one x0 per call");
        has_x0 = true;
        x0_expr = e;
        return basis[size_t(m)];
    }
    Sym pred_x0(const Sym &e) { return clip ? x0(e) : e; }
    std::vector<double> row(const Sym &prev, const std::vector<Sym> &hist) const {
        std::vector<double> r;
        for (int k = 0; k < m; ++k) r.push_back(has_x0 ? x0_expr.v[size_t(k)] : 0.0);
        for (double x : prev.v) r.push_back(x);
        for (const auto &h : hist)
            for (double x : h.v) r.push_back(x);
        return r;
    }
};

inline Sym sum(const std::vector<double> &c, const std::vector<Sym> &s, const Sym &zero) {  // Python's sum(c * s ...), from 0
    Sym r = zero;
    for (size_t i = 0; i < c.size() && i < s.size(); ++i) r = r + s[i] * c[i];
    return r;
}

inline std::string str_or(const Json &v, const char *fallback) { return v.is_string() ? v.as_string() : fallback; }

class Traced : public Scheduler {
public:
    Traced(const std::string &name, const Json &defaults, const Json &config, const std::map<std::string, Json> &ov)
        : Scheduler(name, defaults, config, ov) {}

protected:
    bool clips_ = false;  // clip_sample clamps x0 to +-clip_range_
    float clip_range_ = 1.0f;

    void init_clip() {
        clips_ = flag("clip_sample");
        if (clips_) clip_range_ = float(num("clip_sample_range"));
    }
    Tracer tracer() const { return Tracer(2 + history_size_ + (needs_noise_ ? 1 : 0), history_size_, needs_noise_, clips_); }

    void update(const float *c, float *s, const float *o, std::vector<std::vector<float>> &h, const float *noise, size_t n) override {
        const int H = history_size_, m = 2 + H + (needs_noise_ ? 1 : 0);
        std::vector<const float *> in;
        in.push_back(s), in.push_back(o);
        for (int j = 0; j < H; ++j) in.push_back(h[size_t(j)].data());
        if (needs_noise_) in.push_back(noise);
        std::vector<float> vals(size_t(m + 1)), outs(size_t(H + 1));
        for (size_t k = 0; k < n; ++k) {
            for (int j = 0; j < m; ++j) vals[size_t(j)] = in[size_t(j)][k];
            vals[size_t(m)] = combine(c, 0, vals.data(), m);
            if (clips_) vals[size_t(m)] = std::min(std::max(vals[size_t(m)], -clip_range_), clip_range_);
            for (int j = 0; j <= H; ++j) outs[size_t(j)] = combine(c, m + j * (m + 1), vals.data(), m + 1);
            s[k] = outs[0];
            for (int j = 0; j < H; ++j) h[size_t(j)][k] = outs[size_t(j + 1)];
        }
    }
    static float combine(const float *c, int offset, const float *a, int count) {
        float acc = 0.0f;
        bool any = false;
        for (int k = 0; k < count; ++k) {
            float ck = c[offset + k];
            if (ck == 0.0f) continue;
            float term = a[k] * ck;
            acc = any ? acc + term : term;
            any = true;
        }
        return any ? acc : a[0] * 0.0f;
    }
    // The add_noise coefficients of DDPM-style schedulers at timestep t: float32 sqrt(a), sqrt(1 - a).
    std::array<double, 2> alpha_noise(long t) const {
        float a32 = alphas_cumprod_[size_t(t)];
        return {double(std::sqrt(a32)), double(std::sqrt(1.0f - a32))};
    }

    // Euler's timesteps and sigmas (float32 [n], [n + 1]) with Karras or exponential sigmas: LMS and Heun use them.
    void euler_sigmas(int n, VecF &timesteps, VecF &sig) {
        Vec ts = spaced_timesteps(str("timestep_spacing"), n, num_train_, int(num("steps_offset")), false);
        VecF train = train_sigmas(alphas_cumprod_);
        Vec s(static_cast<size_t>(n), 0.0);
        for (int i = 0; i < n; ++i) s[size_t(i)] = np_interp(double(float(ts[size_t(i)])), train);
        if (flag("use_karras_sigmas") || flag("use_exponential_sigmas")) {
            s = flag("use_karras_sigmas") ? karras_sigmas(s, n, nullptr, nullptr) : exponential_sigmas(s, n, nullptr, nullptr);
            VecF logs = log_f32(train);
            for (int i = 0; i < n; ++i) ts[size_t(i)] = sigma_to_t(s[size_t(i)], logs);
        }
        timesteps.assign(size_t(n), 0.0f);
        sig.assign(size_t(n + 1), 0.0f);
        for (int i = 0; i < n; ++i) timesteps[size_t(i)] = float(ts[size_t(i)]), sig[size_t(i)] = float(s[size_t(i)]);
    }
    void sigma_name() {
        if (flag("use_karras_sigmas") && flag("use_exponential_sigmas"))
            throw model_error("use_karras_sigmas and use_exponential_sigmas exclude each other; set one");
        if (flag("use_beta_sigmas")) throw model_error("use_beta_sigmas is not supported by sdrt's " + name_ + "; use Karras or exponential sigmas");
        if (flag("use_karras_sigmas")) name_ += "_karras";
        else if (flag("use_exponential_sigmas")) name_ += "_exponential";
    }
};

// scheduler_dpm_solver.cpp: "unipc" and "dpmpp_2s_a" (nullptr for others).
std::unique_ptr<Scheduler> make_dpm_solver(const std::string &cls, const Json &defaults, const Json &config,
                                           const std::map<std::string, Json> &overrides);

}  // namespace sdrt::traced
