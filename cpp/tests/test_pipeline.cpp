// Whole images: the C API against the Python pipeline on ONNX Runtime, same export, same seed (txt2img, negative
// prompts, img2img, batches with per-image seeds, several schedulers; run-time LoRAs on an export with LoRA slots:
// one, two stacked, a negative scale, and none again after them). Pixels must agree within 1/255. Then the LoRA
// requests the host must refuse (lora_errors.tsv: another model's LoRA, a LoHa, a missing file, a plain export), and
// SDXL's base -> refiner hand-over (handover.tsv).
// Also prints C++ and Python times per case (the Python ones measured by fixtures.py after a warm-up).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "check.h"
#include "sdrt.h"

namespace {

std::vector<std::string> split_tabs(const std::string &line) {
    std::vector<std::string> out;
    std::string cell;
    std::istringstream in(line);
    while (std::getline(in, cell, '\t')) out.push_back(cell);
    return out;
}

std::vector<uint8_t> read_bytes(const std::string &path) {
    std::ifstream f(path, std::ios::binary);
    return std::vector<uint8_t>((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

// SDXL's micro-conditioning from a fixture column: the 14 ABI 5 fields, comma-separated ("" = none).
void set_micro(sdrt_gen_params &gp, const std::string &column, const std::string &name) {
    if (column.empty()) return;
    std::vector<double> v;
    std::istringstream in(column);
    std::string item;
    while (std::getline(in, item, ',')) v.push_back(std::strtod(item.c_str(), nullptr));
    CHECK(v.size() == 14, name + ": the micro-conditioning column holds " + std::to_string(v.size()) + " numbers, not 14");
    v.resize(14);
    int *ints[] = {&gp.original_height, &gp.original_width, &gp.crop_top, &gp.crop_left, &gp.target_height,
                   &gp.target_width, &gp.negative_original_height, &gp.negative_original_width, &gp.negative_crop_top,
                   &gp.negative_crop_left, &gp.negative_target_height, &gp.negative_target_width};
    for (int i = 0; i < 12; ++i) *ints[i] = int(v[size_t(i)]);
    gp.aesthetic_score = v[12], gp.negative_aesthetic_score = v[13];
}

sdrt_ctx *context(std::map<std::string, sdrt_ctx *> &contexts, const std::string &model) {
    sdrt_ctx *&ctx = contexts[model];
    if (!ctx) {
        sdrt_ctx_params cp = sdrt_ctx_default_params();
        cp.model_dir = model.c_str();
        cp.backend = SDRT_BACKEND_ORT_CPU;
        if (sdrt_init(&cp, &ctx) != SDRT_OK) CHECK(false, "sdrt_init " + model + ": " + sdrt_last_error(nullptr));
    }
    return ctx;
}

int calls_seen = 0;
int count_calls(int, int, void *) { return ++calls_seen, 0; }

// Hand-overs the C API refuses before any work (no UNet call), with a message that names the problem (the window
// messages are Python's: test_schedulers compares them for many schedulers).
void handover_errors(sdrt_ctx *base, sdrt_ctx *refiner, sdrt_gen_params gp) {
    static bool done = false;
    if (done) return;
    done = true;
    int shape[3] = {0, 0, 0};
    sdrt_latent_shape(refiner, gp.width, gp.height, shape);
    std::vector<float> latents(size_t(gp.batch_count) * size_t(shape[0]) * size_t(shape[1]) * size_t(shape[2]), 0.5f);
    std::vector<uint8_t> rgb(size_t(gp.batch_count) * size_t(gp.width) * size_t(gp.height) * 3), image(rgb.size() / size_t(gp.batch_count));
    struct Case {
        sdrt_ctx *ctx;
        double start, end;
        bool latents, image;
        const char *words;
    } bad[] = {
        {refiner, 0.8, 0, false, false, "continues from latents: pass init_latents"},
        {refiner, 0, 0, true, false, "set denoising_start too"},
        {refiner, 0.8, 0, true, true, "leave init_image NULL"},
        {refiner, 0.999, 0, true, false, "denoising_start leaves no step to run; lower it"},
        {refiner, 1.5, 0, true, false, "denoising_start/denoising_end 1.5 must be a float in (0, 1)"},
        {refiner, std::nan(""), 0, true, false, "must be a float in (0, 1)"},
        {base, 0, 0.02, false, false, "denoising_end 0.02 runs no step; raise it"},
        {base, 0, -0.5, false, false, "denoising_start/denoising_end -0.5 must be a float in (0, 1)"},
        {base, 0.3, 0.2, true, false, "runs no step"},
    };
    for (const Case &c : bad) {
        sdrt_gen_params p = gp;
        p.denoising_start = c.start, p.denoising_end = c.end;
        p.init_latents = c.latents ? latents.data() : nullptr;
        p.init_image = c.image ? image.data() : nullptr;
        calls_seen = 0;
        sdrt_set_progress_callback(c.ctx, count_calls, nullptr);
        sdrt_status st = sdrt_generate(c.ctx, &p, rgb.data());
        sdrt_set_progress_callback(c.ctx, nullptr, nullptr);
        std::string message = sdrt_last_error(c.ctx);
        CHECK(st == SDRT_ERR_INVALID_ARGUMENT && message.find(c.words) != std::string::npos && calls_seen == 0,
              std::string("hand-over refusal: want '") + c.words + "', got " + sdrt_status_name(st) + ": " + message);
        std::printf("refused hand-over: %s\n", message.substr(0, 150).c_str());
    }
    sdrt_gen_params p = gp;  // NaN in the latents
    latents[latents.size() / 2] = std::nanf("");
    p.denoising_start = 0.8, p.init_latents = latents.data();
    CHECK(sdrt_generate(refiner, &p, rgb.data()) == SDRT_ERR_INVALID_ARGUMENT && std::string(sdrt_last_error(refiner)).find("NaN or inf") != std::string::npos,
          std::string("NaN latents: ") + sdrt_last_error(refiner));
}

// SDXL's base -> refiner hand-over (handover.tsv): the base's latents at denoising_end against Python's (relative
// 1e-4 of max|latents|: the same float32 arithmetic, ONNX Runtime's threads may sum in another order), then the
// refiner from the C++ latents at denoising_start against Python's image (1/255, as the other images); a case
// without a refiner decodes the base's partial latents (sdrt_generate with denoising_end); one whose "refiner" is the
// base itself continues with img2img's negative time ids.
int handover(const std::string &dir, std::map<std::string, sdrt_ctx *> &contexts) {
    std::ifstream tsv(dir + "/handover.tsv");
    std::string line;
    int cases = 0;
    while (std::getline(tsv, line)) {
        std::vector<std::string> f = split_tabs(line);
        if (f.size() < 15) continue;
        const std::string &name = f[0];
        sdrt_ctx *base = context(contexts, f[1]), *refiner = f[2].empty() ? nullptr : context(contexts, f[2]);
        if (!base || (!f[2].empty() && !refiner)) continue;
        sdrt_gen_params gp = sdrt_gen_default_params();
        gp.prompt = f[3].c_str();
        gp.negative_prompt = f[4].c_str();
        gp.steps = std::atoi(f[5].c_str());
        gp.guidance_scale = std::strtod(f[6].c_str(), nullptr);
        gp.seed = std::atoll(f[7].c_str());
        gp.scheduler = f[8].empty() ? nullptr : f[8].c_str();
        gp.width = std::atoi(f[9].c_str());
        gp.height = std::atoi(f[10].c_str());
        gp.batch_count = std::atoi(f[11].c_str());
        const double fraction = std::strtod(f[12].c_str(), nullptr);
        if (f.size() > 15) set_micro(gp, f[15], name);
        std::vector<uint8_t> want = read_bytes(dir + "/" + f[14]);
        std::vector<uint8_t> got(size_t(gp.batch_count) * size_t(gp.width) * size_t(gp.height) * 3);
        std::string what = "hand-over " + name;
        auto t0 = std::chrono::steady_clock::now();
        gp.denoising_end = fraction;
        if (!refiner) {
            CHECK(sdrt_generate(base, &gp, got.data()) == SDRT_OK, what + ": " + sdrt_last_error(base));
        } else {
            int shape[3] = {0, 0, 0};
            CHECK(sdrt_latent_shape(base, gp.width, gp.height, shape) == SDRT_OK, what + ": sdrt_latent_shape");
            std::vector<float> latents(size_t(gp.batch_count) * size_t(shape[0]) * size_t(shape[1]) * size_t(shape[2]));
            std::vector<uint8_t> bytes = read_bytes(dir + "/" + f[13]);
            CHECK(bytes.size() == latents.size() * sizeof(float), what + ": Python's latents hold " + std::to_string(bytes.size()) + " bytes");
            std::vector<float> py(bytes.size() / sizeof(float));
            std::memcpy(py.data(), bytes.data(), py.size() * sizeof(float));
            if (!CHECK(sdrt_generate_latents(base, &gp, latents.data()) == SDRT_OK, what + ": base: " + sdrt_last_error(base))) continue;
            double scale = 0, worst = 0;
            for (size_t i = 0; i < py.size() && i < latents.size(); ++i) scale = std::max(scale, double(std::fabs(py[i])));
            for (size_t i = 0; i < py.size() && i < latents.size(); ++i) worst = std::max(worst, std::fabs(double(py[i]) - latents[i]) / scale);
            CHECK(py.size() == latents.size() && worst <= 1e-4, what + ": base latents differ by " + std::to_string(worst) + " of max|x|");
            std::printf("%-22s base latents (%d x %d x %d x %d) within %.1e of max|x| of Python's\n", name.c_str(), gp.batch_count,
                        shape[0], shape[1], shape[2], worst);
            sdrt_gen_params rp = gp;
            rp.denoising_end = 0;
            rp.denoising_start = fraction;
            rp.init_latents = latents.data();
            CHECK(sdrt_generate(refiner, &rp, got.data()) == SDRT_OK, what + ": refiner: " + sdrt_last_error(refiner));
        }
        double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        int max_diff = 0;
        for (size_t i = 0; i < want.size() && i < got.size(); ++i) max_diff = std::max(max_diff, std::abs(int(want[i]) - int(got[i])));
        CHECK(want.size() == got.size() && max_diff <= 1, what + ": max pixel difference " + std::to_string(max_diff) + "/255");
        std::printf("%-22s %-28s max diff %d/255; c++ %.3f s\n", name.c_str(),
                    !refiner ? "base to denoising_end" : refiner == base ? "base -> base" : "base -> refiner",
                    max_diff, seconds);
        ++cases;
        if (refiner && refiner != base) handover_errors(base, refiner, gp);
    }
    return cases;
}

}  // namespace

int main(int argc, char **argv) {
    if (argc < 2) return check::skip("usage: test_pipeline FIXTURES_DIR [EXPORT...]");
    std::string dir = argv[1];
    std::ifstream tsv(dir + "/pipeline.tsv");
    if (argc < 3 || !tsv)
        return check::skip("no sdrt export to compare images on: configure with -DSDRT_TEST_EXPORTS=<export folders> "
                           "(.ci/cpp builds tiny ones with `sdrt export`)");
    std::map<std::string, sdrt_ctx *> contexts;
    std::string line;
    double cpp_total = 0, py_total = 0;
    int cases = 0;
    while (std::getline(tsv, line)) {
        std::vector<std::string> f = split_tabs(line);
        if (f.size() < 15) continue;
        const std::string &name = f[0], &model = f[1];
        sdrt_ctx *&ctx = contexts[model];
        if (!ctx) {
            sdrt_ctx_params cp = sdrt_ctx_default_params();
            cp.model_dir = model.c_str();
            cp.backend = SDRT_BACKEND_ORT_CPU;
            if (sdrt_init(&cp, &ctx) != SDRT_OK) {
                CHECK(false, "sdrt_init " + model + ": " + sdrt_last_error(nullptr));
                continue;
            }
        }
        sdrt_gen_params gp = sdrt_gen_default_params();
        gp.prompt = f[2].c_str();
        gp.negative_prompt = f[3].c_str();
        gp.steps = std::atoi(f[4].c_str());
        gp.guidance_scale = std::strtod(f[5].c_str(), nullptr);
        gp.seed = std::atoll(f[6].c_str());
        gp.scheduler = f[7].empty() ? nullptr : f[7].c_str();
        gp.width = std::atoi(f[8].c_str());
        gp.height = std::atoi(f[9].c_str());
        gp.batch_count = std::atoi(f[10].c_str());
        std::vector<uint8_t> init;
        if (!f[12].empty()) {
            init = read_bytes(dir + "/" + f[12]);
            gp.init_image = init.data();
            gp.strength = std::strtod(f[11].c_str(), nullptr);
        }
        std::vector<uint8_t> mask;  // inpainting (columns 15, 16: mask file, keep_unmasked)
        if (f.size() > 16 && !f[15].empty()) {
            mask = read_bytes(dir + "/" + f[15]);
            gp.mask_image = mask.data();
            gp.keep_unmasked = std::atoi(f[16].c_str());
        }
        std::vector<std::string> lora_paths;  // column 18 (index 17): "FILE:SCALE;..." in the fixtures folder
        std::vector<sdrt_lora> loras;
        if (f.size() > 17 && !f[17].empty()) {
            std::istringstream in(f[17]);
            std::string item;
            while (std::getline(in, item, ';')) lora_paths.push_back(item);
            for (std::string &item : lora_paths) {
                size_t colon = item.rfind(':');
                double scale = std::strtod(item.c_str() + colon + 1, nullptr);
                item = dir + "/" + item.substr(0, colon);
                loras.push_back({nullptr, scale});
            }
            for (size_t i = 0; i < loras.size(); ++i) loras[i].path = lora_paths[i].c_str();
            gp.loras = loras.data();
            gp.lora_count = loras.size();
        }
        if (f.size() > 18) set_micro(gp, f[18], name);  // column 19: SDXL's micro-conditioning
        std::vector<uint8_t> want = read_bytes(dir + "/" + f[13]);
        std::vector<uint8_t> got(size_t(gp.batch_count) * size_t(gp.width) * size_t(gp.height) * 3);
        sdrt_gen_params warm = gp;  // the same warm-up as the Python side: one step
        warm.steps = 1, warm.batch_count = 1, warm.init_image = nullptr, warm.scheduler = nullptr, warm.seed = 0;
        warm.loras = nullptr, warm.lora_count = 0;
        warm.mask_image = nullptr, warm.keep_unmasked = 0;
        if (!mask.empty()) warm.init_image = gp.init_image, warm.mask_image = gp.mask_image, warm.strength = 1.0;
        sdrt_generate(ctx, &warm, got.data());
        auto t0 = std::chrono::steady_clock::now();
        sdrt_status st = sdrt_generate(ctx, &gp, got.data());
        double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        std::string what = model + " " + name;
        CHECK(st == SDRT_OK, what + ": " + sdrt_last_error(ctx));
        if (st != SDRT_OK) continue;
        CHECK(want.size() == got.size(), what + ": expected " + std::to_string(want.size()) + " bytes");
        int max_diff = 0;
        size_t differing = 0;
        for (size_t i = 0; i < want.size() && i < got.size(); ++i) {
            int d = std::abs(int(want[i]) - int(got[i]));
            max_diff = std::max(max_diff, d);
            differing += d != 0;
        }
        CHECK(max_diff <= 1, what + ": max pixel difference " + std::to_string(max_diff) + "/255");
        double py = std::strtod(f[14].c_str(), nullptr);
        std::printf("%-22s %-28s max diff %d/255, %5zu of %6zu values differ; c++ %.3f s, python %.3f s\n", name.c_str(),
                    model.substr(model.find_last_of('/') + 1).c_str(), max_diff, differing, want.size(), seconds, py);
        cpp_total += seconds, py_total += py;
        ++cases;
    }
    std::ifstream errors(dir + "/lora_errors.tsv");
    while (std::getline(errors, line)) {
        std::vector<std::string> f = split_tabs(line);
        if (f.size() < 3 || !contexts[f[0]]) continue;
        sdrt_ctx *ctx = contexts[f[0]];
        std::string path = dir + "/" + f[1];
        sdrt_lora lora = {path.c_str(), 1.0};
        sdrt_gen_params gp = sdrt_gen_default_params();
        gp.prompt = "a cat";
        gp.steps = 2;
        gp.seed = 0;
        gp.loras = &lora;
        gp.lora_count = 1;
        int w = 0, h = 0;
        sdrt_default_size(ctx, &w, &h);
        std::vector<uint8_t> got(size_t(w) * size_t(h) * 3);
        sdrt_status st = sdrt_generate(ctx, &gp, got.data());
        std::string message = sdrt_last_error(ctx);
        CHECK(st == SDRT_ERR_MODEL && message.find(f[2]) != std::string::npos,
              f[1] + " on " + f[0] + ": want SDRT_ERR_MODEL saying '" + f[2] + "', got " + sdrt_status_name(st) + ": " + message);
        std::printf("refused %-26s %s\n", f[1].c_str(), message.substr(0, 150).c_str());
        gp.lora_count = 0;  // and the context still works
        CHECK(sdrt_generate(ctx, &gp, got.data()) == SDRT_OK, f[1] + ": the context works after the refusal");
    }
    cases += handover(dir, contexts);
    for (auto &kv : contexts) sdrt_free(kv.second);
    if (!cases && !check::failures) return check::skip("pipeline.tsv lists no cases");
    std::printf("%d cases: c++ %.2f s, python %.2f s in all (same export, ONNX Runtime CPU)\n", cases, cpp_total, py_total);
    return check::finish("test_pipeline");
}
