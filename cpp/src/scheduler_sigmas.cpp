// The sigma-parameterised schedulers (Euler, Euler ancestral, DPM-Solver++ 2M and 2M SDE, with Karras or exponential
// sigmas) and Scheduler::create, the C++ make_scheduler. Ports of runtime/schedulers/{euler,euler_ancestral,dpmpp_2m}.py.
#include <algorithm>
#include <cmath>

#include "schedule_math.h"
#include "scheduler.h"
#include "util.h"

namespace sdrt {

namespace {

std::string str_or(const Json &v, const char *fallback) { return v.is_string() ? v.as_string() : fallback; }

class Euler : public Scheduler {
public:
    Euler(const Json &defaults, const Json &config, const std::map<std::string, Json> &ov, const char *name = "euler")
        : Scheduler(name, defaults, config, ov) {
        if (flag("use_beta_sigmas")) throw model_error("use_beta_sigmas is not supported by sdrt's " + name_ + "; use Karras or exponential sigmas");
        if (flag("use_karras_sigmas") && flag("use_exponential_sigmas"))
            throw model_error("use_karras_sigmas and use_exponential_sigmas exclude each other; set one");
        if (str_or(cfg("interpolation_type"), "linear") != "linear") throw model_error("interpolation_type is not supported; use 'linear'");
        if (str_or(cfg("timestep_type"), "discrete") == "continuous" && str("prediction_type") == "v_prediction")
            throw model_error("timestep_type 'continuous' (log-sigma timesteps) is not supported; use 'discrete'");
        std::string fst = str_or(cfg("final_sigmas_type"), "zero");
        if (fst != "zero" && fst != "sigma_min") throw model_error("final_sigmas_type " + fst + " is unsupported; use zero or sigma_min");
        if (flag("use_karras_sigmas")) name_ += "_karras";
        else if (flag("use_exponential_sigmas")) name_ += "_exponential";
        if (flag("rescale_betas_zero_snr")) alphas_cumprod_.back() = 0x1p-24f;
    }

protected:
    // float32 timesteps [n] and sigmas [n + 1], as diffusers' set_timesteps.
    void sigmas(int n, VecF &timesteps, VecF &sig) {
        Vec ts = spaced_timesteps(str("timestep_spacing"), n, num_train_, int(num("steps_offset")), false);
        VecF train = train_sigmas(alphas_cumprod_);
        Vec s(n);
        for (int i = 0; i < n; ++i) s[i] = np_interp(double(float(ts[i])), train);
        if (flag("use_karras_sigmas")) {
            s = karras_sigmas(s, n, &cfg("sigma_min"), &cfg("sigma_max"));
            VecF logs = log_f32(train);
            for (int i = 0; i < n; ++i) ts[i] = sigma_to_t(s[i], logs);
        } else if (flag("use_exponential_sigmas")) {
            s = exponential_sigmas(s, n, &cfg("sigma_min"), &cfg("sigma_max"));
            VecF logs = log_f32(train);
            for (int i = 0; i < n; ++i) ts[i] = sigma_to_t(s[i], logs);
        }
        double last = cfg("final_sigmas_type").is_string() && str("final_sigmas_type") == "sigma_min" ? double(train[0]) : 0.0;
        timesteps.assign(n, 0.0f);
        sig.assign(n + 1, 0.0f);
        for (int i = 0; i < n; ++i) timesteps[i] = float(ts[i]), sig[i] = float(s[i]);
        sig[n] = float(last);
    }
    SchedulerTables make_tables(int n, int start) override {
        VecF ts, sig;
        sigmas(n, ts, sig);
        float top = *std::max_element(sig.begin(), sig.end());
        const std::string &sp = str("timestep_spacing");
        SchedulerTables t;
        t.init_noise_sigma = (sp == "linspace" || sp == "trailing") ? double(top) : double(std::sqrt(top * top + 1.0f));
        for (int k = start; k < n; ++k) {
            double s = sig[k], s_next = sig[k + 1];
            t.timesteps.push_back(ts[k]);
            t.coefficients.push_back(rows(s, s_next));
            t.input_scale.push_back(1 / std::sqrt(s * s + 1));
            t.noise_coefficients.push_back({1.0, s});
        }
        return t;
    }
    virtual std::vector<double> rows(double s, double s_next) {
        double dt = s_next - s;
        if (str("prediction_type") == "epsilon") return {1.0, dt};
        return {1 + dt * s / (s * s + 1), dt / std::sqrt(s * s + 1)};
    }
    void update(const float *c, float *s, const float *o, std::vector<std::vector<float>> &, const float *, size_t n) override {
        for (size_t k = 0; k < n; ++k) s[k] = s[k] * c[0] + o[k] * c[1];
    }
};

class EulerAncestral : public Euler {
public:
    EulerAncestral(const Json &defaults, const Json &config, const std::map<std::string, Json> &ov)
        : Euler(defaults, config, ov, "euler_a") {
        needs_noise_ = true;
    }

protected:
    std::vector<double> rows(double s, double s_next) override {
        double up = std::sqrt(s_next * s_next * (s * s - s_next * s_next) / (s * s));
        double down = std::sqrt(std::max(s_next * s_next - up * up, 0.0));
        std::vector<double> r = Euler::rows(s, down);
        r.push_back(up);
        return r;
    }
    void update(const float *c, float *s, const float *o, std::vector<std::vector<float>> &, const float *noise, size_t n) override {
        for (size_t k = 0; k < n; ++k) s[k] = s[k] * c[0] + o[k] * c[1] + noise[k] * c[2];
    }
};

class DPMPP2M : public Scheduler {
public:
    // sde: DPM++ 2M SDE (algorithm_type "sde-dpmsolver++"), rows gain prev_from_noise.
    DPMPP2M(const Json &defaults, const Json &config, const std::map<std::string, Json> &ov, bool sde = false)
        : Scheduler(sde ? "dpmpp_2m_sde" : "dpmpp_2m", defaults, config, ov), sde_(sde) {
        history_size_ = 1;
        needs_noise_ = sde;
        if (str_or(cfg("algorithm_type"), "") == "deis") cfg_["algorithm_type"] = Json::string("dpmsolver++");
        std::string st = str_or(cfg("solver_type"), "");
        if (st == "logrho" || st == "bh1" || st == "bh2") cfg_["solver_type"] = Json::string("midpoint");
        if (!(cfg("solver_order").is_number() && num("solver_order") == 2))
            throw model_error("solver_order is not supported by sdrt's DPM-Solver++ 2M; it needs 2");
        if (flag("use_karras_sigmas") && flag("use_exponential_sigmas"))
            throw model_error("use_karras_sigmas and use_exponential_sigmas exclude each other; set one");
        if (str_or(cfg("algorithm_type"), "") != (sde ? "sde-dpmsolver++" : "dpmsolver++"))
            throw model_error(std::string("algorithm_type is not supported by sdrt's DPM-Solver++ 2M; it needs '") +
                              (sde ? "sde-dpmsolver++" : "dpmsolver++") + "'");
        for (const char *key : {"thresholding", "use_beta_sigmas", "use_lu_lambdas", "use_flow_sigmas", "variance_type"})
            if (flag(key)) throw model_error(std::string(key) + " is not supported by sdrt's DPM-Solver++ 2M; turn it off");
        st = str_or(cfg("solver_type"), "");
        if (st != "midpoint" && st != "heun") throw model_error("solver_type " + st + " is not supported; use 'midpoint' or 'heun'");
        std::string fst = str_or(cfg("final_sigmas_type"), "");
        if (fst != "zero" && fst != "sigma_min") throw model_error("final_sigmas_type " + fst + " is not supported; use 'zero' or 'sigma_min'");
        if (flag("rescale_betas_zero_snr")) alphas_cumprod_.back() = 0x1p-24f;
        if (flag("use_karras_sigmas")) name_ += "_karras";
        else if (flag("use_exponential_sigmas")) name_ += "_exponential";
    }

protected:
    void sigmas(int n, std::vector<long> &ts, VecF &sig) {
        const VecF &ac = alphas_cumprod_;
        const int T = num_train_;
        float clipped = float(num("lambda_min_clipped"));
        int below = 0;  // searchsorted(lambdas[::-1], lambda_min_clipped): lambdas ascending from the end
        for (size_t i = 0; i < ac.size(); ++i) {
            float lam = float(std::log(double(std::sqrt(ac[i])))) - float(std::log(double(std::sqrt(1.0f - ac[i]))));
            if (lam < clipped) ++below;
        }
        int last = T - below;
        Vec raw;
        const std::string &sp = str("timestep_spacing");
        if (sp == "linspace") {
            Vec lin = np_linspace(0, last - 1, n + 1);
            for (int k = n; k >= 1; --k) raw.push_back(round_half_even(lin[k]));
        } else if (sp == "leading") {
            long step = last / (n + 1);
            for (int k = n; k >= 1; --k) raw.push_back(double(k * step) + num("steps_offset"));
        } else {
            for (double v : np_arange(last, 0, -double(T) / n)) raw.push_back(round_half_even(v) - 1);
        }
        VecF train = train_sigmas(ac);
        Vec s(raw.size());
        ts.assign(raw.size(), 0);
        if (flag("use_karras_sigmas")) {
            Vec flipped(train.rbegin(), train.rend());
            s = karras_sigmas(flipped, n, nullptr, nullptr);
            VecF logs = log_f32(train);
            bool cosine = str("beta_schedule") == "squaredcos_cap_v2";
            ts.assign(s.size(), 0);
            for (size_t i = 0; i < s.size(); ++i) {
                double t = sigma_to_t(s[i], logs);
                ts[i] = long(cosine ? t : round_half_even(t));
            }
        } else if (flag("use_exponential_sigmas")) {  // timesteps truncated to int64, not rounded, as diffusers
            Vec flipped(train.rbegin(), train.rend());
            s = exponential_sigmas(flipped, n, nullptr, nullptr);
            VecF logs = log_f32(train);
            ts.assign(s.size(), 0);
            for (size_t i = 0; i < s.size(); ++i) ts[i] = long(sigma_to_t(s[i], logs));
        } else {
            for (size_t i = 0; i < raw.size(); ++i) ts[i] = long(raw[i]), s[i] = np_interp(double(ts[i]), train);
        }
        double final_sigma = str("final_sigmas_type") == "sigma_min" ? double(train[0]) : 0.0;
        sig.clear();
        for (double v : s) sig.push_back(float(v));
        sig.push_back(float(final_sigma));
    }
    SchedulerTables make_tables(int n, int start) override {
        std::vector<long> ts;
        VecF sigmas32;
        sigmas(n, ts, sigmas32);
        const size_t m = sigmas32.size();
        Vec alpha(m), sig(m), lam(m);
        for (size_t i = 0; i < m; ++i) {
            double s = sigmas32[i];
            alpha[i] = 1 / std::sqrt(s * s + 1);
            sig[i] = s * alpha[i];
            lam[i] = std::log(alpha[i]) - std::log(sig[i]);  // the final sigma 0 gives +inf, as intended
        }
        bool eps = str("prediction_type") == "epsilon", midpoint = str("solver_type") == "midpoint";
        const long len = long(ts.size());
        SchedulerTables t;
        for (long k = start; k < len; ++k) {
            double x0a = eps ? 1 / alpha[k] : alpha[k], x0b = eps ? -sig[k] / alpha[k] : -sig[k];
            double h = lam[k + 1] - lam[k];
            double a = alpha[k + 1] * std::expm1(sde_ ? -2 * h : -h);  // SDE: e^-2h where the ODE has e^-h
            bool final = k == len - 1 && (flag("euler_at_final") || (flag("lower_order_final") && len < 15) ||
                                          str("final_sigmas_type") == "zero");
            double c0, c1;
            if (k == start || final) {
                c0 = -a, c1 = 0.0;
            } else {
                double r = (lam[k] - lam[k - 1]) / h;
                if (midpoint) {
                    c0 = -a - 0.5 * a / r, c1 = 0.5 * a / r;
                } else {
                    double b = alpha[k + 1] * (sde_ ? std::expm1(-2 * h) / (2 * h) + 1 : std::expm1(-h) / h + 1);
                    c0 = -a + b / r, c1 = -b / r;
                }
            }
            if (sde_)
                t.coefficients.push_back({x0a, x0b, sig[k + 1] / sig[k] * std::exp(-h), c0, c1, sig[k + 1] * std::sqrt(-std::expm1(-2 * h))});
            else
                t.coefficients.push_back({x0a, x0b, sig[k + 1] / sig[k], c0, c1});
            float s32 = sigmas32[k];
            float a32 = 1.0f / std::sqrt(s32 * s32 + 1.0f);
            t.noise_coefficients.push_back({double(a32), double(s32 * a32)});
            t.timesteps.push_back(float(ts[k]));
            t.input_scale.push_back(1.0);
        }
        return t;
    }
    void update(const float *c, float *s, const float *o, std::vector<std::vector<float>> &h, const float *noise, size_t n) override {
        float *x0_prev = h[0].data();
        for (size_t k = 0; k < n; ++k) {
            float x0 = s[k] * c[0] + o[k] * c[1];
            float prev = s[k] * c[2] + x0 * c[3] + x0_prev[k] * c[4];
            s[k] = sde_ ? prev + noise[k] * c[5] : prev;
            x0_prev[k] = x0;
        }
    }
    bool sde_;
};

}  // namespace

std::unique_ptr<Scheduler> Scheduler::create(const std::string &name, const Json &config, const SchedulerFamily &family) {
    if (!config.is_object()) throw model_error("the scheduler config is not a JSON object");
    auto defaults = [&](const char *key) -> const Json & {
        auto it = family.defaults.find(key);
        if (it == family.defaults.end())
            throw model_error(std::string("the export's family spec has no default config for scheduler ") + key +
                              "; re-export the model with this version's `sdrt export`");
        return it->second;
    };
    // diffusers class name -> the sdrt name whose class (and manifest defaults) it is; as runtime/schedulers' registry.
    static const std::map<std::string, std::string> classes = {
        {"DDIMScheduler", "ddim"}, {"PNDMScheduler", "pndm"}, {"EulerDiscreteScheduler", "euler"},
        {"EulerAncestralDiscreteScheduler", "euler_a"}, {"DPMSolverMultistepScheduler", "dpmpp_2m"},
        {"DPMSolverSinglestepScheduler", "dpmpp_2s_a"}, {"LMSDiscreteScheduler", "lms"}, {"HeunDiscreteScheduler", "heun"},
        {"UniPCMultistepScheduler", "unipc"}, {"DDPMScheduler", "ddpm"}, {"LCMScheduler", "lcm"}, {"TCDScheduler", "tcd"}};
    std::string n = name;
    bool own_class = false;  // a class name keeps all of the config's settings; an sdrt name forces its sigmas
    if (n.empty()) {
        const Json *cls = config.find("_class_name");
        n = cls && cls->is_string() ? cls->as_string() : "";
        if (!classes.count(n)) n = family.default_name;  // a class sdrt lacks: the family's default scheduler
    }
    if (auto it = classes.find(n); it != classes.end()) n = it->second, own_class = true;
    // sdrt name = base + "" / "_karras" / "_exponential"
    std::string base = n, sigmas;
    for (const char *suffix : {"_karras", "_exponential"}) {
        size_t len = std::char_traits<char>::length(suffix);
        if (base.size() > len && base.compare(base.size() - len, len, suffix) == 0) base.resize(base.size() - len), sigmas = suffix + 1;
    }
    std::map<std::string, Json> ov;
    if (!own_class && base != "ddim" && base != "pndm" && base != "euler_a" && base != "ddpm" && base != "lcm" && base != "tcd") {
        ov["use_karras_sigmas"] = Json::boolean(sigmas == "karras");
        ov["use_exponential_sigmas"] = Json::boolean(sigmas == "exponential");
    }
    bool known = false;
    for (int i = 0; kSchedulerNames[i]; ++i) known = known || n == kSchedulerNames[i];
    if (!known) throw input_error("unknown scheduler \"" + name + "\"; choose one of " + scheduler_names());
    if (base == "ddim") return detail::make_ddim(defaults("ddim"), config, ov);
    if (base == "pndm") return detail::make_pndm(defaults("pndm"), config, ov);
    if (base == "euler") return std::unique_ptr<Scheduler>(new Euler(defaults("euler"), config, ov));
    if (base == "euler_a") return std::unique_ptr<Scheduler>(new EulerAncestral(defaults("euler_a"), config, ov));
    if (base == "dpmpp_2m" || base == "dpmpp_2m_sde") {
        bool sde = base == "dpmpp_2m_sde";
        if (own_class) {  // DPMSolverMultistepScheduler: the config's algorithm decides ODE or SDE
            const Json *alg = config.find("algorithm_type");
            sde = alg && alg->is_string() && alg->as_string() == "sde-dpmsolver++";
        } else {
            ov["solver_order"] = Json::number(2);
            ov["algorithm_type"] = Json::string(sde ? "sde-dpmsolver++" : "dpmsolver++");
        }
        return std::unique_ptr<Scheduler>(new DPMPP2M(defaults("dpmpp_2m"), config, ov, sde));
    }
    if (base == "dpmpp_2s_a" && !own_class) ov["solver_order"] = Json::number(2), ov["algorithm_type"] = Json::string("sde-dpmsolver++");
    if (base == "unipc" && !own_class) ov["solver_type"] = Json::string("bh2"), ov["predict_x0"] = Json::boolean(true);
    if (auto s = detail::make_traced(base, defaults(base.c_str()), config, ov)) return s;
    throw input_error("unknown scheduler \"" + name + "\"; choose one of " + scheduler_names());
}

}  // namespace sdrt
