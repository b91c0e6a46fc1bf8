// The Stable Diffusion pipeline in C++: prompt in, image out, the same loop as runtime/pipeline.py.
#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "backend.h"
#include "lora.h"
#include "model.h"
#include "noise.h"
#include "tokenizer.h"

namespace sdrt {

// SDXL's micro-conditioning (sdrt_gen_params' ABI 5 fields; runtime/sdxl.py's MICRO_ARGS): (height, width) sizes and
// (top, left) corners in pixels, {0, 0} = not given; aesthetic scores 0 = not given (6.0 / 2.5).
struct MicroConditioning {
    std::array<int, 2> original{}, crops{}, target{}, negative_original{}, negative_crops{}, negative_target{};
    double aesthetic_score = 0, negative_aesthetic_score = 0;
    bool given() const {
        for (const auto *p : {&original, &crops, &target, &negative_original, &negative_crops, &negative_target})
            if ((*p)[0] || (*p)[1]) return true;
        return aesthetic_score != 0 || negative_aesthetic_score != 0;
    }
};

struct Request {  // sdrt_gen_params, checked and with defaults filled in
    std::string prompt, negative, scheduler;
    int steps = 30, width = 0, height = 0, batch = 1;
    double guidance = 7.5, strength = 0.8;
    uint64_t seed = 0;
    const uint8_t *init_image = nullptr;
    const uint8_t *mask = nullptr;  // inpainting: width * height grey bytes, >= 128 = repaint
    bool keep_unmasked = false;
    std::vector<std::pair<std::string, double>> loras;  // run-time LoRAs: (file, scale)
    MicroConditioning micro;                            // SDXL only
    // SDXL's base + refiner hand-over (ABI 6): fractions of the schedule, 0 = not given; init_latents: the base's
    // latents (batch x C x h x w float32) the window from denoising_start continues, with no noise added.
    double denoising_start = 0, denoising_end = 0;
    const float *init_latents = nullptr;
};

struct Timings {
    double text = 0, loop = 0, decode = 0, total = 0;
};

using Progress = int (*)(int step, int total, void *user);

class Pipeline {
public:
    Pipeline(const std::string &model_dir, const BackendOptions &options);

    // Checks the request (throws Error(SDRT_ERR_INVALID_ARGUMENT) naming the bad value), then makes
    // request.batch images of height x width RGB into rgb_out.
    void generate(const Request &request, uint8_t *rgb_out, Progress progress, void *user, Timings &timings);
    // The same up to the denoised latents (Python's output_type="latent"): batch x C x h x w float32 into out.
    void generate_latents(const Request &request, float *out, Progress progress, void *user, Timings &timings);
    void check(Request &request) const;  // fills width/height defaults; throws on bad values
    std::array<int, 3> latent_shape(int width, int height) const;  // per image: C, h, w

    const ModelFacts &facts() const { return model_.facts; }
    Backend &backend() { return *backend_; }
    void cancel() { cancel_ = true, backend_->cancel(); }

private:
    struct TextEncoder {  // one CLIP text encoder: SD has one, SDXL two (its refiner the second only)
        std::string network;
        ClipTokenizer tokenizer;
        TokenTable table;
        int width;  // its hidden states' channels
    };
    struct TextStates {
        std::vector<float> states, pooled;  // [seq, sum of widths], SDXL's [pooled_dim] (else empty)
    };

    ExportFolder model_;
    std::vector<TextEncoder> encoders_;
    int states_width_ = 0;
    Json scheduler_config_;
    std::unique_ptr<Backend> backend_;
    CpuKernel kernel_;
    std::atomic<bool> cancel_{false};

    // Run-time LoRAs: files read once (again when changed), the slot inputs of the active set per network.
    struct CachedLora {
        long long size;
        std::filesystem::file_time_type mtime;
        LoraFactors factors;
    };
    std::map<std::string, CachedLora> lora_files_;
    std::map<std::string, std::vector<SlotFeed>> lora_feeds_;
    std::vector<std::pair<std::string, double>> active_loras_;
    bool has_lora_slots_ = false;

    void activate_loras(const std::vector<std::pair<std::string, double>> &loras);
    std::vector<TensorIn> with_loras(const std::string &network, std::vector<TensorIn> inputs) const;
    TextStates encode_prompt(const std::string &prompt);
    std::vector<float> denoise(Request &r, Progress progress, void *user, Timings &timings);  // checked r's latents
    void check_handover(const Request &r) const;
    std::vector<float> time_ids(const Request &r, bool negative) const;  // SDXL's micro-conditioning of one image
};

}  // namespace sdrt
