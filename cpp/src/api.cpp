// The C API (sdrt.h, ABI 6) over the C++ pipeline: argument checks, the status/message for every failure, the
// growable params structs (struct_size), and the try/catch that keeps every exception inside the library.
// ABI 1's entry points (hosts built against sdrt 0.1's header) are in api_v1.cpp.
#include <array>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <new>
#include <random>
#include <string>

#include "api_internal.h"
#include "pipeline.h"
#include "util.h"

struct sdrt_ctx {
    std::unique_ptr<sdrt::Pipeline> pipeline;
    std::mutex lock;  // serialises calls on one context
    sdrt_api::ErrorText error;
    std::string backend_info;
    sdrt_progress_fn progress = nullptr;
    void *progress_user = nullptr;
    std::atomic<int64_t> last_seed{SDRT_SEED_RANDOM};  // read without the lock by sdrt_last_seed
    sdrt::Timings timings;
    bool has_timings = false;
};

namespace sdrt_api {

void ErrorText::set(const char *message) noexcept {
    std::strncpy(text, message ? message : "", sizeof text - 1);
    text[sizeof text - 1] = '\0';
}

namespace {

thread_local ErrorText t_error;  // sdrt_last_error(NULL)

ErrorText &error_of(const sdrt_ctx *ctx) { return ctx ? const_cast<sdrt_ctx *>(ctx)->error : t_error; }

// Runs fn, turning every exception into a status and a message for ctx (or the thread, for a NULL ctx). The
// message goes into a fixed buffer, so reporting a failure cannot itself throw (out of memory included).
template <typename Fn>
sdrt_status guarded(const sdrt_ctx *ctx, Fn &&fn) noexcept {
    ErrorText &error = error_of(ctx);
    try {
        fn();
        error.set("");
        return SDRT_OK;
    } catch (const sdrt::Error &e) {
        error.set(e.what());
        return e.status();
    } catch (const std::bad_alloc &) {
        error.set("out of memory; use a smaller image size or batch_count");
        return SDRT_ERR_OUT_OF_MEMORY;
    } catch (const std::exception &e) {
        error.set("internal error: ");
        std::strncat(error.text, e.what(), sizeof error.text - std::strlen(error.text) - 1);
        return SDRT_ERR_INTERNAL;
    } catch (...) {
        error.set("internal error: an unknown exception");
        return SDRT_ERR_INTERNAL;
    }
}

sdrt_status null_arg(const sdrt_ctx *ctx, const char *what) noexcept {
    ErrorText &e = error_of(ctx);
    std::snprintf(e.text, sizeof e.text, "%s is NULL", what);
    return SDRT_ERR_INVALID_ARGUMENT;
}

// Every size a params struct has had, by ABI version from 2 on (rule 4 in sdrt.h: append each new version's size).
const size_t kCtxSizes[] = {sizeof(sdrt_ctx_params)};
const size_t kGenSizes[] = {offsetof(sdrt_gen_params, mask_image), offsetof(sdrt_gen_params, loras),
                            offsetof(sdrt_gen_params, original_height), offsetof(sdrt_gen_params, denoising_start),
                            sizeof(sdrt_gen_params)};  // ABI 2, 3, 4, 5, 6
static_assert(offsetof(sdrt_gen_params, original_height) == offsetof(sdrt_gen_params, lora_count) + sizeof(size_t),
              "ABI 4's sdrt_gen_params ends at lora_count: no padding before ABI 5's fields");
static_assert(offsetof(sdrt_gen_params, denoising_start) == offsetof(sdrt_gen_params, negative_aesthetic_score) + sizeof(double),
              "ABI 5's sdrt_gen_params ends at negative_aesthetic_score: no padding before ABI 6's fields");
static_assert(sizeof(sdrt_gen_params) == offsetof(sdrt_gen_params, init_latents) + sizeof(const float *),
              "no tail padding after init_latents (rule 3 in sdrt.h)");
const size_t kTimingsSizes[] = {sizeof(sdrt_timings)};
constexpr size_t kMaxStruct = 1 << 16;  // a struct_size past this is an unset field, not a future header

template <size_t N>
void check_size(size_t n, const size_t (&sizes)[N], const char *type, const char *how) {
    for (size_t s : sizes)
        if (n == s) return;
    if (n > sizes[N - 1] && n <= kMaxStruct) return;  // a host built against a newer header: see read_params
    throw sdrt::input_error(std::string(type) + ".struct_size " + std::to_string(n) + " is not the size of any " + type +
                            " version (this libsdrt knows " + std::to_string(sizes[N - 1]) + " bytes, ABI " +
                            std::to_string(SDRT_ABI_VERSION) + "); " + how);
}

// The caller's struct over the library's defaults: fields past the caller's struct_size keep their defaults, and
// fields this library does not know (a newer host) must be zero, their "as before" value.
template <typename T, size_t N>
T read_params(const T *in, const size_t (&sizes)[N], void (*init)(T *, size_t), const char *type, const char *how) {
    const size_t n = in->struct_size;
    check_size(n, sizes, type, how);
    const unsigned char *bytes = reinterpret_cast<const unsigned char *>(in);
    for (size_t i = sizeof(T); i < n; ++i)
        if (bytes[i])
            throw sdrt::Error(SDRT_ERR_UNSUPPORTED, std::string(type) + " sets fields this libsdrt does not know (the host's struct is " +
                                                        std::to_string(n) + " bytes, this library's ABI " + std::to_string(SDRT_ABI_VERSION) +
                                                        " has " + std::to_string(sizeof(T)) + "); run it with a newer libsdrt, or leave "
                                                        "the newer fields at their defaults");
    T out;
    init(&out, sizeof out);
    std::memcpy(&out, in, n < sizeof(T) ? n : sizeof(T));
    out.struct_size = sizeof(T);
    return out;
}

sdrt::Request to_request(const sdrt_gen_params &p, int64_t &seed_used) {
    if (!p.prompt) throw sdrt::input_error("prompt is NULL; pass a UTF-8 string (\"\" is allowed)");
    sdrt::Request r;
    r.prompt = p.prompt;
    r.negative = p.negative_prompt ? p.negative_prompt : "";
    r.scheduler = p.scheduler ? p.scheduler : "";
    r.steps = p.steps;
    r.guidance = p.guidance_scale;
    r.width = p.width;
    r.height = p.height;
    r.batch = p.batch_count;
    r.init_image = p.init_image;
    r.strength = p.strength;
    r.mask = p.mask_image;
    r.keep_unmasked = p.keep_unmasked != 0;
    if (p.lora_count && !p.loras) throw sdrt::input_error("loras is NULL but lora_count is " + std::to_string(p.lora_count) + "; pass an array of lora_count sdrt_lora");
    if (p.lora_count > 64) throw sdrt::input_error("lora_count " + std::to_string(p.lora_count) + " is more than 64 LoRAs in one call");
    for (size_t i = 0; i < p.lora_count; ++i) {
        if (!p.loras[i].path || !*p.loras[i].path) throw sdrt::input_error("loras[" + std::to_string(i) + "].path is NULL or empty; pass a LoRA .safetensors file");
        if (!std::isfinite(p.loras[i].scale))
            throw sdrt::input_error("loras[" + std::to_string(i) + "].scale is not a finite number; use e.g. 0.8");
        r.loras.emplace_back(p.loras[i].path, p.loras[i].scale);
    }
    if (p.width < 0 || p.height < 0)
        throw sdrt::input_error("width " + std::to_string(p.width) + " / height " + std::to_string(p.height) + " must not be negative; 0 means the model's size");
    // SDXL's micro-conditioning: (height, width) / (top, left) pairs, 0 = not given (sdrt::MicroConditioning)
    auto pair = [](int a, int b, const char *name, bool size) {
        if (a < 0 || b < 0 || (size && (a == 0) != (b == 0)))
            throw sdrt::input_error(std::string(name) + " (" + std::to_string(a) + ", " + std::to_string(b) + ") is not " +
                                    (size ? "a size in pixels given whole (both > 0), or (0, 0) for the image's own"
                                          : "a corner in pixels (both >= 0)"));
        return std::array<int, 2>{a, b};
    };
    r.micro.original = pair(p.original_height, p.original_width, "original_height/width", true);
    r.micro.crops = pair(p.crop_top, p.crop_left, "crop_top/left", false);
    r.micro.target = pair(p.target_height, p.target_width, "target_height/width", true);
    r.micro.negative_original = pair(p.negative_original_height, p.negative_original_width, "negative_original_height/width", true);
    r.micro.negative_crops = pair(p.negative_crop_top, p.negative_crop_left, "negative_crop_top/left", false);
    r.micro.negative_target = pair(p.negative_target_height, p.negative_target_width, "negative_target_height/width", true);
    if (!std::isfinite(p.aesthetic_score) || !std::isfinite(p.negative_aesthetic_score))
        throw sdrt::input_error("aesthetic_score / negative_aesthetic_score is not a finite number; use e.g. 6.0 and 2.5 (0: those defaults)");
    r.micro.aesthetic_score = p.aesthetic_score;
    r.micro.negative_aesthetic_score = p.negative_aesthetic_score;
    // The hand-over (ABI 6): 0 = not given; any other value is checked against the schedule by the pipeline, as
    // Python's set_timesteps checks it (a fraction in (0, 1): NaN and inf are refused there).
    r.denoising_start = p.denoising_start;
    r.denoising_end = p.denoising_end;
    r.init_latents = p.init_latents;
    if (p.seed == SDRT_SEED_RANDOM) {
        std::random_device rd;
        seed_used = int64_t(rd() & 0x7FFFFFFFu);  // as the Python runtime: random.randrange(2**31)
    } else if (p.seed < 0) {  // Python's sdrt refuses them too (sdrt.inputs.check_seed)
        throw sdrt::input_error("seed " + std::to_string(p.seed) + " is negative; use 0 or more, or SDRT_SEED_RANDOM (-1) for a random seed");
    } else {
        seed_used = p.seed;  // seed + k stays below 2^64, inside Python's 0..2**64-batch
    }
    r.seed = uint64_t(seed_used);
    return r;
}

// What every generate entry point shares: the context's lock, then params and the output pointer checked, the
// params read as the host's ABI wrote them, the request made; `run` fills the output; the seed and timings are kept
// for sdrt_last_seed / sdrt_last_timings.
template <class Run>
sdrt_status generate_with(sdrt_ctx *ctx, const sdrt_gen_params *params, const void *out, const char *out_what, Run &&run) {
    if (!ctx) return null_arg(nullptr, "ctx");
    std::unique_lock<std::mutex> lock(ctx->lock, std::defer_lock);
    if (guarded(nullptr, [&] { lock.lock(); }) != SDRT_OK) return SDRT_ERR_INTERNAL;
    if (!params) return null_arg(ctx, "params");
    if (!out) return null_arg(ctx, out_what);
    return guarded(ctx, [&] {
        const sdrt_gen_params p = read_params(params, kGenSizes, sdrt_gen_params_init, "sdrt_gen_params", "start from sdrt_gen_default_params()");
        int64_t seed = SDRT_SEED_RANDOM;
        sdrt::Request r = to_request(p, seed);
        sdrt::Timings t;
        run(r, t);
        ctx->last_seed = seed;
        ctx->timings = t;
        ctx->has_timings = true;
    });
}

}  // namespace
}  // namespace sdrt_api

using namespace sdrt_api;

extern "C" {

const char *sdrt_version(void) { return SDRT_VERSION; }
int sdrt_abi_version(void) { return SDRT_ABI_VERSION; }

void sdrt_ctx_params_init(sdrt_ctx_params *p, size_t struct_size) {
    if (!p || struct_size < sizeof(size_t)) return;
    sdrt_ctx_params d;
    std::memset(&d, 0, sizeof d);
    d.struct_size = struct_size < sizeof d ? struct_size : sizeof d;
    d.backend = SDRT_BACKEND_AUTO;
    std::memset(p, 0, struct_size);  // a newer host's fields past ours: zero, their "as before" value
    std::memcpy(p, &d, d.struct_size);
    p->struct_size = struct_size;
}

void sdrt_gen_params_init(sdrt_gen_params *p, size_t struct_size) {
    if (!p || struct_size < sizeof(size_t)) return;
    sdrt_gen_params d;
    std::memset(&d, 0, sizeof d);
    d.steps = 30;
    d.guidance_scale = 7.5;
    d.seed = SDRT_SEED_RANDOM;
    d.batch_count = 1;
    d.strength = 0.8;
    std::memset(p, 0, struct_size);
    std::memcpy(p, &d, struct_size < sizeof d ? struct_size : sizeof d);
    p->struct_size = struct_size;
}

sdrt_status sdrt_init(const sdrt_ctx_params *params, sdrt_ctx **out) {
    if (!out) return null_arg(nullptr, "the sdrt_ctx ** output pointer");
    *out = nullptr;
    if (!params) return null_arg(nullptr, "params");
    sdrt_ctx *ctx = nullptr;
    sdrt_status st = guarded(nullptr, [&] {
        const sdrt_ctx_params p = read_params(params, kCtxSizes, sdrt_ctx_params_init, "sdrt_ctx_params", "start from sdrt_ctx_default_params()");
        if (!p.model_dir) throw sdrt::input_error("params->model_dir (the export folder) is NULL");
        // A C caller may store any int in the enum field: read it as an int (loading it as the enum would be UB).
        int backend = 0;
        static_assert(sizeof(p.backend) == sizeof(int), "sdrt_backend is int-sized");
        std::memcpy(&backend, &p.backend, sizeof backend);
        if (backend < SDRT_BACKEND_AUTO || backend > SDRT_BACKEND_TENSORRT)
            throw sdrt::input_error("backend " + std::to_string(backend) + " is not an sdrt_backend value; use 0-4 (SDRT_BACKEND_AUTO ...)");
        if (p.n_threads < 0) throw sdrt::input_error("n_threads " + std::to_string(p.n_threads) + " is negative; 0 means ONNX Runtime's default");
        if (p.device_id < 0) throw sdrt::input_error("device_id " + std::to_string(p.device_id) + " is negative; GPUs count from 0");
        std::unique_ptr<sdrt_ctx> c(new sdrt_ctx);
        sdrt::BackendOptions options{backend, p.n_threads, p.device_id};
        c->pipeline.reset(new sdrt::Pipeline(p.model_dir, options));
        c->backend_info = c->pipeline->backend().describe();
        c->progress = p.progress;
        c->progress_user = p.progress_user;
        ctx = c.release();
    });
    *out = ctx;
    return st;
}

void sdrt_free(sdrt_ctx *ctx) {
    if (!ctx) return;
    try {
        { std::lock_guard<std::mutex> wait_for_a_run(ctx->lock); }
        delete ctx;
    } catch (...) {  // nothing may leave the C API; a failing lock leaves the context allocated rather than crash
    }
}

sdrt_status sdrt_generate(sdrt_ctx *ctx, const sdrt_gen_params *params, uint8_t *rgb_out) {
    return generate_with(ctx, params, rgb_out, "rgb_out (a buffer of batch_count * height * width * 3 bytes)",
                         [&](sdrt::Request &r, sdrt::Timings &t) {
                             ctx->pipeline->generate(r, rgb_out, ctx->progress, ctx->progress_user, t);
                         });
}

sdrt_status sdrt_generate_image(sdrt_ctx *ctx, const sdrt_gen_params *params, sdrt_image **out) {
    if (out) *out = nullptr;
    return generate_with(ctx, params, out, "the sdrt_image ** output pointer", [&](sdrt::Request &r, sdrt::Timings &t) {
        ctx->pipeline->check(r);  // fills in the default size
        std::unique_ptr<uint8_t[]> data(new uint8_t[size_t(r.batch) * size_t(r.width) * size_t(r.height) * 3]);
        ctx->pipeline->generate(r, data.get(), ctx->progress, ctx->progress_user, t);
        *out = new sdrt_image{r.width, r.height, r.batch, data.release()};
    });
}

sdrt_status sdrt_generate_latents(sdrt_ctx *ctx, const sdrt_gen_params *params, float *latents_out) {
    return generate_with(ctx, params, latents_out,
                         "latents_out (a buffer of batch_count x C x h x w floats, see sdrt_latent_shape)",
                         [&](sdrt::Request &r, sdrt::Timings &t) {
                             ctx->pipeline->generate_latents(r, latents_out, ctx->progress, ctx->progress_user, t);
                         });
}

sdrt_status sdrt_latent_shape(const sdrt_ctx *ctx, int width, int height, int shape[3]) {
    if (!ctx) return null_arg(nullptr, "ctx");
    sdrt_ctx *c = const_cast<sdrt_ctx *>(ctx);  // the lock: its error message must not race a running generate's
    std::unique_lock<std::mutex> lock(c->lock, std::defer_lock);
    if (guarded(nullptr, [&] { lock.lock(); }) != SDRT_OK) return SDRT_ERR_INTERNAL;
    if (!shape) return null_arg(ctx, "shape (an int[3])");
    return guarded(ctx, [&] {
        const sdrt::ModelFacts &f = ctx->pipeline->facts();
        if (width < 0 || height < 0)
            throw sdrt::input_error("width " + std::to_string(width) + " / height " + std::to_string(height) + " must not be negative; 0 means the model's size");
        const int w = width ? width : f.default_size, h = height ? height : f.default_size;
        const std::string bad = sdrt::check_size(f, h, w);
        if (!bad.empty()) throw sdrt::input_error(bad);
        const std::array<int, 3> s = ctx->pipeline->latent_shape(w, h);
        for (int i = 0; i < 3; ++i) shape[i] = s[size_t(i)];
    });
}

void sdrt_image_free(sdrt_image *image) {
    if (!image) return;
    delete[] image->data;
    delete image;
}

sdrt_status sdrt_default_size(const sdrt_ctx *ctx, int *width, int *height) {
    if (!ctx) return null_arg(nullptr, "ctx");
    if (!width || !height) return null_arg(ctx, "width or height");
    *width = *height = ctx->pipeline->facts().default_size;
    return SDRT_OK;
}

int sdrt_size_step(const sdrt_ctx *ctx) { return ctx ? ctx->pipeline->facts().size_step() : 0; }

sdrt_status sdrt_set_progress_callback(sdrt_ctx *ctx, sdrt_progress_fn fn, void *user) {
    if (!ctx) return null_arg(nullptr, "ctx");
    return guarded(nullptr, [&] {
        std::lock_guard<std::mutex> lock(ctx->lock);
        ctx->progress = fn;
        ctx->progress_user = user;
    });
}

void sdrt_request_cancel(sdrt_ctx *ctx) {
    if (!ctx) return;
    try {
        ctx->pipeline->cancel();  // no context lock: it must reach a run in progress
    } catch (...) {
    }
}

int64_t sdrt_last_seed(const sdrt_ctx *ctx) { return ctx ? ctx->last_seed.load() : SDRT_SEED_RANDOM; }

sdrt_status sdrt_last_timings(const sdrt_ctx *ctx, sdrt_timings *out) {
    if (!ctx) return null_arg(nullptr, "ctx");
    if (!out) return null_arg(ctx, "out");
    return guarded(ctx, [&] {
        const size_t n = out->struct_size;
        check_size(n, kTimingsSizes, "sdrt_timings", "set out->struct_size = sizeof(sdrt_timings)");
        if (!ctx->has_timings) throw sdrt::input_error("no image has been generated on this context yet");
        sdrt_timings t{sizeof(sdrt_timings), ctx->timings.text, ctx->timings.loop, ctx->timings.decode, ctx->timings.total};
        std::memcpy(out, &t, n < sizeof t ? n : sizeof t);  // a newer host's fields past ours are left as they are
        out->struct_size = n;
    });
}

const char *sdrt_backend_info(const sdrt_ctx *ctx) { return ctx ? ctx->backend_info.c_str() : ""; }

const char *sdrt_last_error(const sdrt_ctx *ctx) { return error_of(ctx).text; }

const char *sdrt_status_name(sdrt_status status) {
    switch (status) {
        case SDRT_OK: return "SDRT_OK";
        case SDRT_ERR_INVALID_ARGUMENT: return "SDRT_ERR_INVALID_ARGUMENT";
        case SDRT_ERR_MODEL: return "SDRT_ERR_MODEL";
        case SDRT_ERR_BACKEND: return "SDRT_ERR_BACKEND";
        case SDRT_ERR_CANCELLED: return "SDRT_ERR_CANCELLED";
        case SDRT_ERR_OUT_OF_MEMORY: return "SDRT_ERR_OUT_OF_MEMORY";
        case SDRT_ERR_UNSUPPORTED: return "SDRT_ERR_UNSUPPORTED";
        case SDRT_ERR_INTERNAL: return "SDRT_ERR_INTERNAL";
    }
    return "SDRT_ERR_UNKNOWN";
}

}  // extern "C"
