/* A host built against ABI 2 (sdrt 0.2's header, cpp/tests/abi/sdrt_v2.h: sdrt_gen_params before the inpainting
 * fields), run against today's libsdrt: its smaller struct_size must be accepted, the newer fields taking their
 * defaults (no mask), and img2img must give the same image as before.
 *   test_abi_v2 [EXPORT]     exit 0 pass, 1 fail, 77 skip (no export given) */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sdrt_v2.h" /* never edit: it is what 0.2 hosts were compiled with */

static int failures = 0;
#define EXPECT(cond, what)                                                          \
    do {                                                                            \
        if (!(cond)) {                                                              \
            fprintf(stderr, "FAIL %s:%d: %s (%s)\n", __FILE__, __LINE__, what, sdrt_last_error(NULL)); \
            ++failures;                                                             \
        }                                                                           \
    } while (0)

int main(int argc, char **argv) {
    sdrt_gen_params gp = sdrt_gen_default_params();
    EXPECT(gp.struct_size == sizeof gp && gp.steps == 30 && gp.strength == 0.8 && gp.init_image == NULL, "ABI 2 gen defaults");
    EXPECT(sdrt_abi_version() >= 3, "the library is newer than this header");
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
    unsigned char *init = malloc(one), *a = malloc(one), *b = malloc(one);
    for (size_t i = 0; i < one; ++i) init[i] = (unsigned char)(i * 7 % 251);
    gp.prompt = "a boat";
    gp.steps = 2;
    gp.seed = 7;
    EXPECT(sdrt_generate(ctx, &gp, a) == SDRT_OK, "txt2img through ABI 2's struct");
    gp.init_image = init;
    gp.strength = 1.0;
    gp.steps = 3;
    EXPECT(sdrt_generate(ctx, &gp, a) == SDRT_OK && sdrt_generate(ctx, &gp, b) == SDRT_OK && memcmp(a, b, one) == 0,
           "img2img through ABI 2's struct, reproducible");
    free(init);
    free(a);
    free(b);
    sdrt_free(ctx);
    printf("test_abi_v2: %s\n", failures ? "FAILED" : "ok");
    return failures ? 1 : 0;
}
