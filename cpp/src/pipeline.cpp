// The pipeline's algorithm, top to bottom, as runtime/pipeline.py runs it: check inputs, encode the prompts,
// make the initial latents (noise, or the encoded image noised to the first timestep), the denoising loop (one
// batched UNet call for [uncond, cond], the guidance combine, the scheduler step), decode. Inpainting as
// runtime/inpaint.py: a dedicated inpainting UNet also takes [mask, masked-image latents]; an ordinary one gets the
// kept region's latents put back after each step. SDXL's base + refiner hand-over as runtime/sdxl.py: the base stops
// at denoising_end (generate_latents hands its latents over), the refiner continues them from denoising_start.
//
// Every array operation is float32 in numpy's order, so the latents equal the Python runtime's bit for bit given
// equal network outputs.
#include "pipeline.h"

#include <algorithm>
#include <chrono>
#include <cmath>

#include "scheduler.h"
#include "util.h"

namespace sdrt {

namespace {

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

// Draws `shape`-sized normals from each generator in turn: np.concatenate([g.randn(shape) for g in generators]).
std::vector<float> draw(std::vector<TorchCpuGenerator> &gens, size_t per_image) {
    std::vector<float> out(gens.size() * per_image);
    for (size_t k = 0; k < gens.size(); ++k) gens[k].randn(out.data() + k * per_image, per_image);
    return out;
}

}  // namespace

Pipeline::Pipeline(const std::string &model_dir, const BackendOptions &options)
    : model_(read_export(model_dir)),
      scheduler_config_(Json::parse_file(model_.scheduler_config)),
      kernel_(torch_cpu_kernel()) {
    const ModelFacts &f = model_.facts;
    for (const TextEncoderFiles &t : model_.text_encoders) {
        TextEncoder e{t.network, ClipTokenizer::from_folder(t.tokenizer_dir), read_token_table(t.token_embeddings),
                      t.network == kTextEncoder2 ? f.text_hidden_size_2 : f.text_hidden_size};
        if (e.table.hidden != e.width)
            throw model_error(t.token_embeddings + " has rows of " + std::to_string(e.table.hidden) + " but the " + t.network +
                              " takes " + std::to_string(e.width) + "; the export is mismatched: re-export it with `sdrt export`");
        if (e.tokenizer.max_length() != f.text_seq_len)
            throw model_error(t.tokenizer_dir + " makes " + std::to_string(e.tokenizer.max_length()) + " tokens per prompt but the "
                              "text encoder takes " + std::to_string(f.text_seq_len) + "; re-export the model with `sdrt export`");
        states_width_ += e.width;
        encoders_.push_back(std::move(e));
    }
    if (f.time_ids_dim && f.time_ids_dim != (f.requires_aesthetics_score ? 5 : 6))
        throw model_error(model_.path + ": " + std::to_string(f.time_ids_dim) + " time ids per image is neither SDXL's base (6) nor "
                          "its refiner (5); re-export the model with `sdrt export`");
    // Refuse an unsupported scheduler config (or defaults the export lacks) now, not at the first image.
    Scheduler::create("", scheduler_config_, model_.family.schedulers);
    if (options.provider == SDRT_BACKEND_TENSORRT)
#ifdef SDRT_HAVE_TENSORRT
        throw Error(SDRT_ERR_UNSUPPORTED, "native TensorRT engines are not implemented in the C++ runtime yet (TensorRT was found "
                                          "at build time); use SDRT_BACKEND_ORT_TENSORRT, ONNX Runtime's TensorRT provider");
#else
        throw Error(SDRT_ERR_UNSUPPORTED, "sdrt was built without TensorRT (not found at configure time), and native TensorRT "
                                          "engines are not implemented in the C++ runtime yet; use SDRT_BACKEND_ORT_TENSORRT with "
                                          "a GPU build of ONNX Runtime, or SDRT_BACKEND_AUTO");
#endif
    backend_ = make_onnx_backend(model_, options);
    for (const char *network : {kTextEncoder, kUnet}) {
        auto c = model_.contracts.find(network);
        if (c == model_.contracts.end() || c->second.lora_slots.empty()) continue;
        has_lora_slots_ = true;
        lora_feeds_[network] = slot_feeds(c->second, network, {});  // rank 0: the export's own network
    }
}

// The LoRAs of a request, merged by file (scales add), zero scales dropped, in file-name order as the Python runtime
// orders them (by registered name), their slot inputs built when the set or a file changed.
void Pipeline::activate_loras(const std::vector<std::pair<std::string, double>> &requested) {
    std::map<std::string, double> merged;
    for (const auto &l : requested) merged[l.first] += l.second;
    std::vector<std::pair<std::string, double>> loras;
    for (const auto &kv : merged)
        if (kv.second != 0.0) loras.push_back(kv);
    auto stem = [](const std::string &p) { return std::filesystem::path(p).stem().string(); };
    std::stable_sort(loras.begin(), loras.end(), [&](const auto &a, const auto &b) { return stem(a.first) < stem(b.first); });
    bool changed = loras != active_loras_;
    std::vector<std::pair<const LoraFactors *, double>> factors;
    for (const auto &l : loras) {
        std::error_code ec;
        long long size = file_size(l.first);
        auto mtime = std::filesystem::last_write_time(l.first, ec);
        if (size < 0 || ec) throw model_error("LoRA file " + l.first + " does not exist or cannot be read; pass a .safetensors LoRA");
        auto it = lora_files_.find(l.first);
        if (it == lora_files_.end() || it->second.size != size || it->second.mtime != mtime) {
            CachedLora c{size, mtime, read_lora(l.first, model_.contracts)};
            it = lora_files_.insert_or_assign(l.first, std::move(c)).first;
            changed = true;
        }
        factors.emplace_back(&it->second.factors, l.second);
    }
    if (!changed) return;
    std::map<std::string, std::vector<SlotFeed>> feeds;
    for (const auto &kv : lora_feeds_) feeds[kv.first] = slot_feeds(model_.contracts.at(kv.first), kv.first, factors);
    lora_feeds_.swap(feeds);
    active_loras_ = loras;
}

// A network's inputs followed by its LoRA slots' (rank 0 when no active LoRA adapts the layer).
std::vector<TensorIn> Pipeline::with_loras(const std::string &network, std::vector<TensorIn> inputs) const {
    static const float kEmpty = 0.0f;  // ONNX Runtime takes a pointer even for an empty tensor
    auto it = lora_feeds_.find(network);
    if (it == lora_feeds_.end()) return inputs;
    for (const SlotFeed &f : it->second) {
        inputs.push_back({f.down.empty() ? &kEmpty : f.down.data(), f.down_shape});
        inputs.push_back({f.up.empty() ? &kEmpty : f.up.data(), f.up_shape});
    }
    return inputs;
}

void Pipeline::check(Request &r) const {
    const ModelFacts &f = model_.facts;
    if (r.steps < 1) throw input_error("steps " + std::to_string(r.steps) + " must be an integer >= 1");
    if (r.steps > 1000) throw input_error("steps " + std::to_string(r.steps) + " is more than 1000; use at most 1000");
    if (!(r.guidance >= 0) || !std::isfinite(r.guidance))
        throw input_error("guidance_scale " + std::to_string(r.guidance) + " is negative or not finite; use 0-1 for no guidance, or e.g. 7.5");
    if (r.batch < 1 || r.batch > 64) throw input_error("batch_count " + std::to_string(r.batch) + " must be in 1..64");
    if (r.init_image && !(r.strength > 0.0 && r.strength <= 1.0))
        throw input_error("strength " + std::to_string(r.strength) + " is outside (0, 1]; 0.3 keeps most of the image, 1.0 replaces it");
    if (r.width == 0) r.width = f.default_size;
    if (r.height == 0) r.height = f.default_size;
    std::string bad = check_size(f, r.height, r.width);
    if (!bad.empty()) throw input_error(bad);
    if (!r.loras.empty() && !has_lora_slots_)
        throw model_error(model_.path + " takes no run-time LoRAs: it was exported without LoRA slots; re-export it with "
                          "`sdrt export MODEL OUT --lora-slots all`, or fuse the LoRA at export (`--lora FILE:SCALE`)");
    if (r.init_image && !backend_->has(kVaeEncoder))
        throw model_error(model_.path + " has no vae_encoder network, which img2img needs; re-export the model with `sdrt export`");
    if (r.mask && !r.init_image) throw input_error("mask_image needs init_image, the image it masks");
    if (r.keep_unmasked && !r.mask) throw input_error("keep_unmasked applies to inpainting: pass mask_image too");
    if (r.micro.given() && !f.time_ids_dim)
        throw input_error("original/crop/target sizes and aesthetic scores condition SDXL models only; this is a " + f.family +
                          " export: leave them 0");
    if (f.inpainting_unet() && !r.mask)
        throw input_error(model_.path + " is an inpainting model (its UNet takes the mask and the masked image): pass init_image "
                                        "and mask_image (>= 128 = repaint)");
    if (r.mask) {
        const size_t pixels = size_t(r.width) * size_t(r.height);
        if (std::none_of(r.mask, r.mask + pixels, [](uint8_t v) { return v >= 128; }))
            throw input_error("mask_image is all black (no value >= 128, 50% grey): nothing to repaint; mark the region to repaint white");
    }
    check_handover(r);
}

// SDXL's base + refiner hand-over, as runtime/pipeline.py's plan and runtime/sdxl.py's handed_over_latents check it;
// the window is built here too, so one that runs no step fails before any work.
void Pipeline::check_handover(const Request &r) const {
    const bool start = r.denoising_start != 0, end = r.denoising_end != 0;
    if (r.init_latents && !start)
        throw input_error("init_latents continue a base's run from denoising_start: set denoising_start too (e.g. 0.8, the "
                          "base's denoising_end), or leave init_latents NULL");
    if (!start && !end) return;
    if (!model_.facts.time_ids_dim)
        throw input_error("denoising_start/denoising_end hand latents between SDXL base and refiner; this is a " + model_.facts.family +
                          " model: leave them 0");
    if (r.mask)
        throw input_error("mask_image with denoising_start/denoising_end (an inpainting hand-over between SDXL base and refiner) is "
                          "not supported yet; inpaint with one model, or drop mask_image");
    if (start && r.init_image)
        throw input_error("denoising_start continues from init_latents, not from init_image: pass the base's latents as "
                          "init_latents and leave init_image NULL");
    if (start && !r.init_latents)
        throw input_error("denoising_start " + format_number(r.denoising_start) + " continues from latents: pass init_latents, the "
                          "base's sdrt_generate_latents output (batch_count x C x h x w floats, see sdrt_latent_shape)");
    if (start) {
        const std::array<int, 3> shape = latent_shape(r.width, r.height);
        const size_t n = size_t(r.batch) * size_t(shape[0]) * size_t(shape[1]) * size_t(shape[2]);
        if (!std::all_of(r.init_latents, r.init_latents + n, [](float v) { return std::isfinite(v); }))
            throw input_error("the handed-over latents (init_latents) hold NaN or inf");
    }
    std::unique_ptr<Scheduler> sched = Scheduler::create(r.scheduler, scheduler_config_, model_.family.schedulers);
    sched->set_timesteps(r.steps, 1.0, r.denoising_start, r.denoising_end);  // a window with no step fails here
}

std::array<int, 3> Pipeline::latent_shape(int width, int height) const {
    const ModelFacts &f = model_.facts;
    return {f.latent_channels, height / f.vae_scale_factor, width / f.vae_scale_factor};
}

// Each text encoder's states, concatenated along the channels per token (SDXL: penultimate states of both, and the
// second's pooled projection; runtime/sdxl.py), for one prompt.
Pipeline::TextStates Pipeline::encode_prompt(const std::string &prompt) {
    const ModelFacts &f = model_.facts;
    const int seq = f.text_seq_len;
    TextStates out;
    out.states.resize(size_t(seq) * size_t(states_width_));
    int offset = 0;
    for (TextEncoder &e : encoders_) {
        const int hidden = e.table.hidden;
        std::vector<int64_t> ids = e.tokenizer(prompt);
        std::vector<float> embeds(size_t(seq) * size_t(hidden));
        for (int i = 0; i < seq; ++i) {
            if (ids[size_t(i)] < 0 || ids[size_t(i)] >= e.table.rows)
                throw model_error("token id " + std::to_string(ids[size_t(i)]) + " is past the token table's " + std::to_string(e.table.rows) +
                                  " rows; the tokenizer and table do not belong together: re-export the model");
            std::copy_n(e.table.data.begin() + long(ids[size_t(i)]) * hidden, hidden, embeds.begin() + long(i) * hidden);
        }
        std::vector<float> states(size_t(seq) * size_t(e.width));
        if (e.network == kTextEncoder2) {
            // CLIP pools at argmax(ids) (configs with the legacy eos_token_id 2, SDXL's own) or at the first eos.
            size_t at = 0;
            for (size_t i = 0; i < ids.size(); ++i)
                if (f.pool_at_argmax ? ids[i] > ids[at] : (ids[i] == e.tokenizer.eos_id() && ids[at] != e.tokenizer.eos_id())) at = i;
            std::vector<float> pool(size_t(seq), 0.0f);
            pool[at] = 1.0f;
            out.pooled.resize(size_t(f.pooled_dim));
            backend_->run(e.network, with_loras(e.network, {{embeds.data(), {1, seq, hidden}}, {pool.data(), {1, seq}}}),
                          {{states.data(), {1, seq, e.width}}, {out.pooled.data(), {1, f.pooled_dim}}});
        } else {
            backend_->run(e.network, with_loras(e.network, {{embeds.data(), {1, seq, hidden}}}), {{states.data(), {1, seq, e.width}}});
        }
        for (int t = 0; t < seq; ++t)
            std::copy_n(states.begin() + long(t) * e.width, e.width, out.states.begin() + long(t) * states_width_ + offset);
        offset += e.width;
    }
    return out;
}

// SDXL's time ids of one request, as runtime/sdxl.py's time_ids: sizes default to the image's own, crop corners to
// (0, 0), the refiner's aesthetic scores (in place of the target size) to 6.0 and 2.5. txt2img uses the negative
// twins only when both negative sizes are given; img2img and inpainting default each to its positive twin (and pair
// the negative sizes with the positive crop corner), as diffusers' pipelines do.
std::vector<float> Pipeline::time_ids(const Request &r, bool negative) const {
    const MicroConditioning &m = r.micro;
    auto given = [](const std::array<int, 2> &p) { return p[0] != 0 || p[1] != 0; };
    auto size_or = [&](const std::array<int, 2> &p, const std::array<int, 2> &fallback) { return given(p) ? p : fallback; };
    const std::array<int, 2> image = {r.height, r.width};
    const std::array<int, 2> original = size_or(m.original, image), target = size_or(m.target, image);
    std::array<int, 2> a, b, c;  // the three pairs: original size, crop corner, target size
    double score = 0;
    if (model_.facts.requires_aesthetics_score) {
        a = negative ? size_or(m.negative_original, original) : original;
        b = negative ? m.negative_crops : m.crops;
        score = negative ? (m.negative_aesthetic_score != 0 ? m.negative_aesthetic_score : 2.5)
                         : (m.aesthetic_score != 0 ? m.aesthetic_score : 6.0);
        return {float(a[0]), float(a[1]), float(b[0]), float(b[1]), float(score)};
    }
    a = original, b = m.crops, c = target;
    if (negative && (r.init_image || r.init_latents)) {  // (a refiner continuing a base's latents: img2img's rule)
        a = size_or(m.negative_original, original), c = size_or(m.negative_target, target);
    } else if (negative && given(m.negative_original) && given(m.negative_target)) {
        a = m.negative_original, b = m.negative_crops, c = m.negative_target;
    }
    return {float(a[0]), float(a[1]), float(b[0]), float(b[1]), float(c[0]), float(c[1])};
}

void Pipeline::generate_latents(const Request &req_in, float *out, Progress progress, void *user, Timings &timings) {
    const double t_start = now();
    Request r = req_in;
    std::vector<float> x = denoise(r, progress, user, timings);
    if (!std::all_of(x.begin(), x.end(), [](float v) { return std::isfinite(v); }))
        throw Error(SDRT_ERR_BACKEND, "the latents after the denoising loop hold NaN/inf (the UNet produced them); with an fp16 "
                                      "export, re-export with more ops kept in fp32 or use fp32");
    std::copy(x.begin(), x.end(), out);
    timings.decode = 0;
    timings.total = now() - t_start;
}

// Steps 0-3: check, text, initial latents, the denoising loop; returns the latents (r gets its defaults filled in).
std::vector<float> Pipeline::denoise(Request &r, Progress progress, void *user, Timings &timings) {
    check(r);
    cancel_ = false;
    backend_->reset_cancel();
    activate_loras(r.loras);  // before any work: a bad file fails the call here
    const ModelFacts &f = model_.facts;
    const int64_t B = r.batch, C = f.latent_channels, h = r.height / f.vae_scale_factor, w = r.width / f.vae_scale_factor;
    const size_t per_image = size_t(C * h * w), n = size_t(B) * per_image, hw = size_t(h * w);
    const bool inpaint = r.mask != nullptr, conditioned = inpaint && f.inpainting_unet();
    const bool pure_noise = inpaint && r.strength == 1.0;  // diffusers' inpainting starts from noise alone at strength 1

    // One generator per image, seeded seed+k: image k alone is reproduced by its own seed.
    std::vector<TorchCpuGenerator> gens;
    for (int64_t k = 0; k < B; ++k) gens.emplace_back(r.seed + uint64_t(k), kernel_);

    std::unique_ptr<Scheduler> sched = Scheduler::create(r.scheduler, scheduler_config_, model_.family.schedulers);
    sched->set_timesteps(r.steps, r.init_image ? r.strength : 1.0, r.denoising_start, r.denoising_end);
    const bool guidance = r.guidance > 1.0;

    // 1. Text: [uncond, cond] hidden states, the prompt repeated for each image (SDXL: pooled embeddings and time
    // ids in the same rows; with force_zeros_for_empty_prompt, no negative prompt is zeros, not the encoded "").
    double t0 = now();
    const bool xl = f.time_ids_dim > 0;
    std::vector<float> states, pooled, ids;
    TextStates cond = encode_prompt(r.prompt);
    if (guidance) {
        TextStates uncond;
        if (xl && f.force_zeros_for_empty_prompt && r.negative.empty())
            uncond = {std::vector<float>(cond.states.size(), 0.0f), std::vector<float>(cond.pooled.size(), 0.0f)};
        else
            uncond = encode_prompt(r.negative);
        std::vector<float> neg_ids = xl ? time_ids(r, true) : std::vector<float>();
        for (int64_t k = 0; k < B; ++k) {
            states.insert(states.end(), uncond.states.begin(), uncond.states.end());
            pooled.insert(pooled.end(), uncond.pooled.begin(), uncond.pooled.end());
            ids.insert(ids.end(), neg_ids.begin(), neg_ids.end());
        }
    }
    std::vector<float> pos_ids = xl ? time_ids(r, false) : std::vector<float>();
    for (int64_t k = 0; k < B; ++k) {
        states.insert(states.end(), cond.states.begin(), cond.states.end());
        pooled.insert(pooled.end(), cond.pooled.begin(), cond.pooled.end());
        ids.insert(ids.end(), pos_ids.begin(), pos_ids.end());
    }
    timings.text = now() - t0;

    // 2. Initial latents: pure noise, or the encoded image noised to the first timestep of the truncated schedule,
    //    or (a refiner after a base) the handed-over latents as they are: diffusers adds no noise there, draws none.
    //    Per image, as diffusers draws: the image's posterior, the noise, then (inpainting) the masked image's.
    std::vector<float> x(n), noise, image_latents, masked_latents, mask_lat;
    if (r.init_latents) {
        std::copy_n(r.init_latents, n, x.begin());
    } else if (r.init_image) {
        const size_t pixels = size_t(r.width) * size_t(r.height);
        std::vector<float> image(3 * pixels);
        for (size_t p = 0; p < pixels; ++p)
            for (size_t c = 0; c < 3; ++c) image[c * pixels + p] = float(r.init_image[3 * p + c]) / 255.0f * 2.0f - 1.0f;
        auto encode = [&](const std::vector<float> &pixels_in) {  // the posterior sampled with each image's generator
            std::vector<float> mean(per_image), logvar(per_image), latents(n);
            std::vector<int64_t> lat = {1, C, h, w};
            backend_->run(kVaeEncoder, {{pixels_in.data(), {1, 3, r.height, r.width}}}, {{mean.data(), lat}, {logvar.data(), lat}});
            const float scaling = float(f.scaling_factor);
            const bool normalised = !f.latents_mean.empty();  // (sample - mean) * scaling / std, as diffusers' SDXL
            for (int64_t k = 0; k < B; ++k) {
                std::vector<float> eps = gens[size_t(k)].randn(per_image);
                for (size_t i = 0; i < per_image; ++i) {
                    const float sample = mean[i] + std::exp(0.5f * logvar[i]) * eps[i];
                    const size_t c = i / hw;
                    latents[size_t(k) * per_image + i] =
                        normalised ? (sample - f.latents_mean[c]) * scaling / f.latents_std[c] : sample * scaling;
                }
            }
            return latents;
        };
        if (!(conditioned && pure_noise)) image_latents = encode(image);
        noise = draw(gens, per_image);
        if (inpaint) {
            // The latent-size mask by nearest neighbour (torch's interpolate), from the mask thresholded at 50% grey.
            mask_lat.resize(hw);
            const double sy = double(float(double(r.height) / double(h))), sx = double(float(double(r.width) / double(w)));
            for (int64_t y = 0; y < h; ++y)
                for (int64_t xx = 0; xx < w; ++xx) {
                    const int64_t py = std::min<int64_t>(int64_t(std::floor(double(y) * sy)), r.height - 1);
                    const int64_t px = std::min<int64_t>(int64_t(std::floor(double(xx) * sx)), r.width - 1);
                    mask_lat[size_t(y * w + xx)] = r.mask[size_t(py) * size_t(r.width) + size_t(px)] >= 128 ? 1.0f : 0.0f;
                }
            if (conditioned) {  // the image with the region to repaint set to 0 (grey)
                std::vector<float> masked(image);
                for (size_t c = 0; c < 3; ++c)
                    for (size_t p = 0; p < pixels; ++p) masked[c * pixels + p] *= r.mask[p] >= 128 ? 0.0f : 1.0f;
                masked_latents = encode(masked);
            } else {  // unused by an ordinary UNet: only the draws, to keep each generator's stream in step
                for (auto &gen : gens) gen.randn(per_image);
            }
        }
        if (pure_noise) {
            const float sigma = sched->init_noise_sigma();
            for (size_t i = 0; i < n; ++i) x[i] = noise[i] * sigma;
        } else {
            sched->add_noise(image_latents.data(), noise.data(), x.data(), n, 0);
        }
    } else {
        noise = draw(gens, per_image);
        const float sigma = sched->init_noise_sigma();
        for (size_t i = 0; i < n; ++i) x[i] = noise[i] * sigma;
    }

    // 3. The denoising loop: one batched UNet call per step, guidance, scheduler step.
    t0 = now();
    const int64_t unet_batch = guidance ? 2 * B : B;
    const int64_t Cin = f.unet_in_channels;  // an inpainting UNet: [latents, mask, masked-image latents]
    std::vector<float> unet_in(size_t(unet_batch * Cin) * hw), pred(size_t(unet_batch) * per_image), scaled;
    if (conditioned) scaled.resize(n);
    std::vector<float> t_in(static_cast<size_t>(unet_batch));
    const float g = float(r.guidance);
    const int calls = sched->num_calls();
    for (int i = 0; i < calls; ++i) {
        if (cancel_) throw Error(SDRT_ERR_CANCELLED, "cancelled by sdrt_request_cancel before step " + std::to_string(i + 1) + " of " + std::to_string(calls));
        if (!conditioned) {
            sched->scale_model_input(x.data(), unet_in.data(), n, i);
            if (guidance) std::copy_n(unet_in.begin(), n, unet_in.begin() + long(n));
        } else {
            sched->scale_model_input(x.data(), scaled.data(), n, i);
            for (int64_t b = 0; b < unet_batch; ++b) {  // the uncond and cond rows share the mask and masked image
                const size_t k = size_t(b % B);
                float *row = unet_in.data() + size_t(b * Cin) * hw;
                std::copy_n(scaled.begin() + long(k * per_image), per_image, row);
                std::copy_n(mask_lat.begin(), hw, row + per_image);
                std::copy_n(masked_latents.begin() + long(k * per_image), per_image, row + per_image + hw);
            }
        }
        std::fill(t_in.begin(), t_in.end(), sched->timestep(i));
        std::vector<TensorIn> unet_inputs = {{unet_in.data(), {unet_batch, Cin, h, w}}, {t_in.data(), {unet_batch}},
                                             {states.data(), {unet_batch, f.text_seq_len, states_width_}}};
        if (xl) {
            unet_inputs.push_back({pooled.data(), {unet_batch, f.pooled_dim}});
            unet_inputs.push_back({ids.data(), {unet_batch, f.time_ids_dim}});
        }
        backend_->run(kUnet, with_loras(kUnet, unet_inputs), {{pred.data(), {unet_batch, C, h, w}}});
        if (guidance)
            for (size_t k = 0; k < n; ++k) pred[k] = pred[k] + g * (pred[n + k] - pred[k]);
        std::vector<float> step_noise;
        if (sched->needs_noise()) step_noise = draw(gens, per_image);
        sched->step(pred.data(), i, x.data(), step_noise.empty() ? nullptr : step_noise.data(), n);
        if (inpaint && !conditioned) {  // the kept region: the image's latents at call i+1's noise level (clean at the end)
            std::vector<float> kept(image_latents);
            if (i + 1 < calls) sched->add_noise(image_latents.data(), noise.data(), kept.data(), n, i + 1);
            for (size_t k = 0; k < n; ++k) {
                const float m = mask_lat[k % hw];
                x[k] = (1.0f - m) * kept[k] + m * x[k];
            }
        }
        if (progress && progress(i + 1, calls, user) != 0)
            throw Error(SDRT_ERR_CANCELLED, "cancelled by the progress callback after step " + std::to_string(i + 1) + " of " + std::to_string(calls));
    }
    timings.loop = now() - t0;
    return x;
}

void Pipeline::generate(const Request &req_in, uint8_t *rgb_out, Progress progress, void *user, Timings &timings) {
    const double t_start = now();
    Request r = req_in;
    std::vector<float> x = denoise(r, progress, user, timings);
    const ModelFacts &f = model_.facts;
    const int64_t B = r.batch, C = f.latent_channels, h = r.height / f.vae_scale_factor, w = r.width / f.vae_scale_factor;

    // 4. Decode (the scaling factor is inside the decoder network, per the contract) and round as diffusers does.
    const double t0 = now();
    const size_t pixels = size_t(r.width) * size_t(r.height);
    std::vector<float> decoded(size_t(B) * 3 * pixels);
    backend_->run(kVaeDecoder, {{x.data(), {B, C, h, w}}}, {{decoded.data(), {B, 3, r.height, r.width}}});
    for (float v : decoded)
        if (!std::isfinite(v)) {
            bool latents_bad = false;
            for (float l : x) latents_bad |= !std::isfinite(l);
            throw Error(SDRT_ERR_BACKEND, std::string("the VAE decoder produced NaN/inf") +
                                              (latents_bad ? " (the latents were already NaN: the UNet produced them)" : "") +
                                              "; with an fp16 export, re-export with more ops kept in fp32 or use fp32");
        }
    uint8_t max_value = 0;
    for (int64_t b = 0; b < B; ++b)
        for (size_t p = 0; p < pixels; ++p)
            for (size_t c = 0; c < 3; ++c) {
                float v = decoded[(size_t(b) * 3 + c) * pixels + p] / 2.0f + 0.5f;
                v = std::min(std::max(v, 0.0f), 1.0f) * 255.0f;
                uint8_t u = uint8_t(std::nearbyint(v));  // numpy's round: half to even
                rgb_out[(size_t(b) * pixels + p) * 3 + c] = u;
                max_value = std::max(max_value, u);
            }
    if (max_value == 0) throw Error(SDRT_ERR_BACKEND, "the backend decoded an all-black image; with an fp16 export, try fp32");
    if (r.keep_unmasked)  // paste back: outside the mask, init_image's pixels exactly
        for (int64_t b = 0; b < B; ++b)
            for (size_t p = 0; p < pixels; ++p)
                if (r.mask[p] < 128) std::copy_n(r.init_image + 3 * p, 3, rgb_out + (size_t(b) * pixels + p) * 3);
    timings.decode = now() - t0;
    timings.total = now() - t_start;
}

}  // namespace sdrt
