// ABI 1: the entry points of sdrt 0.1's header, whose structs had no struct_size, kept under their old symbol
// names so hosts built against that header still run (ctest builds one from cpp/tests/abi/sdrt_v1.h). Each
// converts to ABI 2 and calls it. ABI 1's seed rule stays: a negative seed means a random one.
#include <cstring>

#include "sdrt.h"

namespace {

struct CtxParamsV1 {
    const char *model_dir;
    sdrt_backend backend;
    int n_threads;
    int device_id;
    sdrt_progress_fn progress;
    void *progress_user;
};

struct GenParamsV1 {
    const char *prompt;
    const char *negative_prompt;
    int steps;
    double guidance_scale;
    int width, height;
    int64_t seed;
    const char *scheduler;
    int batch_count;
    const uint8_t *init_image;
    double strength;
};

struct TimingsV1 {
    double text, loop, decode, total;
};

sdrt_ctx_params to_v2(const CtxParamsV1 &v1) {
    sdrt_ctx_params p = sdrt_ctx_default_params();
    std::memcpy(&p.backend, &v1.backend, sizeof p.backend);  // any int a C caller stored: sdrt_init checks it
    p.model_dir = v1.model_dir;
    p.n_threads = v1.n_threads;
    p.device_id = v1.device_id;
    p.progress = v1.progress;
    p.progress_user = v1.progress_user;
    return p;
}

sdrt_gen_params to_v2(const GenParamsV1 &v1) {
    sdrt_gen_params p = sdrt_gen_default_params();
    p.prompt = v1.prompt;
    p.negative_prompt = v1.negative_prompt;
    p.steps = v1.steps;
    p.guidance_scale = v1.guidance_scale;
    p.width = v1.width;
    p.height = v1.height;
    p.seed = v1.seed < 0 ? SDRT_SEED_RANDOM : v1.seed;
    p.scheduler = v1.scheduler;
    p.batch_count = v1.batch_count;
    p.init_image = v1.init_image;
    p.strength = v1.strength;
    return p;
}

}  // namespace

// The C++ names differ (sdrt.h's inline functions and macros hold the plain ones here); the asm labels give
// the exported symbols ABI 1's names.
extern "C" {
SDRT_API CtxParamsV1 sdrt_v1_ctx_default_params(void) __asm__("sdrt_ctx_default_params");
SDRT_API GenParamsV1 sdrt_v1_gen_default_params(void) __asm__("sdrt_gen_default_params");
SDRT_API sdrt_status sdrt_v1_init(const CtxParamsV1 *params, sdrt_ctx **out) __asm__("sdrt_init");
SDRT_API sdrt_status sdrt_v1_generate(sdrt_ctx *ctx, const GenParamsV1 *params, uint8_t *rgb_out) __asm__("sdrt_generate");
SDRT_API sdrt_status sdrt_v1_generate_image(sdrt_ctx *ctx, const GenParamsV1 *params, sdrt_image **out) __asm__("sdrt_generate_image");
SDRT_API sdrt_status sdrt_v1_last_timings(const sdrt_ctx *ctx, TimingsV1 *out) __asm__("sdrt_last_timings");
SDRT_API int64_t sdrt_v1_last_seed(const sdrt_ctx *ctx) __asm__("sdrt_last_seed");

CtxParamsV1 sdrt_v1_ctx_default_params(void) {
    CtxParamsV1 p;
    std::memset(&p, 0, sizeof p);
    p.backend = SDRT_BACKEND_AUTO;
    return p;
}

GenParamsV1 sdrt_v1_gen_default_params(void) {
    GenParamsV1 p;
    std::memset(&p, 0, sizeof p);
    p.steps = 30;
    p.guidance_scale = 7.5;
    p.seed = -1;
    p.batch_count = 1;
    p.strength = 0.8;
    return p;
}

sdrt_status sdrt_v1_init(const CtxParamsV1 *params, sdrt_ctx **out) {
    if (!params) return sdrt_init(nullptr, out);
    sdrt_ctx_params p = to_v2(*params);
    return sdrt_init(&p, out);
}

sdrt_status sdrt_v1_generate(sdrt_ctx *ctx, const GenParamsV1 *params, uint8_t *rgb_out) {
    if (!params) return sdrt_generate(ctx, nullptr, rgb_out);
    sdrt_gen_params p = to_v2(*params);
    return sdrt_generate(ctx, &p, rgb_out);
}

sdrt_status sdrt_v1_generate_image(sdrt_ctx *ctx, const GenParamsV1 *params, sdrt_image **out) {
    if (!params) return sdrt_generate_image(ctx, nullptr, out);
    sdrt_gen_params p = to_v2(*params);
    return sdrt_generate_image(ctx, &p, out);
}

sdrt_status sdrt_v1_last_timings(const sdrt_ctx *ctx, TimingsV1 *out) {
    sdrt_timings t;
    std::memset(&t, 0, sizeof t);
    t.struct_size = sizeof t;
    sdrt_status st = sdrt_last_timings(ctx, out ? &t : nullptr);
    if (st == SDRT_OK) *out = TimingsV1{t.text, t.loop, t.decode, t.total};
    return st;
}

int64_t sdrt_v1_last_seed(const sdrt_ctx *ctx) { return sdrt_last_seed(ctx); }  // -1 when there is none, as in ABI 1

}  // extern "C"
