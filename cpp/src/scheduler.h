// The schedulers of runtime/schedulers/, built from a model's scheduler_config.json with diffusers'
// from_config semantics, equal to the Python runtime's step by step. Each class's default config comes from the
// export's manifest (family.schedulers, written by Python from its classes' DEFAULTS), so Python owns them.
//
// set_timesteps computes per-call scalar tables on the host in float64 (as the Python does); each step is then
// `update(coefficients[i], sample, model_output, history, noise)`: float32 array arithmetic with the scalars
// rounded to float32, in the Python's order of operations, so results match numpy's bit for bit.
#pragma once

#include <array>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "json.h"

namespace sdrt {

extern const char *const kSchedulerNames[];  // runtime/schedulers' SCHEDULER_NAMES, in its order
std::string scheduler_names();  // comma-separated, for messages

struct SchedulerTables {
    std::vector<float> timesteps;                      // [calls]: the UNet's timestep input
    std::vector<std::vector<double>> coefficients;     // [calls][K]
    std::vector<double> input_scale;                   // [calls]: scale_model_input's factor
    std::vector<std::array<double, 2>> noise_coefficients;  // [calls]: add_noise = orig * [0] + noise * [1]
    double init_noise_sigma = 1.0;
};

// The manifest's family.schedulers (sdrt name -> its class's default config; dpmpp_2m_karras uses dpmpp_2m's) and
// family.default_scheduler (used when a config names a class sdrt lacks).
struct SchedulerFamily {
    std::map<std::string, Json> defaults;
    std::string default_name;
};

class Scheduler {
public:
    // name: one of kSchedulerNames, a diffusers class name, or "" for the config's own _class_name (the family's
    // default scheduler when the class is unknown or missing). Throws Error(SDRT_ERR_INVALID_ARGUMENT) for an unknown
    // name and Error(SDRT_ERR_MODEL) for a config setting sdrt does not support or defaults the export lacks.
    static std::unique_ptr<Scheduler> create(const std::string &name, const Json &config, const SchedulerFamily &family);
    virtual ~Scheduler() = default;

    const std::string &name() const { return name_; }
    bool needs_noise() const { return needs_noise_; }
    int history_size() const { return history_size_; }

    // strength < 1: img2img's tail of the schedule. denoising_start / denoising_end (SDXL's base + refiner hand-over,
    // fractions in (0, 1); 0 = not given): only the calls below / at or above the cut-off, as runtime/schedulers/
    // base.py's set_timesteps (the start begins a schedule of its own there and ignores strength; a scheduler with
    // two UNet calls per step keeps them together). Throws Error(SDRT_ERR_INVALID_ARGUMENT) for a window with no step.
    void set_timesteps(int num_inference_steps, double strength = 1.0, double denoising_start = 0, double denoising_end = 0);
    const SchedulerTables &tables() const { return tables_; }
    int num_calls() const { return int(tables_.timesteps.size()); }
    float timestep(int i) const { return tables_.timesteps[i]; }
    float init_noise_sigma() const { return float(tables_.init_noise_sigma); }

    void scale_model_input(const float *sample, float *out, size_t n, int i) const;
    void add_noise(const float *original, const float *noise, float *out, size_t n, int i) const;
    // sample <- the step's result; the history is kept here. Calls must come in order 0, 1, ...; noise is this
    // step's fresh noise (needs_noise() schedulers only, else ignored).
    void step(const float *model_output, int i, float *sample, const float *noise, size_t n);

protected:
    Scheduler(const std::string &name, const Json &defaults, const Json &config, const std::map<std::string, Json> &overrides);
    virtual SchedulerTables make_tables(int n, int start) = 0;
    virtual void update(const float *c, float *sample, const float *out, std::vector<std::vector<float>> &history,
                        const float *noise, size_t n) = 0;

    // The resolved config, read as Python reads it.
    const Json &cfg(const std::string &key) const;
    double num(const std::string &key) const { return cfg(key).as_number(); }
    const std::string &str(const std::string &key) const { return cfg(key).as_string(); }
    bool flag(const std::string &key) const { return cfg(key).truthy(); }
    double alpha(long t) const;  // alphas_cumprod[t] as float64, refusing t outside the training range
    int cutoff(double fraction) const;  // base.py's _cutoff: the training timestep at `fraction` of the schedule
    int start_for(int n, int cutoff);   // base.py's _start_for: the first step of a denoising_start window

    std::string name_;
    bool needs_noise_ = false;
    int history_size_ = 0;
    int calls_per_step_ = 1;  // diffusers' `order` (Heun's 2), read by a denoising_start window
    int num_train_ = 1000;
    std::map<std::string, Json> cfg_;
    std::vector<float> alphas_cumprod_;
    SchedulerTables tables_;
    std::vector<std::vector<float>> history_;
    int next_ = 0;
};

namespace detail {  // the factories of each scheduler file, for Scheduler::create
std::unique_ptr<Scheduler> make_ddim(const Json &defaults, const Json &config, const std::map<std::string, Json> &overrides);
std::unique_ptr<Scheduler> make_pndm(const Json &defaults, const Json &config, const std::map<std::string, Json> &overrides);
// scheduler_traced.cpp: "lms", "heun", "unipc", "dpmpp_2s_a", "ddpm", "lcm", "tcd", "pndm_rk" (nullptr for others)
std::unique_ptr<Scheduler> make_traced(const std::string &cls, const Json &defaults, const Json &config,
                                       const std::map<std::string, Json> &overrides);
// Whether PNDM's resolved config runs the Runge-Kutta warm-up (skip_prk_steps false, diffusers' default).
bool pndm_runs_prk(const Json &defaults, const Json &config, const std::map<std::string, Json> &overrides);
}  // namespace detail

}  // namespace sdrt
