// Scheduler base (config resolution, alphas_cumprod, the step contract), DDIM and PNDM (PLMS), each a port of
// its runtime/schedulers/*.py file: make_tables is `_tables`, update is `update`. Read those files for the maths.
#include "scheduler.h"

#include <algorithm>
#include <cmath>

#include "schedule_math.h"
#include "util.h"

namespace sdrt {

const char *const kSchedulerNames[] = {
    "ddim", "pndm", "euler", "euler_karras", "euler_exponential", "euler_a", "dpmpp_2m", "dpmpp_2m_karras",
    "dpmpp_2m_exponential", "lms", "lms_karras", "lms_exponential", "heun", "heun_karras", "heun_exponential", "unipc",
    "unipc_karras", "unipc_exponential", "dpmpp_2m_sde", "dpmpp_2m_sde_karras", "dpmpp_2m_sde_exponential", "dpmpp_2s_a",
    "dpmpp_2s_a_karras", "dpmpp_2s_a_exponential", "ddpm", "lcm", "tcd", nullptr};

std::string scheduler_names() {
    std::string s;
    for (int i = 0; kSchedulerNames[i]; ++i) s += (i ? ", " : "") + std::string(kSchedulerNames[i]);
    return s;
}

// --- the base: diffusers' from_config, the schedule, the step contract ---------------------------------------

Scheduler::Scheduler(const std::string &name, const Json &defaults, const Json &config,
                     const std::map<std::string, Json> &overrides)
    : name_(name) {
    if (!defaults.is_object()) throw model_error("the manifest's defaults for scheduler " + name + " are not a JSON object; re-export the model");
    std::vector<std::string> ignored;
    if (const Json *u = config.find("_use_default_values"); u && u->is_array())
        for (const auto &k : u->as_array())
            if (k.is_string()) ignored.push_back(k.as_string());
    for (const auto &kv : defaults.as_object()) {
        const Json *given = config.find(kv.first);
        bool use = given && std::find(ignored.begin(), ignored.end(), kv.first) == ignored.end();
        cfg_[kv.first] = use ? *given : kv.second;
    }
    for (const auto &kv : overrides) cfg_[kv.first] = kv.second;

    const Json &pt = cfg("prediction_type");
    if (!pt.is_string() || (pt.as_string() != "epsilon" && pt.as_string() != "v_prediction"))
        throw model_error("the scheduler config's prediction_type is not supported; sdrt's schedulers take epsilon or v_prediction");
    const Json &sp = cfg("timestep_spacing");
    if (cfg_.count("timestep_spacing") &&  // (DPM singlestep has none)
        (!sp.is_string() || (sp.as_string() != "leading" && sp.as_string() != "trailing" && sp.as_string() != "linspace")))
        throw model_error("the scheduler config's timestep_spacing is not supported; use one of leading, trailing, linspace");
    num_train_ = int(cfg("num_train_timesteps").as_int());
    if (num_train_ < 2) throw model_error("num_train_timesteps " + std::to_string(num_train_) + " must be at least 2");

    // make_alphas_cumprod
    VecF betas;
    const std::string &schedule = str("beta_schedule");
    if (!cfg("trained_betas").is_null()) {
        for (const auto &b : cfg("trained_betas").as_array()) betas.push_back(float(b.as_number()));
        if (int(betas.size()) != num_train_) throw model_error("trained_betas has the wrong length for num_train_timesteps");
    } else if (schedule == "linear") {
        betas = torch_linspace_f32(num("beta_start"), num("beta_end"), num_train_);
    } else if (schedule == "scaled_linear") {
        betas = torch_linspace_f32(std::pow(num("beta_start"), 0.5), std::pow(num("beta_end"), 0.5), num_train_);
        for (auto &b : betas) b = b * b;
    } else if (schedule == "squaredcos_cap_v2") {
        betas = cosine_betas(num_train_);
    } else {
        throw model_error("beta_schedule \"" + schedule + "\" is not supported; use one of linear, scaled_linear, squaredcos_cap_v2");
    }
    if (flag("rescale_betas_zero_snr")) betas = rescale_zero_terminal_snr(betas);
    for (auto &b : betas) b = 1.0f - b;
    alphas_cumprod_ = cumprod_f32(betas);
}

const Json &Scheduler::cfg(const std::string &key) const {
    static const Json null_value;
    auto it = cfg_.find(key);
    return it == cfg_.end() ? null_value : it->second;  // Python's cfg.get(key)
}

double Scheduler::alpha(long t) const {
    if (t < 0 || t >= num_train_)
        throw input_error("timestep " + std::to_string(t) + " is outside the model's 0.." + std::to_string(num_train_ - 1) +
                          "; use fewer steps or another timestep_spacing");
    return double(alphas_cumprod_[t]);
}

void Scheduler::set_timesteps(int n, double strength, double denoising_start, double denoising_end) {
    if (n < 1) throw input_error("steps " + std::to_string(n) + " must be an integer >= 1");
    if (n > num_train_)
        throw input_error("steps " + std::to_string(n) + " exceeds the model's " + std::to_string(num_train_) + " training timesteps");
    if (denoising_start != 0) {
        tables_ = make_tables(n, 0);  // the full schedule, whose calls below the cut-off the window keeps
        tables_ = make_tables(n, start_for(n, cutoff(denoising_start)));
    } else {
        if (!(strength > 0 && strength <= 1))
            throw input_error("strength " + std::to_string(strength) + " must be in (0, 1]; 1 ignores the init image entirely");
        int init_timestep = std::min(int(n * strength), n);
        if (init_timestep == 0)
            throw input_error("strength " + std::to_string(strength) + " with " + std::to_string(n) + " steps runs no step; raise strength or steps");
        tables_ = make_tables(n, std::max(n - init_timestep, 0));
    }
    if (denoising_end != 0) {
        const int end = cutoff(denoising_end);
        size_t keep = 0;
        for (float t : tables_.timesteps) keep += double(t) >= end;
        if (keep == 0) throw input_error("denoising_end " + format_number(denoising_end) + " runs no step; raise it");
        tables_.timesteps.resize(keep);
        tables_.coefficients.resize(keep);
        tables_.input_scale.resize(keep);
        tables_.noise_coefficients.resize(keep);
    }
    history_.clear();
    next_ = 0;
}

int Scheduler::cutoff(double fraction) const {
    if (!(fraction > 0 && fraction < 1))
        throw input_error("denoising_start/denoising_end " + format_number(fraction) + " must be a float in (0, 1), e.g. 0.8");
    return int(std::nearbyint(double(num_train_) - fraction * double(num_train_)));  // Python's round: half to even
}

int Scheduler::start_for(int n, int cut) {
    int count = 0;
    for (float t : tables_.timesteps) count += double(t) < cut;
    if (calls_per_step_ == 2 && count % 2 == 0) ++count;
    if (count == 0) throw input_error("denoising_start leaves no step to run; lower it");
    for (int start = 0; start < n; ++start)
        if (int(make_tables(n, start).timesteps.size()) == count) return start;
    throw input_error("the " + name_ + " scheduler cannot start " + std::to_string(count) +
                      " calls before the end of its schedule; use another denoising_start or scheduler");
}

void Scheduler::scale_model_input(const float *sample, float *out, size_t n, int i) const {
    double scale = tables_.input_scale[i];
    if (scale == 1.0) {
        std::copy(sample, sample + n, out);
        return;
    }
    float s = float(scale);
    for (size_t k = 0; k < n; ++k) out[k] = sample[k] * s;
}

void Scheduler::add_noise(const float *original, const float *noise, float *out, size_t n, int i) const {
    float a = float(tables_.noise_coefficients[i][0]), b = float(tables_.noise_coefficients[i][1]);
    for (size_t k = 0; k < n; ++k) out[k] = original[k] * a + noise[k] * b;
}

void Scheduler::step(const float *model_output, int i, float *sample, const float *noise, size_t n) {
    if (tables_.timesteps.empty()) throw Error(SDRT_ERR_INTERNAL, "step before set_timesteps");
    if (i != next_) throw Error(SDRT_ERR_INTERNAL, "scheduler step " + std::to_string(i) + " called where step " + std::to_string(next_) + " is due");
    if (needs_noise_ && !noise) throw Error(SDRT_ERR_INTERNAL, name_ + " adds fresh noise each step; pass noise");
    if (history_.empty() && history_size_) history_.assign(history_size_, std::vector<float>(n, 0.0f));
    const auto &row = tables_.coefficients[i];
    std::vector<float> c(row.size());
    for (size_t k = 0; k < row.size(); ++k) c[k] = float(row[k]);  // numpy casts a Python float to the array's dtype
    update(c.data(), sample, model_output, history_, noise, n);
    ++next_;
}

// --- DDIM -----------------------------------------------------------------------------------------------------

class DDIM : public Scheduler {
public:
    DDIM(const Json &defaults, const Json &config, const std::map<std::string, Json> &ov) : Scheduler("ddim", defaults, config, ov) {
        if (flag("thresholding")) throw model_error("DDIM's dynamic thresholding (for pixel-space models) is unsupported; turn it off");
        final_alpha_ = flag("set_alpha_to_one") ? 1.0 : double(alphas_cumprod_[0]);
    }

protected:
    double final_alpha_;
    SchedulerTables make_tables(int n, int start) override {
        SchedulerTables t;
        Vec ts = spaced_timesteps(str("timestep_spacing"), n, num_train_, int(num("steps_offset")), true);
        bool eps = str("prediction_type") == "epsilon";
        for (size_t k = size_t(start); k < ts.size(); ++k) {
            long step = long(ts[k]);
            double a = alpha(step);
            long prev_t = step - num_train_ / n;
            double a_prev = prev_t >= 0 ? alpha(prev_t) : final_alpha_;
            double sa = std::pow(a, 0.5), sb = std::pow(1 - a, 0.5), sa_prev = std::pow(a_prev, 0.5), sb_prev = std::pow(1 - a_prev, 0.5);
            if (eps) {
                if (a == 0) throw model_error("epsilon prediction at a zero-SNR timestep divides by zero; use v_prediction");
                t.coefficients.push_back({1 / sa, -sb / sa, sa_prev, 0.0, sb_prev});
            } else {
                t.coefficients.push_back({sa, -sb, sa_prev, sb_prev * sb, sb_prev * sa});
            }
            float a32 = alphas_cumprod_[step];
            t.noise_coefficients.push_back({double(std::sqrt(a32)), double(std::sqrt(1.0f - a32))});
            t.timesteps.push_back(float(ts[k]));
            t.input_scale.push_back(1.0);
        }
        return t;
    }
    void update(const float *c, float *s, const float *o, std::vector<std::vector<float>> &, const float *, size_t n) override {
        bool clip = flag("clip_sample");
        float r = float(num("clip_sample_range"));
        for (size_t k = 0; k < n; ++k) {
            float x0 = s[k] * c[0] + o[k] * c[1];
            if (clip) x0 = std::min(std::max(x0, -r), r);
            s[k] = x0 * c[2] + s[k] * c[3] + o[k] * c[4];
        }
    }
};

// --- PNDM (PLMS, skip_prk_steps; without it: PNDMRungeKutta in scheduler_traced.cpp) ------------------------------

class PNDM : public Scheduler {
public:
    PNDM(const Json &defaults, const Json &config, const std::map<std::string, Json> &ov)
        : Scheduler("pndm", defaults, config, ov) {
        history_size_ = 4;
        final_alpha_ = flag("set_alpha_to_one") ? 1.0 : double(alphas_cumprod_[0]);
    }

protected:
    double final_alpha_;
    SchedulerTables make_tables(int n, int start) override {
        Vec desc = spaced_timesteps(str("timestep_spacing"), n, num_train_, int(num("steps_offset")), true);
        Vec asc(desc.rbegin(), desc.rend()), seq;  // asc[:-1], asc[-2:-1], asc[-1:], then reversed
        size_t L = asc.size();
        seq.assign(asc.begin(), asc.end() - 1);
        if (L >= 2) seq.push_back(asc[L - 2]);
        seq.push_back(asc[L - 1]);
        std::reverse(seq.begin(), seq.end());
        SchedulerTables t;
        long ratio = num_train_ / n;
        bool v = str("prediction_type") == "v_prediction";
        for (size_t idx = size_t(start); idx < seq.size(); ++idx) {
            int counter = int(idx - size_t(start));
            long ti = long(seq[idx]);
            long t_from = counter == 1 ? ti + ratio : ti, t_to = counter == 1 ? ti : ti - ratio;
            double a = alpha(t_from);
            double a_prev = t_to >= 0 ? alpha(t_to) : final_alpha_;
            double sample_coeff = std::pow(a_prev / a, 0.5);
            double out_coeff = -(a_prev - a) / (a * std::pow(1 - a_prev, 0.5) + std::pow(a * (1 - a) * a_prev, 0.5));
            if (v) {
                double oc = out_coeff;
                sample_coeff = sample_coeff + oc * std::pow(1 - a, 0.5);
                out_coeff = oc * std::pow(a, 0.5);
            }
            double push = counter == 1 ? 0.0 : 1.0, use_cur = counter == 1 ? 1.0 : 0.0;
            std::vector<double> row;
            if (counter == 0) row = {1, 0, 0, 0};
            else if (counter == 1) row = {0.5, 0.5, 0, 0};
            else if (counter == 2) row = {1.5, -0.5, 0, 0};
            else if (counter == 3) row = {23 / 12.0, -16 / 12.0, 5 / 12.0, 0};
            else row = {55 / 24.0, -59 / 24.0, 37 / 24.0, -9 / 24.0};
            for (double x : {1 - use_cur, use_cur, sample_coeff, out_coeff, push, 1 - push, counter == 0 ? 1.0 : 0.0}) row.push_back(x);
            t.coefficients.push_back(row);
            alpha(ti);  // refuses a timestep outside the training range
            float a32 = alphas_cumprod_[size_t(ti)];
            t.noise_coefficients.push_back({double(std::sqrt(a32)), double(std::sqrt(1.0f - a32))});
            t.timesteps.push_back(float(seq[idx]));
            t.input_scale.push_back(1.0);
        }
        return t;
    }
    void update(const float *c, float *s, const float *o, std::vector<std::vector<float>> &h, const float *, size_t n) override {
        float *e1 = h[0].data(), *e2 = h[1].data(), *e3 = h[2].data(), *cur = h[3].data();
        for (size_t k = 0; k < n; ++k) {
            float out = o[k] * c[0] + e1[k] * c[1] + e2[k] * c[2] + e3[k] * c[3];
            float x = s[k] * c[4] + cur[k] * c[5];
            float prev = x * c[6] + out * c[7];
            float n1 = o[k] * c[8] + e1[k] * c[9], n2 = e1[k] * c[8] + e2[k] * c[9], n3 = e2[k] * c[8] + e3[k] * c[9];
            cur[k] = s[k] * c[10];
            e1[k] = n1, e2[k] = n2, e3[k] = n3;
            s[k] = prev;
        }
    }
};

std::unique_ptr<Scheduler> detail::make_ddim(const Json &defaults, const Json &config, const std::map<std::string, Json> &ov) {
    return std::unique_ptr<Scheduler>(new DDIM(defaults, config, ov));
}
std::unique_ptr<Scheduler> detail::make_pndm(const Json &defaults, const Json &config, const std::map<std::string, Json> &ov) {
    if (pndm_runs_prk(defaults, config, ov)) return make_traced("pndm_rk", defaults, config, ov);
    return std::unique_ptr<Scheduler>(new PNDM(defaults, config, ov));
}

}  // namespace sdrt
