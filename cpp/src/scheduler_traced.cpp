// The traced schedulers of runtime/schedulers/ (LMS, Heun, DDPM, LCM, TCD, PNDM's Runge-Kutta warm-up; DPM++ 2S a
// and UniPC live in scheduler_dpm_solver.cpp): each make_tables is its Python `_tables`, written on symbolic arrays
// and applied by the shared update of scheduler_traced.h.
#include "scheduler_traced.h"

namespace sdrt {

namespace {

using namespace traced;

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
        calls_per_step_ = 2;
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
    if (cls == "ddpm") return std::unique_ptr<Scheduler>(new DDPM(defaults, config, ov));
    if (cls == "lcm") return std::unique_ptr<Scheduler>(new LCM(defaults, config, ov));
    if (cls == "tcd") return std::unique_ptr<Scheduler>(new TCD(defaults, config, ov));
    if (cls == "pndm_rk") return std::unique_ptr<Scheduler>(new PNDMRungeKutta(defaults, config, ov));
    return traced::make_dpm_solver(cls, defaults, config, ov);
}

bool detail::pndm_runs_prk(const Json &defaults, const Json &config, const std::map<std::string, Json> &ov) {
    return !resolved("skip_prk_steps", defaults, config, ov).truthy();
}

}  // namespace sdrt
