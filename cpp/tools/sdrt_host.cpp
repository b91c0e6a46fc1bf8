// sdrt-host: a command-line host over the C API (sdrt.h), the C++ twin of `sdrt generate`.
//
//   sdrt-host --model exports/sd15-onnx --prompt "a red fox" --seed 42 -o fox.png
//   sdrt-host --model M --prompt "a watercolour fox" --image in.png --strength 0.6 -o out.png
// With --batch N, image k (seed + k) goes to out-<k+1>.png, as the Python CLI names them.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "image_io.h"
#include "sdrt.h"

namespace {

const char *kUsage =
    "usage: sdrt-host --model DIR --prompt TEXT [options] -o OUT.png\n"
    "  --negative TEXT       what to steer away from (default: the empty prompt)\n"
    "  --steps N             denoising steps (default 30)\n"
    "  --guidance G          classifier-free guidance scale; <= 1 turns it off (default 7.5)\n"
    "  --seed S              random seed; image k uses S+k (default: random)\n"
    "  --scheduler NAME      ddim, pndm, euler, euler_a, dpmpp_2m, dpmpp_2m_karras (default: the model's own)\n"
    "  --width W --height H  image size, multiples of the model's size step (default: the model's size)\n"
    "  --image FILE          img2img init image (PNG or binary PPM) at the output size (sdrt does not resize)\n"
    "  --strength S          img2img: how much to change the image, (0, 1] (default 0.8)\n"
    "  --batch N             images to make (default 1)\n"
    "  --backend NAME        auto, cpu, cuda, ort-tensorrt, tensorrt (default auto)\n"
    "  --threads N           ONNX Runtime threads (default: one per core)\n"
    "  -q, --quiet           no progress\n";

int progress(int step, int total, void *) {
    std::fprintf(stderr, "\rdenoising %d/%d", step, total);
    if (step == total) std::fprintf(stderr, "\n");
    return 0;
}

std::string output_path(const std::string &out, int k, int count) {
    if (count == 1) return out;
    size_t dot = out.rfind('.'), slash = out.rfind('/');
    if (dot == std::string::npos || (slash != std::string::npos && dot < slash)) dot = out.size();
    return out.substr(0, dot) + "-" + std::to_string(k + 1) + out.substr(dot);
}

bool parse_int(const char *s, long long &v) {
    char *end = nullptr;
    v = std::strtoll(s, &end, 10);
    return end && *end == '\0' && end != s;
}

bool parse_double(const char *s, double &v) {
    char *end = nullptr;
    v = std::strtod(s, &end);
    return end && *end == '\0' && end != s;
}

}  // namespace

int main(int argc, char **argv) {
    sdrt_ctx_params cp = sdrt_ctx_default_params();
    sdrt_gen_params gp = sdrt_gen_default_params();
    std::string model, prompt, negative, scheduler, image_path, out;
    bool have_prompt = false, quiet = false;
    for (int i = 1; i < argc; ++i) {
        std::string a = argv[i];
        if (a == "-h" || a == "--help") {
            std::fputs(kUsage, stdout);
            return 0;
        }
        if (a == "-q" || a == "--quiet") {
            quiet = true;
            continue;
        }
        if (i + 1 >= argc) {
            std::fprintf(stderr, "sdrt-host: %s needs a value\n%s", a.c_str(), kUsage);
            return 2;
        }
        const char *v = argv[++i];
        long long n = 0;
        double d = 0;
        bool ok = true;
        if (a == "--model" || a == "-m") model = v;
        else if (a == "--prompt" || a == "-p") prompt = v, have_prompt = true;
        else if (a == "--negative" || a == "-n") negative = v;
        else if (a == "--scheduler") scheduler = v;
        else if (a == "--image") image_path = v;
        else if (a == "-o" || a == "--output") out = v;
        else if (a == "--steps") ok = parse_int(v, n), gp.steps = int(n);
        else if (a == "--guidance" || a == "-g") ok = parse_double(v, gp.guidance_scale);
        else if (a == "--seed" || a == "-s") ok = parse_int(v, n), gp.seed = n;
        else if (a == "--width" || a == "-W") ok = parse_int(v, n), gp.width = int(n);
        else if (a == "--height" || a == "-H") ok = parse_int(v, n), gp.height = int(n);
        else if (a == "--strength") ok = parse_double(v, d), gp.strength = d;
        else if (a == "--batch") ok = parse_int(v, n), gp.batch_count = int(n);
        else if (a == "--threads") ok = parse_int(v, n), cp.n_threads = int(n);
        else if (a == "--backend") {
            std::string b = v;
            ok = b == "auto" || b == "cpu" || b == "cuda" || b == "ort-tensorrt" || b == "tensorrt";
            cp.backend = b == "cpu" ? SDRT_BACKEND_ORT_CPU : b == "cuda" ? SDRT_BACKEND_ORT_CUDA
                       : b == "ort-tensorrt" ? SDRT_BACKEND_ORT_TENSORRT : b == "tensorrt" ? SDRT_BACKEND_TENSORRT : SDRT_BACKEND_AUTO;
        } else {
            std::fprintf(stderr, "sdrt-host: unknown option %s\n%s", a.c_str(), kUsage);
            return 2;
        }
        if (!ok) {
            std::fprintf(stderr, "sdrt-host: %s %s is not a valid value\n", a.c_str(), v);
            return 2;
        }
    }
    if (model.empty() || !have_prompt || out.empty()) {
        std::fprintf(stderr, "sdrt-host: --model, --prompt and -o are required\n%s", kUsage);
        return 2;
    }

    auto t0 = std::chrono::steady_clock::now();
    cp.model_dir = model.c_str();
    if (!quiet) cp.progress = progress;
    sdrt_ctx *ctx = nullptr;
    if (sdrt_init(&cp, &ctx) != SDRT_OK) {
        std::fprintf(stderr, "sdrt-host: %s\n", sdrt_last_error(nullptr));
        return 1;
    }
    double load_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

    sdrt_tools::Rgb init;
    if (!image_path.empty()) {
        std::string err = sdrt_tools::read_image(image_path, init);
        if (!err.empty()) {
            std::fprintf(stderr, "sdrt-host: init image %s\n", err.c_str());
            sdrt_free(ctx);
            return 1;
        }
        if (gp.width == 0 && gp.height == 0) gp.width = init.width, gp.height = init.height;
        if (gp.width != init.width || gp.height != init.height) {
            std::fprintf(stderr, "sdrt-host: init image %s is %dx%d but the output is %dx%d; resize it to the output size first "
                                 "(sdrt-host does not resize)\n", image_path.c_str(), init.width, init.height, gp.width, gp.height);
            sdrt_free(ctx);
            return 1;
        }
        gp.init_image = init.data.data();
    }
    gp.prompt = prompt.c_str();
    gp.negative_prompt = negative.c_str();
    gp.scheduler = scheduler.empty() ? nullptr : scheduler.c_str();

    sdrt_image *img = nullptr;
    sdrt_status st = sdrt_generate_image(ctx, &gp, &img);
    if (st != SDRT_OK) {
        std::fprintf(stderr, "sdrt-host: %s (%s)\n", sdrt_last_error(ctx), sdrt_status_name(st));
        sdrt_free(ctx);
        return 1;
    }
    int rc = 0;
    const int64_t seed = sdrt_last_seed(ctx);
    const size_t image_bytes = size_t(img->width) * size_t(img->height) * 3;
    char cfg[32];
    std::snprintf(cfg, sizeof cfg, "%g", gp.guidance_scale);
    for (int k = 0; k < img->count; ++k) {
        std::string path = output_path(out, k, img->count);
        std::string params = prompt + (negative.empty() ? "" : "\nNegative prompt: " + negative) + "\nSteps: " +
                             std::to_string(gp.steps) + ", CFG scale: " + cfg + ", Seed: " +
                             std::to_string(seed + k) + ", Size: " + std::to_string(img->width) + "x" + std::to_string(img->height) +
                             (scheduler.empty() ? "" : ", Sampler: " + scheduler) +
                             (gp.init_image ? ", Denoising strength: " + std::to_string(gp.strength) : "") + ", Version: sdrt " +
                             sdrt_version() + " (C++)";
        std::string err = sdrt_tools::write_png(path, img->data + size_t(k) * image_bytes, img->width, img->height, {{"parameters", params}});
        if (!err.empty()) {
            std::fprintf(stderr, "sdrt-host: %s\n", err.c_str());
            rc = 1;
        } else {
            std::printf("%s  (seed %lld)\n", path.c_str(), static_cast<long long>(seed + k));
        }
    }
    sdrt_timings t;
    if (!quiet && sdrt_last_timings(ctx, &t) == SDRT_OK)
        std::fprintf(stderr, "%s: load %.2f s, text %.2f s, loop %.2f s, decode %.2f s, total %.2f s\n", sdrt_backend_info(ctx),
                     load_s, t.text, t.loop, t.decode, t.total);
    sdrt_image_free(img);
    sdrt_free(ctx);
    return rc;
}
