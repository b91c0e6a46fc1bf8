// The C API (sdrt.h) over the C++ pipeline: argument checks, the status/message for every failure, and the
// try/catch that keeps every exception inside the library.
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <new>
#include <random>
#include <string>

#include "pipeline.h"
#include "util.h"

struct sdrt_ctx {
    std::unique_ptr<sdrt::Pipeline> pipeline;
    std::mutex lock;  // serialises calls on one context
    std::string error, backend_info;
    sdrt_progress_fn progress = nullptr;
    void *progress_user = nullptr;
    int64_t last_seed = -1;
    sdrt::Timings timings;
    bool has_timings = false;
};

namespace {

thread_local std::string t_error;  // sdrt_last_error(NULL)

// Runs fn, turning every exception into a status and a message for ctx (or the thread, for a NULL ctx).
template <typename Fn>
sdrt_status guarded(sdrt_ctx *ctx, Fn &&fn) {
    std::string &error = ctx ? ctx->error : t_error;
    try {
        fn();
        error.clear();
        return SDRT_OK;
    } catch (const sdrt::Error &e) {
        error = e.what();
        return e.status();
    } catch (const std::bad_alloc &) {
        error = "out of memory; use a smaller image size or batch_count";
        return SDRT_ERR_OUT_OF_MEMORY;
    } catch (const std::exception &e) {
        error = std::string("internal error: ") + e.what();
        return SDRT_ERR_INTERNAL;
    } catch (...) {
        error = "internal error: an unknown exception";
        return SDRT_ERR_INTERNAL;
    }
}

sdrt_status null_arg(sdrt_ctx *ctx, const char *what) {
    (ctx ? ctx->error : t_error) = std::string(what) + " is NULL";
    return SDRT_ERR_INVALID_ARGUMENT;
}

sdrt::Request to_request(const sdrt_gen_params *p, int64_t &seed_used) {
    if (!p->prompt) throw sdrt::input_error("prompt is NULL; pass a UTF-8 string (\"\" is allowed)");
    sdrt::Request r;
    r.prompt = p->prompt;
    r.negative = p->negative_prompt ? p->negative_prompt : "";
    r.scheduler = p->scheduler ? p->scheduler : "";
    r.steps = p->steps;
    r.guidance = p->guidance_scale;
    r.width = p->width;
    r.height = p->height;
    r.batch = p->batch_count;
    r.init_image = p->init_image;
    r.strength = p->strength;
    if (p->width < 0 || p->height < 0)
        throw sdrt::input_error("width " + std::to_string(p->width) + " / height " + std::to_string(p->height) + " must not be negative; 0 means the model's size");
    if (p->seed < 0) {
        std::random_device rd;
        seed_used = int64_t(rd() & 0x7FFFFFFFu);  // as the Python runtime: random.randrange(2**31)
    } else {
        seed_used = p->seed;
    }
    r.seed = uint64_t(seed_used);
    return r;
}

}  // namespace

extern "C" {

const char *sdrt_version(void) { return SDRT_VERSION; }

sdrt_ctx_params sdrt_ctx_default_params(void) {
    sdrt_ctx_params p;
    std::memset(&p, 0, sizeof p);
    p.backend = SDRT_BACKEND_AUTO;
    return p;
}

sdrt_gen_params sdrt_gen_default_params(void) {
    sdrt_gen_params p;
    std::memset(&p, 0, sizeof p);
    p.steps = 30;
    p.guidance_scale = 7.5;
    p.seed = -1;
    p.batch_count = 1;
    p.strength = 0.8;
    return p;
}

sdrt_status sdrt_init(const sdrt_ctx_params *params, sdrt_ctx **out) {
    if (!out) return null_arg(nullptr, "the sdrt_ctx ** output pointer");
    *out = nullptr;
    if (!params) return null_arg(nullptr, "params");
    if (!params->model_dir) return null_arg(nullptr, "params->model_dir (the export folder)");
    sdrt_ctx *ctx = nullptr;
    sdrt_status st = guarded(nullptr, [&] {
        // A C caller may store any int in the enum field: read it as an int (loading it as the enum would be UB).
        int backend = 0;
        static_assert(sizeof(params->backend) == sizeof(int), "sdrt_backend is int-sized");
        std::memcpy(&backend, &params->backend, sizeof backend);
        if (backend < SDRT_BACKEND_AUTO || backend > SDRT_BACKEND_TENSORRT)
            throw sdrt::input_error("backend " + std::to_string(backend) + " is not an sdrt_backend value");
        if (params->n_threads < 0) throw sdrt::input_error("n_threads " + std::to_string(params->n_threads) + " is negative; 0 means ONNX Runtime's default");
        std::unique_ptr<sdrt_ctx> c(new sdrt_ctx);
        sdrt::BackendOptions options{backend, params->n_threads, params->device_id};
        c->pipeline.reset(new sdrt::Pipeline(params->model_dir, options));
        c->backend_info = c->pipeline->backend().describe();
        c->progress = params->progress;
        c->progress_user = params->progress_user;
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
    if (!ctx) return null_arg(nullptr, "ctx");
    std::unique_lock<std::mutex> lock(ctx->lock, std::defer_lock);
    if (guarded(nullptr, [&] { lock.lock(); }) != SDRT_OK) return SDRT_ERR_INTERNAL;
    if (!params) return null_arg(ctx, "params");
    if (!rgb_out) return null_arg(ctx, "rgb_out (a buffer of batch_count * height * width * 3 bytes)");
    return guarded(ctx, [&] {
        int64_t seed = -1;
        sdrt::Request r = to_request(params, seed);
        sdrt::Timings t;
        ctx->pipeline->generate(r, rgb_out, ctx->progress, ctx->progress_user, t);
        ctx->last_seed = seed;
        ctx->timings = t;
        ctx->has_timings = true;
    });
}

sdrt_status sdrt_generate_image(sdrt_ctx *ctx, const sdrt_gen_params *params, sdrt_image **out) {
    if (!ctx) return null_arg(nullptr, "ctx");
    if (!out) return null_arg(ctx, "the sdrt_image ** output pointer");
    *out = nullptr;
    std::unique_lock<std::mutex> lock(ctx->lock, std::defer_lock);
    if (guarded(nullptr, [&] { lock.lock(); }) != SDRT_OK) return SDRT_ERR_INTERNAL;
    if (!params) return null_arg(ctx, "params");
    sdrt_image *image = nullptr;
    sdrt_status st = guarded(ctx, [&] {
        int64_t seed = -1;
        sdrt::Request r = to_request(params, seed);
        ctx->pipeline->check(r);  // fills in the default size
        std::unique_ptr<uint8_t[]> data(new uint8_t[size_t(r.batch) * size_t(r.width) * size_t(r.height) * 3]);
        sdrt::Timings t;
        ctx->pipeline->generate(r, data.get(), ctx->progress, ctx->progress_user, t);
        image = new sdrt_image{r.width, r.height, r.batch, data.release()};
        ctx->last_seed = seed;
        ctx->timings = t;
        ctx->has_timings = true;
    });
    *out = image;
    return st;
}

void sdrt_image_free(sdrt_image *image) {
    if (!image) return;
    delete[] image->data;
    delete image;
}

sdrt_status sdrt_default_size(const sdrt_ctx *ctx, int *width, int *height) {
    if (!ctx) return null_arg(nullptr, "ctx");
    if (!width || !height) return null_arg(const_cast<sdrt_ctx *>(ctx), "width or height");
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

int64_t sdrt_last_seed(const sdrt_ctx *ctx) { return ctx ? ctx->last_seed : -1; }

sdrt_status sdrt_last_timings(const sdrt_ctx *ctx, sdrt_timings *out) {
    if (!ctx) return null_arg(nullptr, "ctx");
    if (!out) return null_arg(const_cast<sdrt_ctx *>(ctx), "out");
    if (!ctx->has_timings) {
        const_cast<sdrt_ctx *>(ctx)->error = "no image has been generated on this context yet";
        return SDRT_ERR_INVALID_ARGUMENT;
    }
    *out = sdrt_timings{ctx->timings.text, ctx->timings.loop, ctx->timings.decode, ctx->timings.total};
    return SDRT_OK;
}

const char *sdrt_backend_info(const sdrt_ctx *ctx) { return ctx ? ctx->backend_info.c_str() : ""; }

const char *sdrt_last_error(const sdrt_ctx *ctx) { return ctx ? ctx->error.c_str() : t_error.c_str(); }

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
