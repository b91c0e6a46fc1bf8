/* A host built against ABI 1 (sdrt 0.1's header, cpp/tests/abi/sdrt_v1.h: structs without struct_size), run
 * against today's libsdrt: it must still work, with ABI 1's meanings (a negative seed is a random one).
 *   test_abi_v1 [EXPORT]     exit 0 pass, 1 fail, 77 skip (no export given) */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sdrt_v1.h" /* never edit: it is what 0.1 hosts were compiled with */

static int failures = 0;
#define EXPECT(cond, what)                                                          \
    do {                                                                            \
        if (!(cond)) {                                                              \
            fprintf(stderr, "FAIL %s:%d: %s (%s)\n", __FILE__, __LINE__, what, sdrt_last_error(NULL)); \
            ++failures;                                                             \
        }                                                                           \
    } while (0)

int main(int argc, char **argv) {
    sdrt_ctx_params cp = sdrt_ctx_default_params();
    EXPECT(cp.model_dir == NULL && cp.backend == SDRT_BACKEND_AUTO && cp.n_threads == 0, "ABI 1 ctx defaults");
    sdrt_ctx *ctx = NULL;
    EXPECT(sdrt_init(&cp, &ctx) == SDRT_ERR_INVALID_ARGUMENT && strstr(sdrt_last_error(NULL), "model_dir"), "NULL model_dir");
    sdrt_gen_params gp = sdrt_gen_default_params();
    EXPECT(gp.steps == 30 && gp.seed == -1 && gp.batch_count == 1 && gp.strength == 0.8, "ABI 1 gen defaults");
    EXPECT(sdrt_last_seed(NULL) == -1, "ABI 1 sdrt_last_seed: -1 when none");
    if (argc < 2) {
        const char *required = getenv("SDRT_REQUIRE_FIXTURES");
        printf("%s: no export given (pass an sdrt export folder)\n", required && *required && strcmp(required, "0") ? "FAIL" : "SKIP");
        return failures || (required && *required && strcmp(required, "0")) ? 1 : 77;
    }
    cp.model_dir = argv[1];
    cp.backend = SDRT_BACKEND_ORT_CPU;
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
    sdrt_image *img = NULL;
    EXPECT(sdrt_generate_image(ctx, &gp, &img) == SDRT_OK && img && img->width == w && memcmp(img->data, a, one) == 0,
           "generate_image: the same image");
    sdrt_image_free(img);
    gp.seed = -3; /* ABI 1: any negative seed asks for a random one */
    EXPECT(sdrt_generate(ctx, &gp, b) == SDRT_OK && sdrt_last_seed(ctx) >= 0 && sdrt_last_seed(ctx) < 2147483648LL, "random seed");
    sdrt_timings t;
    memset(&t, 0, sizeof t);
    EXPECT(sdrt_last_timings(ctx, &t) == SDRT_OK && t.total > 0 && t.total < 1e6, "ABI 1 timings");
    gp.steps = 0;
    EXPECT(sdrt_generate(ctx, &gp, b) == SDRT_ERR_INVALID_ARGUMENT && strstr(sdrt_last_error(ctx), "steps 0"), "bad steps");
    free(a);
    free(b);
    sdrt_free(ctx);
    printf("test_abi_v1: %s\n", failures ? "FAILED" : "ok");
    return failures ? 1 : 0;
}
