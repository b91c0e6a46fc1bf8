// The DPM-Solver family of traced schedulers (DPM++ 2S a, UniPC): their make_tables are the Python `_tables` of
// runtime/schedulers/, written on the symbolic arrays of scheduler_traced.h.
#include "scheduler_traced.h"

namespace sdrt::traced {

namespace {

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

}  // namespace

std::unique_ptr<Scheduler> make_dpm_solver(const std::string &cls, const Json &defaults, const Json &config,
                                           const std::map<std::string, Json> &ov) {
    if (cls == "unipc") return std::unique_ptr<Scheduler>(new UniPC(defaults, config, ov));
    if (cls == "dpmpp_2s_a") return std::unique_ptr<Scheduler>(new DPMPP2SA(defaults, config, ov));
    return nullptr;
}

}  // namespace sdrt::traced
