// The traced schedulers of runtime/schedulers/ (LMS, Heun, UniPC, DPM++ 2S a, DDPM, LCM, TCD, PNDM's Runge-Kutta
// warm-up): each make_tables is its Python `_tables`, written on symbolic arrays (Sym: float64 coefficients over
// the step's input arrays), and every one shares the generic update of runtime/schedulers/traced.py:
//     base = [sample, output, history..., (noise)];  x0 = sum base[k] c[k] (clamped if clip_sample)
//     out_j = sum [base..., x0][k] c[m + j (m + 1) + k]   for out = (prev, new history...)
// with exactly-zero coefficients skipped and terms summed in order, as numpy does, so the results match bit for bit.
#include <algorithm>
#include <cmath>

#include "schedule_math.h"
#include "scheduler.h"
#include "util.h"

namespace sdrt {

namespace {

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

Sym sum(const std::vector<double> &c, const std::vector<Sym> &s, const Sym &zero) {  // Python's sum(c * s ...), from 0
    Sym r = zero;
    for (size_t i = 0; i < c.size() && i < s.size(); ++i) r = r + s[i] * c[i];
    return r;
}

std::string str_or(const Json &v, const char *fallback) { return v.is_string() ? v.as_string() : fallback; }

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

// --- LMS -------------------------------------------------------------------------------------------------------

double lms_coefficient(const Vec &s, int order, int t, int current) {
    // Exact integral over [s[t], s[t+1]] of prod_{k != current} (tau - s[t-k]) / (s[t-current] - s[t-k]).
    Vec poly{1.0};  // coefficients, lowest power first
    for (int k = 0; k < order; ++k) {
        if (k == current) continue;
        double root = s[size_t(t - k)], denom = s[size_t(t - current)] - s[size_t(t - k)];
        Vec next(poly.size() + 1, 0.0);
        for (size_t i = 0; i < poly.size(); ++i) next[i + 1] += poly[i] / denom, next[i] -= poly[i] * root / denom;
        poly = next;
    }
    auto integral = [&](double x) {
        double r = 0;
        for (size_t i = poly.size(); i-- > 0;) r = r * x + poly[i] / double(i + 1);
        return r * x;
    };
    return integral(s[size_t(t + 1)]) - integral(s[size_t(t)]);
}

class LMS : public Traced {
public:
    LMS(const Json &d, const Json &c, const std::map<std::string, Json> &ov) : Traced("lms", d, c, ov) {
        history_size_ = 3;
        sigma_name();
    }

protected:
    SchedulerTables make_tables(int n, int start) override {
        VecF ts, sig;
        euler_sigmas(n, ts, sig);
        Vec s(sig.begin(), sig.end());
        float top = *std::max_element(sig.begin(), sig.end());
        const std::string &sp = str("timestep_spacing");
        SchedulerTables t;
        t.init_noise_sigma = (sp == "linspace" || sp == "trailing") ? double(top) : double(std::sqrt(top * top + 1.0f));
        bool eps = str("prediction_type") == "epsilon";
        int stored = 0;
        for (int k = start; k < n; ++k) {
            Tracer tr = tracer();
            Sym x = tr.sample(), out = tr.output();
            double sigma = s[size_t(k)];
            Sym x0 = eps ? x - out * sigma : out * (-sigma / std::pow(sigma * sigma + 1, 0.5)) + x / (sigma * sigma + 1);
            Sym d = (x - tr.pred_x0(x0)) / sigma;
            std::vector<Sym> ders{d};
            for (int j = 0; j < stored; ++j) ders.push_back(tr.history(j));
            int order = std::min(k + 1, 4);
            std::vector<double> coeffs;
            for (int j = 0; j < order; ++j) coeffs.push_back(lms_coefficient(s, order, k, j));
            Sym prev = x + sum(coeffs, ders, tr.zero());
            t.coefficients.push_back(tr.row(prev, {d, tr.history(0), tr.history(1)}));
            stored = std::min(stored + 1, 3);
            t.timesteps.push_back(ts[size_t(k)]);
            t.input_scale.push_back(1 / std::sqrt(s[size_t(k)] * s[size_t(k)] + 1));
            t.noise_coefficients.push_back({1.0, s[size_t(k)]});
        }
        return t;
    }
};

// --- Heun ------------------------------------------------------------------------------------------------------

class Heun : public Traced {
public:
    Heun(const Json &d, const Json &c, const std::map<std::string, Json> &ov) : Traced("heun", d, c, ov) {
        history_size_ = 2;
        sigma_name();
        init_clip();
    }

protected:
    SchedulerTables make_tables(int n, int start) override {
        VecF ts0, sig0;
        euler_sigmas(n, ts0, sig0);
        Vec sig{double(sig0[0])};
        for (int i = 1; i < n; ++i) sig.push_back(sig0[size_t(i)]), sig.push_back(sig0[size_t(i)]);
        sig.push_back(sig0[size_t(n)]);
        VecF ts{ts0[0]};
        for (int i = 1; i < n; ++i) ts.push_back(ts0[size_t(i)]), ts.push_back(ts0[size_t(i)]);
        float top = *std::max_element(sig0.begin(), sig0.end());
        const std::string &sp = str("timestep_spacing");
        SchedulerTables t;
        t.init_noise_sigma = (sp == "linspace" || sp == "trailing") ? double(top) : double(std::sqrt(top * top + 1.0f));
        bool v = str("prediction_type") == "v_prediction";
        auto x0_at = [&](const Tracer &tr, double s) {
            return v ? tr.output() * (-s / std::pow(s * s + 1, 0.5)) + tr.sample() / (s * s + 1) : tr.sample() - tr.output() * s;
        };
        double dt = 0;
        int first = 2 * start;
        for (int c = first; c < int(ts.size()); ++c) {
            Tracer tr = tracer();
            Sym x = tr.sample();
            if ((c - first) % 2 == 0) {
                double sigma = sig[size_t(c)], nxt = sig[size_t(c + 1)];
                Sym d = (x - tr.pred_x0(x0_at(tr, sigma))) / sigma;
                dt = nxt - sigma;
                t.coefficients.push_back(tr.row(x + d * dt, {d, x}));
            } else {
                double nxt = sig[size_t(c)];
                Sym d = (x - tr.pred_x0(x0_at(tr, nxt))) / nxt;
                d = (tr.history(0) + d) / 2;
                t.coefficients.push_back(tr.row(tr.history(1) + d * dt, {tr.zero(), tr.zero()}));
            }
            t.timesteps.push_back(ts[size_t(c)]);
            t.input_scale.push_back(1 / std::sqrt(sig[size_t(c)] * sig[size_t(c)] + 1));
            t.noise_coefficients.push_back({1.0, sig[size_t(c)]});
        }
        return t;
    }
};

// --- DDPM ------------------------------------------------------------------------------------------------------

class DDPM : public Traced {
public:
    DDPM(const Json &d, const Json &c, const std::map<std::string, Json> &ov) : Traced("ddpm", d, c, ov) {
        needs_noise_ = true;
        if (flag("thresholding")) throw model_error("DDPM's dynamic thresholding (for pixel-space models) is unsupported; turn it off");
        std::string vt = str_or(cfg("variance_type"), "");
        if (vt != "fixed_small" && vt != "fixed_small_log" && vt != "fixed_large")
            throw model_error("variance_type " + vt + " is not supported (learned variances need a model that predicts them; "
                              "fixed_large_log gives NaN in diffusers); use one of fixed_small, fixed_small_log, fixed_large");
        init_clip();
    }

protected:
    SchedulerTables make_tables(int n, int start) override {
        Vec ts = spaced_timesteps(str("timestep_spacing"), n, num_train_, int(num("steps_offset")), true);
        bool eps = str("prediction_type") == "epsilon", large = str("variance_type") == "fixed_large";
        SchedulerTables t;
        for (int k = start; k < n; ++k) {
            long tt = long(ts[size_t(k)]), prev_t = k + 1 < n ? long(ts[size_t(k + 1)]) : -1;
            double a = alpha(tt), a_prev = prev_t >= 0 ? alpha(prev_t) : 1.0;
            double cur_alpha = a / a_prev, cur_beta = 1 - cur_alpha;
            Tracer tr = tracer();
            Sym x = tr.sample(), out = tr.output(), x0;
            if (eps) {
                if (a == 0) throw model_error("epsilon prediction at a zero-SNR timestep divides by zero; use v_prediction");
                x0 = (x - out * std::pow(1 - a, 0.5)) / std::pow(a, 0.5);
            } else {
                x0 = x * std::pow(a, 0.5) - out * std::pow(1 - a, 0.5);
            }
            Sym prev = tr.pred_x0(x0) * (std::pow(a_prev, 0.5) * cur_beta / (1 - a)) + x * (std::pow(cur_alpha, 0.5) * (1 - a_prev) / (1 - a));
            if (tt > 0) {
                double std_ = large ? std::pow(cur_beta, 0.5) : std::pow(std::max((1 - a_prev) / (1 - a) * cur_beta, 1e-20), 0.5);
                prev = prev + tr.noise(history_size_) * std_;
            }
            t.coefficients.push_back(tr.row(prev, {}));
            t.timesteps.push_back(float(ts[size_t(k)]));
            t.input_scale.push_back(1.0);
            t.noise_coefficients.push_back(alpha_noise(tt));
        }
        return t;
    }
};

// --- LCM and TCD -----------------------------------------------------------------------------------------------

class LCM : public Traced {
public:
    LCM(const Json &d, const Json &c, const std::map<std::string, Json> &ov, const char *name = "lcm") : Traced(name, d, c, ov) {
        needs_noise_ = true;
        if (flag("thresholding")) throw model_error(name_ + "'s dynamic thresholding (for pixel-space models) is unsupported; turn it off");
        final_alpha_ = flag("set_alpha_to_one") ? 1.0 : double(alphas_cumprod_[0]);
        init_clip();
    }

protected:
    double final_alpha_;
    std::vector<long> lcm_timesteps(int n) const {
        int original = int(num("original_inference_steps"));
        if (original > num_train_) throw model_error("original_inference_steps " + std::to_string(original) + " exceeds the training timesteps");
        std::vector<long> origin;
        for (int i = 1; i <= original; ++i) origin.push_back(long(i) * (num_train_ / original) - 1);
        if (n > original || int(origin.size()) / n < 1)
            throw input_error(name_ + " takes at most original_inference_steps=" + std::to_string(original) + " steps; " + std::to_string(n) + " were asked for");
        std::reverse(origin.begin(), origin.end());
        std::vector<long> out;  // np.floor(np.linspace(0, L, n, endpoint=False)): i * (L / n)
        double step = double(origin.size()) / double(n);
        for (int i = 0; i < n; ++i) out.push_back(origin[size_t(std::floor(double(i) * step))]);
        return out;
    }
    void x0_eps(const Tracer &tr, double a, Sym &x0, Sym &eps) const {
        Sym x = tr.sample(), out = tr.output();
        if (str("prediction_type") == "epsilon") {
            if (a == 0) throw model_error("epsilon prediction at a zero-SNR timestep divides by zero; use v_prediction");
            x0 = (x - out * std::pow(1 - a, 0.5)) / std::pow(a, 0.5), eps = out;
        } else {
            x0 = x * std::pow(a, 0.5) - out * std::pow(1 - a, 0.5), eps = out * std::pow(a, 0.5) + x * std::pow(1 - a, 0.5);
        }
    }
    virtual Sym prev_of(Tracer &tr, const std::vector<long> &ts, int k, int n) {
        long t = ts[size_t(k)], prev_t = k + 1 < n ? ts[size_t(k + 1)] : t;
        double a = alpha(t), a_prev = prev_t >= 0 ? alpha(prev_t) : final_alpha_;
        double scaled = double(t) * num("timestep_scaling");
        double c_skip = 0.25 / (scaled * scaled + 0.25), c_out = scaled / std::pow(scaled * scaled + 0.25, 0.5);
        Sym x0, eps;
        x0_eps(tr, a, x0, eps);
        Sym denoised = tr.pred_x0(x0) * c_out + tr.sample() * c_skip;
        if (k == n - 1) return denoised;
        return denoised * std::pow(a_prev, 0.5) + tr.noise(history_size_) * std::pow(1 - a_prev, 0.5);
    }
    SchedulerTables make_tables(int n, int start) override {
        std::vector<long> ts = lcm_timesteps(n);
        SchedulerTables t;
        for (int k = start; k < n; ++k) {
            Tracer tr = tracer();
            Sym prev = prev_of(tr, ts, k, n);
            t.coefficients.push_back(tr.row(prev, {}));
            t.timesteps.push_back(float(ts[size_t(k)]));
            t.input_scale.push_back(1.0);
            t.noise_coefficients.push_back(alpha_noise(ts[size_t(k)]));
        }
        return t;
    }
};

class TCD : public LCM {
public:
    TCD(const Json &d, const Json &c, const std::map<std::string, Json> &ov) : LCM(d, c, ov, "tcd") {
        const Json &e = cfg("eta");
        eta_ = e.is_number() ? e.as_number() : 0.3;
        if (!(eta_ >= 0 && eta_ <= 1)) throw input_error("TCD's eta (gamma) must be in [0, 1]");
        needs_noise_ = eta_ > 0;
        clips_ = false;  // TCDScheduler.step never clamps x0
    }

protected:
    double eta_;
    Sym prev_of(Tracer &tr, const std::vector<long> &ts, int k, int n) override {
        long t = ts[size_t(k)], prev_t = k + 1 < n ? ts[size_t(k + 1)] : 0;
        long s_t = long(std::floor(float(1 - eta_) * float(prev_t)));
        double a = alpha(t), a_prev = prev_t >= 0 ? alpha(prev_t) : final_alpha_, a_s = alpha(s_t);
        Sym x0, eps;
        x0_eps(tr, a, x0, eps);
        Sym noised = x0 * std::pow(a_s, 0.5) + eps * std::pow(1 - a_s, 0.5);
        if (eta_ > 0 && k != n - 1) return noised * std::pow(a_prev / a_s, 0.5) + tr.noise(history_size_) * std::pow(1 - a_prev / a_s, 0.5);
        return noised;
    }
};

// --- DPM-Solver sigmas, shared by DPM++ 2S a and UniPC --------------------------------------------------------

struct DpmSchedule {
    std::vector<long> ts;
    VecF sigmas;  // [n + 1]
    Vec alpha, sig, lam;
    void derive() {
        for (float s32 : sigmas) {
            double s = s32, a = 1 / std::sqrt(s * s + 1);
            alpha.push_back(a), sig.push_back(s * a), lam.push_back(std::log(a) - std::log(s * a));
        }
    }
};

// --- DPM++ 2S a (singlestep) -----------------------------------------------------------------------------------

class DPMPP2SA : public Traced {
public:
    DPMPP2SA(const Json &d, const Json &c, const std::map<std::string, Json> &ov) : Traced("dpmpp_2s_a", d, c, ov) {
        history_size_ = 2;
        std::string alg = str_or(cfg("algorithm_type"), "");
        if (alg == "deis") cfg_["algorithm_type"] = Json::string(alg = "dpmsolver++");
        std::string st = str_or(cfg("solver_type"), "");
        if (st == "logrho" || st == "bh1" || st == "bh2") cfg_["solver_type"] = Json::string(st = "midpoint");
        if (alg != "dpmsolver++" && alg != "sde-dpmsolver++") throw model_error("algorithm_type " + alg + " is not supported; use 'sde-dpmsolver++'");
        if (!(cfg("solver_order").is_number() && num("solver_order") == 2))
            throw model_error("solver_order is not supported by sdrt's DPM-Solver++ 2S; it needs 2");
        for (const char *key : {"thresholding", "use_beta_sigmas", "use_flow_sigmas", "variance_type", "use_dynamic_shifting"})
            if (flag(key)) throw model_error(std::string(key) + " is not supported by sdrt's DPM-Solver++ 2S; turn it off");
        if (st != "midpoint" && st != "heun") throw model_error("solver_type " + st + " is not supported; use 'midpoint' or 'heun'");
        std::string fst = str_or(cfg("final_sigmas_type"), "");
        if (fst != "zero" && fst != "sigma_min") throw model_error("final_sigmas_type " + fst + " is not supported; use 'zero' or 'sigma_min'");
        sde_ = alg == "sde-dpmsolver++";
        needs_noise_ = sde_;
        name_ = sde_ ? "dpmpp_2s_a" : "dpmpp_2s";
        sigma_name();
    }

protected:
    bool sde_;
    DpmSchedule schedule(int n) {
        const VecF &ac = alphas_cumprod_;
        DpmSchedule d;
        float clipped_at = float(num("lambda_min_clipped"));
        long clipped = 0;  // searchsorted(lambdas[::-1], lambda_min_clipped), lambdas in float32
        for (long j = long(ac.size()) - 1; j >= 0; --j) {
            float l = std::log(std::sqrt(ac[size_t(j)])) - std::log(std::sqrt(1.0f - ac[size_t(j)]));
            if (l < clipped_at) ++clipped;
            else break;
        }
        Vec lin = np_linspace(0, double(num_train_ - 1 - clipped), n + 1);
        for (int i = n; i >= 1; --i) d.ts.push_back(long(round_half_even(lin[size_t(i)])));
        VecF train = train_sigmas(ac);
        Vec s;
        if (flag("use_karras_sigmas") || flag("use_exponential_sigmas")) {
            Vec flipped(train.rbegin(), train.rend());
            s = flag("use_karras_sigmas") ? karras_sigmas(flipped, n, nullptr, nullptr) : exponential_sigmas(flipped, n, nullptr, nullptr);
            VecF logs = log_f32(train);
            for (int i = 0; i < n; ++i) {
                double tt = sigma_to_t(s[size_t(i)], logs);
                d.ts[size_t(i)] = long(flag("use_karras_sigmas") ? round_half_even(tt) : tt);
            }
        } else {
            for (long t : d.ts) s.push_back(np_interp(double(t), train));
        }
        for (double x : s) d.sigmas.push_back(float(x));
        d.sigmas.push_back(str("final_sigmas_type") == "sigma_min" ? train[0] : 0.0f);
        d.derive();
        return d;
    }
    SchedulerTables make_tables(int n, int start) override {
        DpmSchedule d = schedule(n);
        bool lower_final = flag("lower_order_final") || n % 2 != 0 || str("final_sigmas_type") == "zero";
        std::vector<int> orders;
        if (lower_final) {
            for (int i = 0; i < (n % 2 == 0 ? n / 2 - 1 : n / 2); ++i) orders.push_back(1), orders.push_back(2);
            if (n % 2 == 0) orders.push_back(1), orders.push_back(1);
            else orders.push_back(1);
        } else {
            for (int i = 0; i < n / 2; ++i) orders.push_back(1), orders.push_back(2);
        }
        if (str("final_sigmas_type") == "zero") orders.back() = 1;
        bool eps = str("prediction_type") == "epsilon", midpoint = str("solver_type") == "midpoint";
        const Vec &alpha = d.alpha, &sig = d.sig, &lam = d.lam;
        SchedulerTables t;
        int stored = 0;
        for (int k = start; k < n; ++k) {
            Tracer tr = tracer();
            Sym x = tr.sample(), out = tr.output();
            Sym x0 = eps ? (x - out * sig[size_t(k)]) / alpha[size_t(k)] : x * alpha[size_t(k)] - out * sig[size_t(k)];
            Sym m_prev = tr.history(0);
            stored = std::min(stored + 1, 2);
            int order = stored >= orders[size_t(k)] ? orders[size_t(k)] : 1;
            Sym saved = order == 1 ? x : tr.history(1);
            int src = order == 1 ? k : k - 1;
            double h = lam[size_t(k + 1)] - lam[size_t(src)], a_next = alpha[size_t(k + 1)];
            Sym prev;
            double d1, c;
            if (sde_) {
                double e = -std::expm1(-2 * h);
                prev = saved * (sig[size_t(k + 1)] / sig[size_t(src)] * std::exp(-h)) + x0 * (a_next * e);
                prev = prev + tr.noise(history_size_) * (sig[size_t(k + 1)] * std::sqrt(e));
                d1 = midpoint ? 0.5 * a_next * e : a_next * (e / (-2 * h) + 1);
                c = a_next * e;
            } else {
                double em1 = std::expm1(-h);
                prev = saved * (sig[size_t(k + 1)] / sig[size_t(src)]) - x0 * (a_next * em1);
                d1 = midpoint ? -0.5 * a_next * em1 : a_next * (em1 / h + 1);
                c = a_next * -em1;
            }
            if (order == 2) {
                double r0 = (lam[size_t(k)] - lam[size_t(k - 1)]) / h;
                Sym D1 = (x0 - m_prev) / r0;
                prev = prev - x0 * c + m_prev * c + D1 * d1;
            }
            t.coefficients.push_back(tr.row(prev, {x0, saved}));
            t.timesteps.push_back(float(d.ts[size_t(k)]));
            t.input_scale.push_back(1.0);
            float s32 = d.sigmas[size_t(k)], a32 = 1.0f / std::sqrt(s32 * s32 + 1.0f);
            t.noise_coefficients.push_back({double(a32), double(s32 * a32)});
        }
        return t;
    }
};

// --- UniPC ------------------------------------------------------------------------------------------------------

Vec solve(std::vector<Vec> A, Vec b) {  // Gaussian elimination with partial pivoting (numpy.linalg.solve)
    size_t n = b.size();
    for (size_t c = 0; c < n; ++c) {
        size_t p = c;
        for (size_t r = c + 1; r < n; ++r)
            if (std::fabs(A[r][c]) > std::fabs(A[p][c])) p = r;
        std::swap(A[c], A[p]), std::swap(b[c], b[p]);
        for (size_t r = c + 1; r < n; ++r) {
            double f = A[r][c] / A[c][c];
            for (size_t k = c; k < n; ++k) A[r][k] -= f * A[c][k];
            b[r] -= f * b[c];
        }
    }
    Vec x(n);
    for (size_t i = n; i-- > 0;) {
        double acc = b[i];
        for (size_t k = i + 1; k < n; ++k) acc -= A[i][k] * x[k];
        x[i] = acc / A[i][i];
    }
    return x;
}

class UniPC : public Traced {
public:
    UniPC(const Json &d, const Json &c, const std::map<std::string, Json> &ov) : Traced("unipc", d, c, ov) {
        std::string st = str_or(cfg("solver_type"), "");
        if (st == "midpoint" || st == "heun" || st == "logrho") cfg_["solver_type"] = Json::string(st = "bh2");
        if (st != "bh1" && st != "bh2") throw model_error("solver_type " + st + " is not supported; use 'bh1' or 'bh2'");
        for (const char *key : {"thresholding", "use_beta_sigmas", "use_flow_sigmas", "use_dynamic_shifting", "solver_p", "shift_terminal"})
            if (flag(key)) throw model_error(std::string(key) + " is not supported by sdrt's UniPC; turn it off");
        order_ = int(num("solver_order"));
        if (order_ < 1 || order_ > 3) throw model_error("solver_order " + std::to_string(order_) + " is not supported; use 1, 2 or 3");
        std::string fst = str_or(cfg("final_sigmas_type"), "");
        if (fst != "zero" && fst != "sigma_min") throw model_error("final_sigmas_type " + fst + " is not supported; use zero or sigma_min");
        if (flag("rescale_betas_zero_snr")) alphas_cumprod_.back() = 0x1p-24f;
        history_size_ = order_ + 1;
        if (const Json &dc = cfg("disable_corrector"); dc.is_array())
            for (const auto &v : dc.as_array()) disabled_.push_back(long(v.as_number()));
        sigma_name();
    }

protected:
    int order_;
    std::vector<long> disabled_;
    DpmSchedule schedule(int n) {
        DpmSchedule d;
        const std::string &sp = str("timestep_spacing");
        const int T = num_train_;
        if (sp == "linspace") {
            Vec lin = np_linspace(0, double(T - 1), n + 1);
            for (int i = n; i >= 1; --i) d.ts.push_back(long(round_half_even(lin[size_t(i)])));
        } else if (sp == "leading") {
            long ratio = T / (n + 1), off = long(num("steps_offset"));
            for (int i = n; i >= 1; --i) d.ts.push_back(long(i) * ratio + off);
        } else {
            Vec tr = spaced_timesteps("trailing", n, T, 0, true);
            for (double x : tr) d.ts.push_back(long(x));
        }
        VecF train = train_sigmas(alphas_cumprod_);
        Vec s;
        float final_sigma = str("final_sigmas_type") == "sigma_min" ? train[0] : 0.0f;
        if (flag("use_karras_sigmas") || flag("use_exponential_sigmas")) {
            Vec flipped(train.rbegin(), train.rend());
            bool karras = flag("use_karras_sigmas");
            s = karras ? karras_sigmas(flipped, n, &cfg("sigma_min"), &cfg("sigma_max"))
                       : exponential_sigmas(flipped, n, &cfg("sigma_min"), &cfg("sigma_max"));
            VecF logs = log_f32(train);
            d.ts.assign(size_t(n), 0);
            for (int i = 0; i < n; ++i) {
                double tt = sigma_to_t(s[size_t(i)], logs);
                d.ts[size_t(i)] = long(karras ? round_half_even(tt) : tt);
            }
            if (str("final_sigmas_type") == "sigma_min") final_sigma = float(s.back());
        } else {
            for (long t : d.ts) s.push_back(np_interp(double(t), train));
        }
        for (double x : s) d.sigmas.push_back(float(x));
        d.sigmas.push_back(final_sigma);
        d.derive();
        return d;
    }
    SchedulerTables make_tables(int n, int start) override {
        DpmSchedule d = schedule(n);
        const Vec &alpha = d.alpha, &sig = d.sig, &lam = d.lam;
        bool x0_mode = flag("predict_x0"), eps = str("prediction_type") == "epsilon", bh1 = str("solver_type") == "bh1";
        bool lower_final = flag("lower_order_final");
        const int L = int(d.ts.size());
        auto convert = [&](const Tracer &tr, int k) {
            Sym x = tr.sample(), out = tr.output();
            if (x0_mode) return eps ? (x - out * sig[size_t(k)]) / alpha[size_t(k)] : x * alpha[size_t(k)] - out * sig[size_t(k)];
            return eps ? out : out * alpha[size_t(k)] + x * sig[size_t(k)];
        };
        // UniP (corrector == nullptr) or UniC, as diffusers' multistep_uni_{p,c}_bh_update.
        auto update = [&](int t_idx, int s0_idx, const Sym &x, const Sym &m0, const std::vector<Sym> &ms, int order, const Sym *corrector) {
            double h = lam[size_t(t_idx)] - lam[size_t(s0_idx)];
            Vec rks;
            std::vector<Sym> d1s;
            for (int i = 1; i < order; ++i) {
                double rk = (lam[size_t(s0_idx - i)] - lam[size_t(s0_idx)]) / h;
                rks.push_back(rk);
                d1s.push_back((ms[size_t(i - 1)] - m0) / rk);
            }
            rks.push_back(1.0);
            double hh = x0_mode ? -h : h;
            double h_phi_1 = std::expm1(hh), h_phi_k = h_phi_1 / hh - 1, factorial = 1;
            double B_h = bh1 ? hh : h_phi_1;
            Vec b;
            for (int i = 1; i <= order; ++i) {
                b.push_back(h_phi_k * factorial / B_h);
                factorial *= i + 1;
                h_phi_k = h_phi_k / hh - 1 / factorial;
            }
            std::vector<Vec> R;
            for (int i = 1; i <= order; ++i) {
                Vec row;
                for (double rk : rks) row.push_back(std::pow(rk, i - 1));
                R.push_back(row);
            }
            Sym base = x0_mode ? x * (sig[size_t(t_idx)] / sig[size_t(s0_idx)]) - m0 * (alpha[size_t(t_idx)] * h_phi_1)
                               : x * (alpha[size_t(t_idx)] / alpha[size_t(s0_idx)]) - m0 * (sig[size_t(t_idx)] * h_phi_1);
            double scale = (x0_mode ? alpha[size_t(t_idx)] : sig[size_t(t_idx)]) * B_h;
            if (!corrector) {
                if (d1s.empty()) return base;
                Vec rhos;
                if (order == 2) {
                    rhos = {0.5};
                } else {
                    std::vector<Vec> Rs;
                    for (int i = 0; i < order - 1; ++i) Rs.push_back(Vec(R[size_t(i)].begin(), R[size_t(i)].end() - 1));
                    rhos = solve(Rs, Vec(b.begin(), b.end() - 1));
                }
                return base - sum(rhos, d1s, x * 0.0) * scale;
            }
            Vec rhos = order == 1 ? Vec{0.5} : solve(R, b);
            Sym corr = sum(Vec(rhos.begin(), rhos.end() - 1), d1s, x * 0.0);
            return base - (corr + (*corrector - m0) * rhos.back()) * scale;
        };
        SchedulerTables t;
        int stored = 0, this_order = 0;
        bool have_last = false;
        for (int k = start; k < L; ++k) {
            Tracer tr = tracer();
            std::vector<Sym> ms;
            for (int j = 0; j < order_; ++j) ms.push_back(tr.history(j));
            Sym last = tr.history(order_), m_t = convert(tr, k), x = tr.sample();
            if (k > 0 && std::find(disabled_.begin(), disabled_.end(), long(k - 1)) == disabled_.end() && have_last)
                x = update(k, k - 1, last, ms[0], std::vector<Sym>(ms.begin() + 1, ms.end()), this_order, &m_t);
            std::vector<Sym> new_ms{m_t};
            for (int j = 0; j < order_ - 1; ++j) new_ms.push_back(ms[size_t(j)]);
            this_order = lower_final ? std::min(order_, L - k) : order_;
            this_order = std::min(this_order, stored + 1);
            Sym prev = update(k + 1, k, x, m_t, std::vector<Sym>(new_ms.begin() + 1, new_ms.end()), this_order, nullptr);
            stored = std::min(stored + 1, order_);
            have_last = true;
            new_ms.push_back(x);
            t.coefficients.push_back(tr.row(prev, new_ms));
            t.timesteps.push_back(float(d.ts[size_t(k)]));
            t.input_scale.push_back(1.0);
            float s32 = d.sigmas[size_t(k)], a32 = 1.0f / std::sqrt(s32 * s32 + 1.0f);
            t.noise_coefficients.push_back({double(a32), double(s32 * a32)});
        }
        return t;
    }
};

// --- PNDM with the Runge-Kutta warm-up (skip_prk_steps false) ----------------------------------------------------

class PNDMRungeKutta : public Traced {
public:
    PNDMRungeKutta(const Json &d, const Json &c, const std::map<std::string, Json> &ov) : Traced("pndm", d, c, ov) {
        history_size_ = 5;
        final_alpha_ = flag("set_alpha_to_one") ? 1.0 : double(alphas_cumprod_[0]);
    }

protected:
    double final_alpha_;
    SchedulerTables make_tables(int n, int start) override {
        if (n < 4) throw input_error("PNDM with Runge-Kutta warm-up (skip_prk_steps false) needs >= 4 steps, not " + std::to_string(n));
        const long T = num_train_, half = T / n / 2, ratio = T / n;
        Vec desc = spaced_timesteps(str("timestep_spacing"), n, num_train_, int(num("steps_offset")), true);
        std::vector<long> asc;
        for (auto it = desc.rbegin(); it != desc.rend(); ++it) asc.push_back(long(*it));
        std::vector<long> pairs;  // asc[-4:].repeat(2) + tile([0, half], 4), then [:-1].repeat(2)[1:-1][::-1]
        for (size_t i = asc.size() - 4; i < asc.size(); ++i) pairs.push_back(asc[i]), pairs.push_back(asc[i] + half);
        pairs.pop_back();
        std::vector<long> rep;
        for (long x : pairs) rep.push_back(x), rep.push_back(x);
        std::vector<long> prk(rep.begin() + 1, rep.end() - 1);
        std::reverse(prk.begin(), prk.end());
        std::vector<long> full = prk;
        for (size_t i = asc.size() - 3; i-- > 0;) full.push_back(asc[i]);
        bool v = str("prediction_type") == "v_prediction";
        auto prev_sample = [&](const Sym &x, long t, long t_prev, Sym mo) {
            double a = alpha(t), a_prev = t_prev >= 0 ? alpha(t_prev) : final_alpha_;
            if (v) mo = mo * std::pow(a, 0.5) + x * std::pow(1 - a, 0.5);
            double denom = a * std::pow(1 - a_prev, 0.5) + std::pow(a * (1 - a) * a_prev, 0.5);
            return x * std::pow(a_prev / a, 0.5) - mo * ((a_prev - a) / denom);
        };
        SchedulerTables tab;
        int n_ets = 0;
        bool has_cur = false;
        for (size_t counter = 0; counter + size_t(start) < full.size(); ++counter) {
            long t = full[counter + size_t(start)];
            Tracer tr = tracer();
            Sym x = tr.sample(), out = tr.output(), cur = tr.history(3), acc = tr.history(4), mo;
            std::vector<Sym> ets;  // oldest -> newest
            for (int j = std::min(n_ets, 3) - 1; j >= 0; --j) ets.push_back(tr.history(j));
            Sym prev;
            if (counter < prk.size()) {
                long t_prev = t - (counter % 2 ? 0 : half), t_base = prk[counter / 4 * 4];
                mo = out;
                if (counter % 4 == 0) {
                    acc = acc + out * (1 / 6.0);
                    ets.push_back(out);
                    cur = x, has_cur = true;
                } else if (counter % 4 == 1 || counter % 4 == 2) {
                    acc = acc + out * (1 / 3.0);
                } else {
                    mo = acc + out * (1 / 6.0);
                    acc = tr.zero();
                }
                prev = prev_sample(has_cur ? cur : x, t_base, t_prev, mo);
            } else {
                long t_prev = t - ratio;
                if (counter != 1) {
                    if (ets.size() > 3) ets.erase(ets.begin(), ets.end() - 3);
                    ets.push_back(out);
                } else {
                    t_prev = t, t = t + ratio;
                }
                size_t e = ets.size();
                if (e == 1 && counter == 0) {
                    mo = out, cur = x, has_cur = true;
                } else if (e == 1 && counter == 1) {
                    mo = (out + ets[0]) / 2, x = cur, has_cur = false, cur = tr.zero();
                } else if (e == 2) {
                    mo = (ets[1] * 3 - ets[0]) / 2;
                } else if (e == 3) {
                    mo = (ets[2] * 23 - ets[1] * 16 + ets[0] * 5) / 12;
                } else {
                    mo = (ets[e - 1] * 55 - ets[e - 2] * 59 + ets[e - 3] * 37 - ets[e - 4] * 9) * (1 / 24.0);
                }
                prev = prev_sample(x, t, t_prev, mo);
            }
            n_ets = int(ets.size());
            std::vector<Sym> hist;
            for (size_t j = 0; j < 3; ++j) hist.push_back(j < ets.size() ? ets[ets.size() - 1 - j] : tr.zero());
            hist.push_back(has_cur ? cur : tr.zero());
            hist.push_back(acc);
            tab.coefficients.push_back(tr.row(prev, hist));
            tab.timesteps.push_back(float(full[counter + size_t(start)]));
            tab.input_scale.push_back(1.0);
            tab.noise_coefficients.push_back(alpha_noise(full[counter + size_t(start)]));
        }
        return tab;
    }
};

// A resolved config's value, as the base constructor resolves it (overrides, then the config unless listed in
// _use_default_values, then the defaults).
const Json &resolved(const std::string &key, const Json &defaults, const Json &config, const std::map<std::string, Json> &ov) {
    static const Json null_value;
    if (auto it = ov.find(key); it != ov.end()) return it->second;
    bool ignored = false;
    if (const Json *u = config.find("_use_default_values"); u && u->is_array())
        for (const auto &k : u->as_array()) ignored = ignored || (k.is_string() && k.as_string() == key);
    if (const Json *given = config.find(key); given && !ignored) return *given;
    const Json *d = defaults.find(key);
    return d ? *d : null_value;
}

}  // namespace

std::unique_ptr<Scheduler> detail::make_traced(const std::string &cls, const Json &defaults, const Json &config,
                                               const std::map<std::string, Json> &ov) {
    if (cls == "lms") return std::unique_ptr<Scheduler>(new LMS(defaults, config, ov));
    if (cls == "heun") return std::unique_ptr<Scheduler>(new Heun(defaults, config, ov));
    if (cls == "unipc") return std::unique_ptr<Scheduler>(new UniPC(defaults, config, ov));
    if (cls == "dpmpp_2s_a") return std::unique_ptr<Scheduler>(new DPMPP2SA(defaults, config, ov));
    if (cls == "ddpm") return std::unique_ptr<Scheduler>(new DDPM(defaults, config, ov));
    if (cls == "lcm") return std::unique_ptr<Scheduler>(new LCM(defaults, config, ov));
    if (cls == "tcd") return std::unique_ptr<Scheduler>(new TCD(defaults, config, ov));
    if (cls == "pndm_rk") return std::unique_ptr<Scheduler>(new PNDMRungeKutta(defaults, config, ov));
    return nullptr;
}

bool detail::pndm_runs_prk(const Json &defaults, const Json &config, const std::map<std::string, Json> &ov) {
    return !resolved("skip_prk_steps", defaults, config, ov).truthy();
}

}  // namespace sdrt
