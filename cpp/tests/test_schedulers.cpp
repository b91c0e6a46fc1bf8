// Every C++ scheduler against the Python runtime's, for many configs (SD 1.5, SD 2.1 v, zero-SNR, cosine, Karras and
// exponential sigmas, DPM heun/sigma_min, from_config defaults, unknown classes, unsupported settings, and the
// configs of issue #20's samplers: LMS, Heun, UniPC, DPM++ 2M SDE / 2S a, DDPM, LCM, TCD, PNDM's Runge-Kutta
// warm-up), names, step counts and
// img2img strengths, SDXL's denoising_start/denoising_end windows: the same errors (the windows' with Python's
// message), the same tables (timesteps, coefficients, input scales, add_noise
// coefficients, init_noise_sigma), and the same samples after every step of a trajectory.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <memory>
#include <string>

#include "check.h"
#include "json.h"
#include "noise.h"
#include "scheduler.h"
#include "util.h"

namespace {

std::map<std::string, double> worst;  // scheduler -> max relative coefficient difference
size_t floats = 0, floats_exact = 0, window_messages = 0;
double worst_step = 0;
sdrt::SchedulerFamily family;  // the defaults an export's manifest carries (family.schedulers), from fixtures.py

double rel(double a, double b) { return a == b ? 0 : std::fabs(a - b) / std::max(1.0, std::fabs(b)); }

std::string id(const sdrt::Json &c) {
    std::string s = c.at("config").as_string() + "/" + (c.at("name").as_string().empty() ? "(config's own)" : c.at("name").as_string());
    if (c.find("steps")) s += " steps " + std::to_string(c.at("steps").as_int()) + " strength " + std::to_string(c.at("strength").as_number());
    for (const char *key : {"denoising_start", "denoising_end"})
        if (c.find(key) && !c.at(key).is_null()) s += std::string(" ") + key + " " + std::to_string(c.at(key).as_number());
    return s;
}

// Python's exception class -> the status the C++ must report.
sdrt_status expected_status(const std::string &kind) { return kind == "InputError" ? SDRT_ERR_INVALID_ARGUMENT : SDRT_ERR_MODEL; }

void compare_floats(const std::vector<float> &got, const sdrt::Json &want, const std::string &what) {
    const auto &w = want.as_array();
    CHECK(got.size() == w.size(), what + ": length " + std::to_string(got.size()) + " vs " + std::to_string(w.size()));
    double scale = 1;
    for (const auto &v : w)
        if (std::isfinite(v.as_number())) scale = std::max(scale, std::fabs(v.as_number()));
    for (size_t i = 0; i < got.size() && i < w.size(); ++i) {
        float wf = float(w[i].as_number());
        ++floats;
        floats_exact += std::memcmp(&got[i], &wf, 4) == 0;
        if (std::isnan(wf) && std::isnan(got[i])) continue;  // both NaN: a schedule Python also breaks (h = 0)
        double d = std::fabs(double(got[i]) - double(wf)) / scale;
        if (!std::isnan(d)) worst_step = std::max(worst_step, d);
        if (!(d <= 2e-6)) {
            CHECK(false, what + " [" + std::to_string(i) + "]: c++ " + std::to_string(got[i]) + " python " + std::to_string(wf));
            return;
        }
    }
}

void tables(const sdrt::Json &c, const sdrt::Json &config) {
    std::unique_ptr<sdrt::Scheduler> s = sdrt::Scheduler::create(c.at("name").as_string(), config, family);
    CHECK(s->name() == c.at("resolved_name").as_string(), id(c) + ": name " + s->name());
    // SDXL's hand-over window (null: not given, the C API's 0); NaN stays NaN, which the C++ must refuse too.
    auto fraction = [&](const char *key) {
        const sdrt::Json *v = c.find(key);
        return !v || v->is_null() ? 0.0 : v->as_number();
    };
    try {
        s->set_timesteps(int(c.at("steps").as_int()), c.at("strength").as_number(), fraction("denoising_start"), fraction("denoising_end"));
    } catch (const sdrt::Error &e) {
        CHECK(c.find("error") && e.status() == expected_status(c.at("error").as_string()), id(c) + ": unexpected error: " + e.what());
        if (const sdrt::Json *m = c.find("message"); m && m->as_string().find("denoising") != std::string::npos) {
            CHECK(m->as_string() == e.what(), id(c) + ": message '" + e.what() + "', Python's '" + m->as_string() + "'");
            ++window_messages;
        }
        return;
    }
    if (c.find("error")) {
        CHECK(false, id(c) + ": Python raised " + c.at("error").as_string() + ", C++ did not");
        return;
    }
    const sdrt::SchedulerTables &t = s->tables();
    const auto &ts = c.at("timesteps").as_array();
    CHECK(t.timesteps.size() == ts.size(), id(c) + ": " + std::to_string(t.timesteps.size()) + " calls vs " + std::to_string(ts.size()));
    if (t.timesteps.size() != ts.size()) return;
    double &w = worst[s->name()];
    for (size_t i = 0; i < ts.size(); ++i) {
        double want_t = ts[i].as_number();
        CHECK(std::fabs(t.timesteps[i] - want_t) <= 1e-4 * std::max(1.0, std::fabs(want_t)),
              id(c) + ": timestep " + std::to_string(i) + " " + std::to_string(t.timesteps[i]) + " vs " + std::to_string(want_t));
        const auto &row = c.at("coefficients").as_array()[i].as_array();
        CHECK(row.size() == t.coefficients[i].size(), id(c) + ": coefficient count");
        for (size_t k = 0; k < row.size() && k < t.coefficients[i].size(); ++k) {
            double d = rel(t.coefficients[i][k], row[k].as_number());
            if (std::isnan(row[k].as_number()) && std::isnan(t.coefficients[i][k])) d = 0;
            w = std::max(w, d);
            CHECK(d < 1e-6, id(c) + ": coefficient [" + std::to_string(i) + "][" + std::to_string(k) + "] " +
                                std::to_string(t.coefficients[i][k]) + " vs " + std::to_string(row[k].as_number()));
        }
        CHECK(rel(t.input_scale[i], c.at("input_scale").as_array()[i].as_number()) < 1e-9, id(c) + ": input_scale");
        const auto &nc = c.at("noise_coefficients").as_array()[i].as_array();
        CHECK(rel(t.noise_coefficients[i][0], nc[0].as_number()) < 1e-9 && rel(t.noise_coefficients[i][1], nc[1].as_number()) < 1e-9,
              id(c) + ": noise coefficients");
    }
    CHECK(rel(t.init_noise_sigma, c.at("init_noise_sigma").as_number()) < 1e-9, id(c) + ": init_noise_sigma");
}

void trajectory(const sdrt::Json &c, const sdrt::Json &config) {
    const sdrt::Json &tr = c.at("trajectory");
    std::string what = id(c) + " trajectory " + std::to_string(tr.at("steps").as_int()) + "@" + std::to_string(tr.at("strength").as_number());
    const size_t n = 64;
    auto gen = [](uint64_t seed) { return sdrt::TorchCpuGenerator(seed).randn(n); };
    std::unique_ptr<sdrt::Scheduler> s = sdrt::Scheduler::create(c.at("name").as_string(), config, family);
    double strength = tr.at("strength").as_number();
    try {
        s->set_timesteps(int(tr.at("steps").as_int()), strength);
    } catch (const sdrt::Error &e) {
        CHECK(tr.find("error"), what + ": unexpected error: " + e.what());
        return;
    }
    CHECK(!tr.find("error"), what + ": Python raised, C++ did not");
    if (tr.find("error")) return;
    std::vector<float> x(n), scaled(n);
    if (strength < 1) {
        std::vector<float> orig = gen(8), noise = gen(9);
        s->add_noise(orig.data(), noise.data(), x.data(), n, 0);
    } else {
        x = gen(7);
        for (auto &v : x) v *= s->init_noise_sigma();
    }
    const auto &samples = tr.at("samples").as_array();
    CHECK(int(samples.size()) == s->num_calls(), what + ": call count");
    for (int i = 0; i < s->num_calls() && i < int(samples.size()); ++i) {
        s->scale_model_input(x.data(), scaled.data(), n, i);
        compare_floats(scaled, tr.at("scaled").as_array()[size_t(i)], what + " scaled input " + std::to_string(i));
        std::vector<float> out = gen(100 + uint64_t(i)), noise = s->needs_noise() ? gen(200 + uint64_t(i)) : std::vector<float>();
        s->step(out.data(), i, x.data(), noise.empty() ? nullptr : noise.data(), n);
        compare_floats(x, samples[size_t(i)], what + " step " + std::to_string(i));
    }
}

}  // namespace

int main(int argc, char **argv) {
    if (argc < 2) return check::skip("usage: test_schedulers FIXTURES_DIR");
    std::string path = std::string(argv[1]) + "/schedulers.json";
    if (!sdrt::file_exists(path)) return check::skip("no " + path + " (the Python fixture step did not run)");
    sdrt::Json fx = sdrt::Json::parse_file(path);
    for (const auto &kv : fx.at("family").at("schedulers").as_object()) family.defaults[kv.first] = kv.second;
    family.default_name = fx.at("family").at("default_scheduler").as_string();
    size_t n_tables = 0, n_traj = 0, n_err = 0, n_windows = 0;
    for (const auto &c : fx.at("cases").as_array()) {
        const sdrt::Json &config = fx.at("configs").at(c.at("config").as_string());
        try {
            if (c.find("trajectory")) {
                trajectory(c, config);
                ++n_traj;
            } else if (c.find("error") && !c.find("steps")) {
                try {
                    sdrt::Scheduler::create(c.at("name").as_string(), config, family);
                    CHECK(false, id(c) + ": Python refused the config (" + c.at("error").as_string() + "), C++ did not");
                } catch (const sdrt::Error &e) {
                    CHECK(e.status() == expected_status(c.at("error").as_string()), id(c) + ": wrong status for: " + e.what());
                }
                ++n_err;
            } else {
                tables(c, config);
                ++n_tables;
                n_windows += c.find("denoising_start") != nullptr;
            }
        } catch (const std::exception &e) {
            CHECK(false, id(c) + ": exception " + e.what());
        }
    }
    std::printf("%zu table cases (%zu SDXL hand-over windows, %zu refusals with Python's message), %zu trajectories, %zu refused configs\n",
                n_tables, n_windows, window_messages, n_traj, n_err);
    for (const auto &kv : worst) std::printf("  %-16s max relative coefficient difference %.2e\n", kv.first.c_str(), kv.second);
    std::printf("  step outputs: %zu floats, %zu bit-exact (the rest: NaN in both), worst difference %.2e of max|x|\n", floats, floats_exact, worst_step);
    return check::finish("test_schedulers");
}
