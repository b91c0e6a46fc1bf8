/* A host built against ABI 5 (cpp/tests/abi/sdrt_v5.h: sdrt_gen_params with SDXL's micro-conditioning fields, without the
 * base + refiner hand-over's denoising_start / denoising_end / init_latents), run against today's libsdrt: its smaller structs are accepted and generate as before.
 *   test_abi_v5 [EXPORT]     exit 0 pass, 1 fail, 77 skip (no export given) */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sdrt_v5.h" /* never edit: it is what ABI 5 hosts were compiled with */

static int failures = 0;
#define EXPECT(cond, what)                                                                              \
    do {                                                                                                \
        if (!(cond)) {                                                                                  \
            fprintf(stderr, "FAIL %s:%d: %s (%s)\n", __FILE__, __LINE__, what, sdrt_last_error(NULL)); \
            ++failures;                                                                                 \
        }                                                                                               \
    } while (0)

int main(int argc, char **argv) {
    EXPECT(sdrt_abi_version() >= 6, "a newer library");
    sdrt_gen_params gp = sdrt_gen_default_params();
    EXPECT(gp.struct_size == sizeof gp && gp.steps == 30 && gp.seed == SDRT_SEED_RANDOM, "ABI 5 gen defaults");
    if (argc < 2) {
        const char *required = getenv("SDRT_REQUIRE_FIXTURES");
        printf("%s: no export given (pass an sdrt export folder)\n", required && *required && strcmp(required, "0") ? "FAIL" : "SKIP");
        return failures || (required && *required && strcmp(required, "0")) ? 1 : 77;
    }
    sdrt_ctx_params cp = sdrt_ctx_default_params();
    cp.model_dir = argv[1];
    cp.backend = SDRT_BACKEND_ORT_CPU;
    sdrt_ctx *ctx = NULL;
    EXPECT(sdrt_init(&cp, &ctx) == SDRT_OK && ctx, "init");
    if (!ctx) return 1;
    int w = 0, h = 0;
    sdrt_default_size(ctx, &w, &h);
    size_t one = (size_t)w * (size_t)h * 3;
    unsigned char *a = malloc(one), *b = malloc(one);
    gp.prompt = "a boat";
    gp.steps = 2;
    gp.seed = 7;
    EXPECT(sdrt_generate(ctx, &gp, a) == SDRT_OK && sdrt_last_seed(ctx) == 7, "generate, seed 7");
    EXPECT(sdrt_generate(ctx, &gp, b) == SDRT_OK && memcmp(a, b, one) == 0, "the same image again");
    gp.steps = 0;
    EXPECT(sdrt_generate(ctx, &gp, b) == SDRT_ERR_INVALID_ARGUMENT && strstr(sdrt_last_error(ctx), "steps 0"), "bad steps");
    free(a);
    free(b);
    sdrt_free(ctx);
    printf("test_abi_v5: %s\n", failures ? "FAILED" : "ok");
    return failures ? 1 : 0;
}
