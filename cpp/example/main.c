/* A C program over sdrt's C API: one image from an export, written as a binary PPM.
 *   sdrt-example EXPORT_DIR OUT.ppm ["prompt"]
 * Exit status 0 on success, 1 with sdrt's message on stderr otherwise. */
#include <stdio.h>
#include <stdlib.h>

#include <sdrt.h>

static int on_step(int step, int total, void *user) {
    (void)user;
    fprintf(stderr, "step %d/%d\n", step, total);
    return 0; /* nonzero would cancel */
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s EXPORT_DIR OUT.ppm [prompt]\n", argv[0]);
        return 2;
    }
    sdrt_ctx_params cp = sdrt_ctx_default_params();
    cp.model_dir = argv[1];
    cp.progress = on_step;
    sdrt_ctx *ctx = NULL;
    if (sdrt_init(&cp, &ctx) != SDRT_OK) {
        fprintf(stderr, "sdrt_init: %s\n", sdrt_last_error(NULL));
        return 1;
    }
    sdrt_gen_params gp = sdrt_gen_default_params();
    gp.prompt = argc > 3 ? argv[3] : "a photo of a cat";
    gp.steps = 10;
    gp.seed = 42;
    int w = 0, h = 0;
    sdrt_default_size(ctx, &w, &h);
    unsigned char *rgb = malloc((size_t)w * (size_t)h * 3);
    int rc = 1;
    sdrt_status st = rgb ? sdrt_generate(ctx, &gp, rgb) : SDRT_ERR_OUT_OF_MEMORY;
    if (st != SDRT_OK) {
        fprintf(stderr, "sdrt_generate: %s (%s)\n", sdrt_last_error(ctx), sdrt_status_name(st));
    } else {
        FILE *f = fopen(argv[2], "wb");
        if (f && fprintf(f, "P6\n%d %d\n255\n", w, h) > 0 && fwrite(rgb, 1, (size_t)w * h * 3, f) == (size_t)w * h * 3) rc = 0;
        if (f) fclose(f);
        printf("%s: %dx%d, seed %lld, %s\n", rc ? "could not write" : argv[2], w, h, (long long)sdrt_last_seed(ctx),
               sdrt_backend_info(ctx));
    }
    free(rgb);
    sdrt_free(ctx);
    return rc;
}
