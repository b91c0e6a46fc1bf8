/* sdrt.h - the C API of sdrt (ABI 5), an inference runtime for Stable Diffusion 1.x/2.x and XL over `sdrt export` folders.
 *
 * It runs the same algorithm as the Python runtime (runtime/pipeline.py): the CLIP tokenizer, the token-embedding
 * lookup, classifier-free guidance with negative prompts, the schedulers (ddim, pndm, euler, euler_a, dpmpp_2m,
 * dpmpp_2m_karras, lms, heun, unipc, dpmpp_2m_sde, dpmpp_2s_a, ddpm, lcm, tcd, Karras/exponential variants), img2img,
 * inpainting (ABI 3), SDXL's micro-conditioning (ABI 5), and torch's CPU random stream, so the same seed gives the same image as
 * `sdrt generate` on the same export (image k of a batch uses seed + k). Networks run on ONNX Runtime (CPU, or its
 * CUDA / TensorRT providers when the loaded ONNX Runtime has them).
 *
 * Usage:
 *
 *     sdrt_ctx_params cp = sdrt_ctx_default_params();
 *     cp.model_dir = "exports/sd15-onnx";
 *     sdrt_ctx *ctx = NULL;
 *     if (sdrt_init(&cp, &ctx) != SDRT_OK) {
 *         fprintf(stderr, "%s\n", sdrt_last_error(NULL));   // init failures: the thread's last error
 *         return 1;
 *     }
 *     sdrt_gen_params gp = sdrt_gen_default_params();
 *     gp.prompt = "a red fox in the snow";
 *     gp.seed = 42;
 *     int w, h;
 *     sdrt_default_size(ctx, &w, &h);                       // or set gp.width / gp.height
 *     uint8_t *rgb = malloc((size_t)w * h * 3);             // gp.batch_count images: w * h * 3 bytes each
 *     if (sdrt_generate(ctx, &gp, rgb) != SDRT_OK)
 *         fprintf(stderr, "%s\n", sdrt_last_error(ctx));
 *     free(rgb);
 *     sdrt_free(ctx);
 *
 * Or let the library allocate: sdrt_generate_image(ctx, &gp, &img) ... sdrt_image_free(img).
 *
 * Thread safety: contexts are independent; different contexts may be used from different threads at once. Calls
 * on one context are serialised by a lock inside it (a second sdrt_generate on the same context waits for the
 * first). sdrt_request_cancel may be called from any thread at any time. sdrt_last_error(NULL) is per thread;
 * sdrt_last_error(ctx) is the context's, valid until the next call on that context. Callbacks run on the thread
 * that called sdrt_generate.
 *
 * Errors: every function that can fail returns an sdrt_status and sets a message that names the bad value and
 * the fix. No C++ exception crosses this API. Strings are UTF-8.
 *
 * ABI (SDRT_ABI_VERSION): the params structs grow without breaking hosts built against an older header. Each
 * starts with `size_t struct_size`, set by sdrt_*_default_params() to sizeof the struct the HOST was compiled with
 * (never set it by hand, never change it). The library reads only the fields that fit in struct_size and uses its
 * defaults for the rest; a struct larger than the library knows (a host built against a newer header, run on an
 * older libsdrt) is accepted when the fields the library does not know are all zero, and refused with
 * SDRT_ERR_UNSUPPORTED otherwise. Out-structs (sdrt_timings) carry struct_size too: set it, and the library writes
 * only what fits. The rule for adding a field:
 *   1. append it at the end of the struct, never insert, reorder, retype or remove fields;
 *   2. zero must mean "as before" (what a host that does not know the field gets), and the default the
 *      *_default_params() function sets must give the previous behaviour too;
 *   3. keep the struct free of tail padding (add an explicit `reserved` field), so each version's size is exact;
 *   4. bump SDRT_ABI_VERSION, append the new size to the library's table (api.cpp: kCtxSizes, kGenSizes,
 *      kTimingsSizes), copy the previous header to cpp/tests/abi/sdrt_v<old>.h and build a test host against it
 *      (as cpp/tests/abi/test_abi_v1.c does for ABI 1), so ctest keeps running the old layout on the new library.
 * ABI 4 appended sdrt_gen_params.loras / lora_count (run-time LoRAs), ABI 5 the SDXL micro-conditioning fields;
 * ABI 2, 3 and 4 hosts run unchanged.
 * Hosts built against ABI 1 (sdrt 0.1's header, structs without struct_size) still run: the library keeps ABI
 * 1's entry points under their old symbol names; this header's functions that take or fill a struct are the
 * *_v2 symbols (the macros below), so a host never needs to know.
 */
#ifndef SDRT_H
#define SDRT_H

#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32) && defined(SDRT_BUILD_SHARED)
#define SDRT_API __declspec(dllexport)
#elif defined(_WIN32) && defined(SDRT_SHARED)
#define SDRT_API __declspec(dllimport)
#elif defined(__GNUC__)
#define SDRT_API __attribute__((visibility("default")))
#else
#define SDRT_API
#endif

#ifdef __cplusplus
extern "C" {
#endif

#define SDRT_VERSION "0.2.0"
#define SDRT_ABI_VERSION 5

/* sdrt_gen_params.seed: pick a random seed (the default). Other negative seeds are refused, as Python's sdrt does. */
#define SDRT_SEED_RANDOM (-1)

typedef enum sdrt_status {
    SDRT_OK = 0,
    SDRT_ERR_INVALID_ARGUMENT = 1, /* a NULL pointer, a bad size, an out-of-range parameter */
    SDRT_ERR_MODEL = 2,            /* a missing, incomplete, damaged or mismatched export folder */
    SDRT_ERR_BACKEND = 3,          /* ONNX Runtime failed, or the networks produced NaN / an all-black image */
    SDRT_ERR_CANCELLED = 4,        /* the progress callback returned nonzero, or sdrt_request_cancel was called */
    SDRT_ERR_OUT_OF_MEMORY = 5,
    SDRT_ERR_UNSUPPORTED = 6,      /* a backend this build or this ONNX Runtime does not have */
    SDRT_ERR_INTERNAL = 7          /* a bug in sdrt: please report it with the message */
} sdrt_status;

typedef enum sdrt_backend {
    SDRT_BACKEND_AUTO = 0,         /* ONNX Runtime on CUDA when it has a usable GPU, else on the CPU */
    SDRT_BACKEND_ORT_CPU = 1,
    SDRT_BACKEND_ORT_CUDA = 2,     /* needs a GPU build of ONNX Runtime (onnxruntime-gpu) */
    SDRT_BACKEND_ORT_TENSORRT = 3, /* ONNX Runtime's TensorRT provider (then CUDA, then CPU) */
    SDRT_BACKEND_TENSORRT = 4      /* native TensorRT engines: not implemented in C++ yet (SDRT_ERR_UNSUPPORTED) */
} sdrt_backend;

/* Called after each denoising step (step = 1..total; total = UNet calls, n + 1 for pndm). Return nonzero to
 * cancel: sdrt_generate then returns SDRT_ERR_CANCELLED and writes no image. */
typedef int (*sdrt_progress_fn)(int step, int total, void *user);

typedef struct sdrt_ctx sdrt_ctx; /* opaque */

typedef struct sdrt_ctx_params {
    size_t struct_size;        /* sizeof(sdrt_ctx_params) as the host was built: set by sdrt_ctx_default_params() */
    const char *model_dir;     /* an sdrt export folder (with manifest.json); required */
    sdrt_backend backend;      /* default SDRT_BACKEND_AUTO */
    int n_threads;             /* ONNX Runtime intra-op threads; 0 (default): one per physical core */
    int device_id;             /* GPU for the CUDA / TensorRT providers; default 0 */
    sdrt_progress_fn progress; /* default NULL; can also be set later with sdrt_set_progress_callback */
    void *progress_user;
} sdrt_ctx_params;

/* A run-time LoRA for one call (sdrt_gen_params.loras), on an export made with `sdrt export --lora-slots all`
 * (or `attention`): the adapted layers compute W x + scale * up(down(x)) with the file's factors fed as inputs, so
 * the export's weights never change and a call without LoRAs gives the plain image, bit for bit. Files: .safetensors
 * in kohya's layout (LoCon convs included) or diffusers/PEFT's (and older diffusers'), in F32, F16, BF16 or F64; read
 * once per context and kept (read again when the file's size or time changes). LyCORIS LoHa/LoKr need the Python
 * runtime (it factorises them). Several LoRAs stack, as the Python runtime stacks them (pipe(..., loras={...})). */
typedef struct sdrt_lora {
    const char *path;            /* a LoRA .safetensors file (UTF-8 path) */
    double scale;                /* its strength, e.g. 0.8; 0 leaves it out; negative values are allowed */
} sdrt_lora;

typedef struct sdrt_gen_params {
    size_t struct_size;          /* sizeof(sdrt_gen_params) as the host was built: set by sdrt_gen_default_params() */
    const char *prompt;          /* required; "" is allowed */
    const char *negative_prompt; /* NULL or "": none - the empty prompt, or zeros for an SDXL model whose config sets
                                    force_zeros_for_empty_prompt (Python's negative_prompt=None); used only when
                                    guidance_scale > 1 */
    int steps;                   /* default 30 */
    double guidance_scale;       /* default 7.5; <= 1 turns guidance off (one UNet batch instead of two) */
    int width, height;           /* pixels, multiples of the model's size step; 0 (default): the model's size */
    int64_t seed;                /* >= 0: image k uses seed + k, the same image as Python's sdrt for that seed;
                                    SDRT_SEED_RANDOM (-1, default): a random seed in [0, 2^31), see sdrt_last_seed;
                                    other negative values: SDRT_ERR_INVALID_ARGUMENT. (Python's seeds 2^63..2^64-1
                                    give the image of seed % 2^32: torch seeds with the low 32 bits.) */
    const char *scheduler;       /* NULL (default): the export's own; or ddim, pndm, euler, euler_a, dpmpp_2m,
                                    dpmpp_2m_karras, lms, heun, unipc, dpmpp_2m_sde, dpmpp_2s_a, ddpm, lcm, tcd (and
                                    the _karras / _exponential names of runtime/schedulers' SCHEDULER_NAMES), or a
                                    diffusers class name (EulerDiscreteScheduler, ...) */
    int batch_count;             /* images to make, default 1 */
    const uint8_t *init_image;   /* img2img: RGB, width * height * 3 bytes, already at width x height (sdrt does
                                    not resize; the Python runtime resizes with Lanczos). NULL (default): txt2img */
    double strength;             /* img2img: how much to change the image, (0, 1]; default 0.8 */
    /* ABI 3: inpainting (as Python's mask_image; the export may be an ordinary or a dedicated inpainting model) */
    const uint8_t *mask_image;   /* with init_image: grey, width * height bytes, already at width x height; values
                                    >= 128 (50% grey) are repainted, the rest kept. NULL (default): no mask */
    int keep_unmasked;           /* nonzero: paste the result back, so pixels where the mask is < 128 are
                                    init_image's exactly (Python's keep_unmasked, without mask blur); default 0 */
    int reserved;                /* keep zero */
    /* ABI 4: run-time LoRAs */
    const sdrt_lora *loras;      /* lora_count run-time LoRAs (see sdrt_lora); NULL (default): none. An export without
                                    LoRA slots refuses them (SDRT_ERR_MODEL). A file for another model, or a damaged
                                    one, is refused with a message naming the file and the layer. */
    size_t lora_count;
    /* ABI 5: SDXL's micro-conditioning, as Python's original_size, crops_coords_top_left, target_size, their
       negative_* twins and the refiner's aesthetic_score / negative_aesthetic_score (runtime/sdxl.py). 0 (default)
       is "not given": diffusers' defaults - the sizes are the image's own, the crop corners (0, 0), the aesthetic
       scores 6.0 and 2.5 (so a score of exactly 0 cannot be asked for). Each size is given whole (both or neither).
       txt2img uses the negative sizes only when both negative_original and negative_target are given; img2img and
       inpainting default each negative size to its positive twin, as diffusers' pipelines do. An SD 1.x/2.x
       export refuses them (SDRT_ERR_INVALID_ARGUMENT). */
    int original_height, original_width;
    int crop_top, crop_left;
    int target_height, target_width;
    int negative_original_height, negative_original_width;
    int negative_crop_top, negative_crop_left;
    int negative_target_height, negative_target_width;
    double aesthetic_score;          /* the refiner's: 0 (default) = 6.0 */
    double negative_aesthetic_score; /* the refiner's: 0 (default) = 2.5 */
} sdrt_gen_params;

typedef struct sdrt_image {      /* allocated by sdrt_generate_image, freed by sdrt_image_free; fields may be appended */
    int width, height, count;    /* count images of width * height RGB pixels, one after another */
    uint8_t *data;
} sdrt_image;

typedef struct sdrt_timings {    /* seconds spent by the last successful sdrt_generate */
    size_t struct_size;          /* set it to sizeof(sdrt_timings) before sdrt_last_timings */
    double text, loop, decode, total;
} sdrt_timings;

/* ABI 2's entry points for the structs above (ABI 1's keep the plain names, for hosts built against sdrt 0.1). */
#define sdrt_init sdrt_init_v2
#define sdrt_generate sdrt_generate_v2
#define sdrt_generate_image sdrt_generate_image_v2
#define sdrt_last_timings sdrt_last_timings_v2
#define sdrt_last_seed sdrt_last_seed_v2

SDRT_API const char *sdrt_version(void);
SDRT_API int sdrt_abi_version(void); /* the library's SDRT_ABI_VERSION */

/* Fill *params with the defaults; struct_size is the host's sizeof (the inline functions below pass it). */
SDRT_API void sdrt_ctx_params_init(sdrt_ctx_params *params, size_t struct_size);
SDRT_API void sdrt_gen_params_init(sdrt_gen_params *params, size_t struct_size);

static inline sdrt_ctx_params sdrt_ctx_default_params(void) {
    sdrt_ctx_params p;
    sdrt_ctx_params_init(&p, sizeof p);
    return p;
}
static inline sdrt_gen_params sdrt_gen_default_params(void) {
    sdrt_gen_params p;
    sdrt_gen_params_init(&p, sizeof p);
    return p;
}

/* Loads the export (manifest checks, tokenizer, token table, one ONNX Runtime session per network). On failure
 * *out is set to NULL and sdrt_last_error(NULL) says why. */
SDRT_API sdrt_status sdrt_init(const sdrt_ctx_params *params, sdrt_ctx **out);
SDRT_API void sdrt_free(sdrt_ctx *ctx); /* NULL is fine */

/* Generates params->batch_count images into rgb_out: batch_count * height * width * 3 bytes, row-major RGB. */
SDRT_API sdrt_status sdrt_generate(sdrt_ctx *ctx, const sdrt_gen_params *params, uint8_t *rgb_out);
/* The same, into an image the library allocates; free it with sdrt_image_free. *out is NULL on failure. */
SDRT_API sdrt_status sdrt_generate_image(sdrt_ctx *ctx, const sdrt_gen_params *params, sdrt_image **out);
SDRT_API void sdrt_image_free(sdrt_image *image); /* NULL is fine */

/* The size used when gen params leave width/height 0, and the step sizes must be multiples of. */
SDRT_API sdrt_status sdrt_default_size(const sdrt_ctx *ctx, int *width, int *height);
SDRT_API int sdrt_size_step(const sdrt_ctx *ctx);

SDRT_API sdrt_status sdrt_set_progress_callback(sdrt_ctx *ctx, sdrt_progress_fn fn, void *user);
/* Asks a running sdrt_generate on ctx to stop (between steps, or inside a network run); it then returns
 * SDRT_ERR_CANCELLED. Safe from any thread; a request made while nothing runs is dropped. */
SDRT_API void sdrt_request_cancel(sdrt_ctx *ctx);

/* The seed of image 0 of the last successful generate; -1 if none (or ctx is NULL). */
SDRT_API int64_t sdrt_last_seed(const sdrt_ctx *ctx);
/* out->struct_size must be set (sizeof(sdrt_timings)); the library writes the fields that fit. */
SDRT_API sdrt_status sdrt_last_timings(const sdrt_ctx *ctx, sdrt_timings *out);
/* What runs the networks, e.g. "onnxruntime 1.32.0 on CPUExecutionProvider". Valid while ctx lives. */
SDRT_API const char *sdrt_backend_info(const sdrt_ctx *ctx);

/* The last error message: of ctx, or with ctx NULL, of this thread's last failed call without a context
 * (sdrt_init, or any call passed a NULL ctx). "" when there was none. */
SDRT_API const char *sdrt_last_error(const sdrt_ctx *ctx);
SDRT_API const char *sdrt_status_name(sdrt_status status); /* "SDRT_ERR_MODEL", ... */

#ifdef __cplusplus
}
#endif

#endif /* SDRT_H */
