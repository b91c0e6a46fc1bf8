// sdrt-host: a command-line host over the C API (sdrt.h), the C++ twin of `sdrt generate`, with its flags.
//
//   sdrt-host "a red fox" --model exports/sd15-onnx --seed 42 -o fox.png
//   sdrt-host --model M --prompt "a watercolour fox" --image in.png --strength 0.6 -o out.png
//   sdrt-host --model M --prompt "a red hat" --image in.png --mask mask.png --keep-unmasked -o out.png
//   sdrt-host "a red fox" --model sdxl-base-onnx --refiner sdxl-refiner-onnx --refiner-start 0.8 -o fox.png
// With --num-images N, image k (seed + k) goes to out-<k+1>.png, as the Python CLI names them.
// Exit status: 0 done, 1 a failure while running (model, image file, backend), 2 a bad command line. Every error
// is one line naming the bad value and the fix; nothing aborts (main catches whatever is left).
#include <cctype>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

#include <dirent.h>
#include <sys/stat.h>

#include <algorithm>
#include <cerrno>

#include "image_io.h"
#include "sdrt.h"

namespace {

const char *kUsage =
    "usage: sdrt-host [PROMPT] --model DIR [options]       (the flags of `sdrt generate`)\n"
    "  PROMPT, -p, --prompt TEXT  what the image should show (required)\n"
    "  -m, --model DIR            an sdrt export folder (required)\n"
    "  -o, --output FILE|DIR/     PNG to write; with several images, -1, -2... is added; a folder gets numbered\n"
    "                             files NNNNN-sdrt.png (default sdrt.png)\n"
    "  -n, --negative-prompt TEXT what to steer away from (default: the empty prompt; also --negative)\n"
    "  --steps N                  denoising steps, 1-1000 (default 30)\n"
    "  -g, --guidance G           classifier-free guidance scale; <= 1 turns it off (default 7.5)\n"
    "  -s, --seed S               random seed, 0 to 2^64-1; image k uses S+k (default: random)\n"
    "  --scheduler NAME           ddim, pndm, euler, euler_a, dpmpp_2m, lms, heun, unipc, dpmpp_2m_sde, dpmpp_2s_a,\n"
    "                             ddpm, lcm, tcd, and _karras/_exponential variants such as dpmpp_2m_karras\n"
    "                             (default: the model's own)\n"
    "  -W, --width W, -H, --height H  image size, multiples of the model's size step (default: the model's size)\n"
    "  --image FILE               img2img init image (PNG or binary PPM) at the output size (sdrt does not resize)\n"
    "  --strength S               img2img: how much to change the image, (0, 1] (default 0.8)\n"
    "  --mask FILE                inpainting: a mask of --image's size; white (>= 50% grey) is repainted, black kept\n"
    "  --keep-unmasked            inpainting: paste the result back, so pixels outside the mask are kept exactly\n"
    "  --num-images N             images to make, 1-64 (default 1; also --batch)\n"
    "  --original-size WxH, --target-size WxH, --crop-top-left TOP,LEFT  SDXL's micro-conditioning (default: the\n"
    "                             image's size, 0,0); --negative-original-size, --negative-target-size,\n"
    "                             --negative-crop-top-left their twins for the unconditional pass\n"
    "  --aesthetic-score S, --negative-aesthetic-score S  an SDXL refiner's (default 6.0 and 2.5)\n"
    "  --refiner DIR              SDXL: a refiner export that finishes the base's latents (diffusers' ensemble of\n"
    "                             experts): the base runs up to --refiner-start of the schedule, the refiner the rest,\n"
    "                             with the same prompts, steps, scheduler, size and seeds (txt2img; --lora: the base's)\n"
    "  --refiner-start F          with --refiner: the fraction of the schedule the base runs, in (0, 1) (default 0.8)\n"
    "  --lora FILE[:SCALE]        a run-time LoRA (.safetensors; repeatable; scale default 1) on an export made with\n"
    "                             `sdrt export --lora-slots all`\n"
    "  --backend NAME             auto (= onnx), cpu, cuda, ort-tensorrt, tensorrt (default auto)\n"
    "  --ort-provider NAME        auto, cuda, tensorrt, cpu: ONNX Runtime's providers (as --backend onnx ... does)\n"
    "  --threads N                ONNX Runtime threads, 0-4096; 0: one per core (default)\n"
    "  -q, --quiet                no progress (--no-memory-check is accepted: sdrt-host has no memory check)\n";

struct Usage : std::runtime_error {  // a bad command line: exit status 2
    using std::runtime_error::runtime_error;
};

int progress(int step, int total, void *) {
    std::fprintf(stderr, "\rdenoising %d/%d", step, total);
    if (step == total) std::fprintf(stderr, "\n");
    return 0;
}

std::string to_string(__int128 v) {  // seeds go up to 2^64 - 1 + 63
    if (v == 0) return "0";
    bool neg = v < 0;
    unsigned __int128 u = neg ? -static_cast<unsigned __int128>(v) : static_cast<unsigned __int128>(v);
    std::string s;
    for (; u; u /= 10) s.insert(s.begin(), char('0' + int(u % 10)));
    return neg ? "-" + s : s;
}

// A decimal integer in [lo, hi], or a Usage error naming the flag, the value and the range.
__int128 parse_int(const std::string &flag, const std::string &text, __int128 lo, __int128 hi, const std::string &range) {
    size_t i = 0;
    bool neg = false;
    if (i < text.size() && (text[i] == '-' || text[i] == '+')) neg = text[i++] == '-';
    if (i == text.size() || text.size() - i > 40) throw Usage(flag + " " + text + " is not an integer; use " + range);
    __int128 v = 0;
    for (; i < text.size(); ++i) {
        if (text[i] < '0' || text[i] > '9') throw Usage(flag + " " + text + " is not an integer; use " + range);
        v = v * 10 + (text[i] - '0');
        if (v > (static_cast<__int128>(1) << 100)) break;  // far out of every range; stop before overflowing
    }
    if (neg) v = -v;
    if (v < lo || v > hi) throw Usage(flag + " " + text + " is out of range; use " + range);
    return v;
}

// SDXL's micro-conditioning pairs: "WxH" (a size; stored height first, as Python's (height, width)) or "TOP,LEFT".
void parse_pair(const std::string &flag, const std::string &text, bool size, int &first, int &second) {
    const size_t sep = text.find(size ? 'x' : ',');
    const std::string form = size ? "WIDTHxHEIGHT, e.g. 1024x1024" : "TOP,LEFT, e.g. 0,0";
    if (sep == std::string::npos) throw Usage(flag + " " + text + " is not " + form);
    const __int128 lo = size ? 1 : 0;
    const std::string range = size ? "sizes 1-65536 (" + form + ")" : "corners 0-65536 (" + form + ")";
    int a = 0, b = 0;
    try {
        a = int(parse_int(flag, text.substr(0, sep), lo, 65536, range)), b = int(parse_int(flag, text.substr(sep + 1), lo, 65536, range));
    } catch (const Usage &) {  // name the whole value, not the half that failed
        throw Usage(flag + " " + text + " is out of range or not two integers; use " + range);
    }
    if (size) first = b, second = a;  // height, width
    else first = a, second = b;       // top, left
}

double parse_double(const std::string &flag, const std::string &text, const std::string &range) {
    char *end = nullptr;
    double v = std::strtod(text.c_str(), &end);
    if (text.empty() || !end || *end != '\0' || !std::isfinite(v)) throw Usage(flag + " " + text + " is not a finite number; use " + range);
    return v;
}

bool is_dir(const std::string &p) {
    struct stat st;
    return ::stat(p.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

// The files `count` images go to, named as the Python CLI names them (sdrt.outputs.output_paths): a folder
// (existing, or ending in /) gets numbered files NNNNN-sdrt.png after the highest there; a file name gets -1, -2...
// with several images; no suffix (or a numeric one) gets .png. sdrt-host writes PNG only.
std::vector<std::string> output_paths(const std::string &out, int count) {
    std::vector<std::string> paths;
    if (is_dir(out) || out.back() == '/') {
        int highest = 0;
        if (DIR *d = opendir(out.c_str())) {
            while (dirent *e = readdir(d)) {
                const char *n = e->d_name;
                bool numbered = std::strlen(n) > 5 && n[5] == '-';
                for (int i = 0; i < 5 && numbered; ++i) numbered = std::isdigit(static_cast<unsigned char>(n[i]));
                if (numbered) highest = std::max(highest, std::atoi(std::string(n, 5).c_str()));
            }
            closedir(d);
        }
        std::string folder = out.back() == '/' ? out : out + "/";
        for (int k = 0; k < count; ++k) {
            char name[32];
            std::snprintf(name, sizeof name, "%05d-sdrt.png", highest + 1 + k);
            paths.push_back(folder + name);
        }
        return paths;
    }
    size_t slash = out.rfind('/'), name = slash == std::string::npos ? 0 : slash + 1;
    size_t dot = out.rfind('.');
    bool has_suffix = dot != std::string::npos && dot > name && dot + 1 < out.size();
    std::string suffix = has_suffix ? out.substr(dot) : "", path = out;
    for (auto &c : suffix) c = char(std::tolower(static_cast<unsigned char>(c)));
    if (suffix == ".jpg" || suffix == ".jpeg" || suffix == ".webp")
        throw Usage("-o " + out + ": sdrt-host writes PNG only; use a .png name (`sdrt generate` also writes .jpg and .webp)");
    if (suffix != ".png") {
        bool numeric = has_suffix && suffix.find_first_not_of("0123456789", 1) == std::string::npos;
        if (has_suffix && !numeric) throw Usage("-o " + out + " has suffix " + suffix + ", not an image type sdrt writes; use .png");
        path += ".png";
    }
    dot = path.size() - 4;
    for (int k = 0; k < count; ++k) paths.push_back(count == 1 ? path : path.substr(0, dot) + "-" + std::to_string(k + 1) + path.substr(dot));
    for (const auto &p : paths)
        if (is_dir(p)) throw Usage("-o " + p + " is a folder; pass a file name, or the folder itself to number files in it");
    return paths;
}

// Creates the folders above path (as the Python CLI does); "" on success, else the reason.
std::string make_parents(const std::string &path) {
    for (size_t at = path.find('/', 1); at != std::string::npos; at = path.find('/', at + 1)) {
        std::string dir = path.substr(0, at);
        if (::mkdir(dir.c_str(), 0777) != 0 && errno != EEXIST) return "cannot create folder " + dir + " (" + std::strerror(errno) + ")";
        if (!is_dir(dir)) return dir + " is a file, not a folder; choose another output path";
    }
    return "";
}

struct Options {
    std::string model, prompt, negative, scheduler, image_path, mask_path, refiner, out = "sdrt.png";
    double refiner_start = 0;  // 0: --refiner-start not given (0.8 with --refiner)
    bool have_prompt = false, quiet = false, have_seed = false, keep_unmasked = false;
    __int128 seed = 0;
    std::vector<std::string> paths;  // where the images go, worked out before the model loads
    std::vector<std::string> lora_files;
    std::vector<sdrt_lora> loras;  // paths point into lora_files
    std::string backend_flag;
    int provider = -1;  // --ort-provider, when given
    sdrt_ctx_params cp = sdrt_ctx_default_params();
    sdrt_gen_params gp = sdrt_gen_default_params();
};

// Parses argv; returns false for --help. Throws Usage for anything wrong.
bool parse(int argc, char **argv, Options &o) {
    const __int128 kSeedMax = (static_cast<__int128>(1) << 64) - 1;  // Python's sdrt: 0..2**64-batch
    for (int i = 1; i < argc; ++i) {
        std::string a = argv[i], v;
        if (a == "-h" || a == "--help") return false;
        if (a == "-q" || a == "--quiet") {
            o.quiet = true;
            continue;
        }
        if (a == "--no-memory-check") continue;  // sdrt-host has no memory check to turn off
        if (a == "--keep-unmasked") {
            o.keep_unmasked = true;
            continue;
        }
        if (a.empty() || a[0] != '-' || a == "-") {  // the prompt, as `sdrt generate PROMPT`
            if (o.have_prompt) throw Usage("a second prompt \"" + a + "\" was given; quote the prompt as one argument");
            o.prompt = a, o.have_prompt = true;
            continue;
        }
        size_t eq = a.find('=');
        if (a.rfind("--", 0) == 0 && eq != std::string::npos) {  // --flag=value
            v = a.substr(eq + 1), a = a.substr(0, eq);
        } else {
            if (i + 1 >= argc) throw Usage(a + " needs a value; see --help");
            v = argv[++i];
        }
        if (a == "--model" || a == "-m") o.model = v;
        else if (a == "--refiner") {
            if (v.empty()) throw Usage(a + " is empty; name an SDXL refiner export folder");
            o.refiner = v;
        } else if (a == "--refiner-start") {
            o.refiner_start = parse_double(a, v, "a fraction in (0, 1), e.g. 0.8");
            if (!(o.refiner_start > 0 && o.refiner_start < 1)) throw Usage(a + " " + v + " is outside (0, 1); use e.g. 0.8");
        }
        else if (a == "--prompt" || a == "-p") {
            if (o.have_prompt) throw Usage("a second prompt \"" + v + "\" was given; give the prompt once");
            o.prompt = v, o.have_prompt = true;
        } else if (a == "--negative-prompt" || a == "--negative" || a == "-n") o.negative = v;
        else if (a == "--scheduler") o.scheduler = v;
        else if (a == "--image") o.image_path = v;
        else if (a == "--mask") o.mask_path = v;
        else if (a == "-o" || a == "--output") {
            if (v.empty()) throw Usage(a + " is empty; name the PNG to write");
            o.out = v;
        } else if (a == "--steps") o.gp.steps = int(parse_int(a, v, 1, 1000, "1-1000"));
        else if (a == "--guidance" || a == "-g") {
            o.gp.guidance_scale = parse_double(a, v, "0-1 for no guidance, or e.g. 7.5");
            if (o.gp.guidance_scale < 0) throw Usage(a + " " + v + " is negative; use 0-1 for no guidance, or e.g. 7.5");
        } else if (a == "--seed" || a == "-s") {
            o.seed = parse_int(a, v, 0, kSeedMax, "0-18446744073709551615 (omit --seed for a random one)");
            o.have_seed = true;
        } else if (a == "--width" || a == "-W") o.gp.width = int(parse_int(a, v, 1, 65536, "1-65536, a multiple of the model's size step"));
        else if (a == "--height" || a == "-H") o.gp.height = int(parse_int(a, v, 1, 65536, "1-65536, a multiple of the model's size step"));
        else if (a == "--strength") {
            o.gp.strength = parse_double(a, v, "a number in (0, 1]");
            if (!(o.gp.strength > 0 && o.gp.strength <= 1)) throw Usage(a + " " + v + " is outside (0, 1]; 0.3 keeps most of the image, 1.0 replaces it");
        } else if (a == "--num-images" || a == "--batch") o.gp.batch_count = int(parse_int(a, v, 1, 64, "1-64"));
        else if (a == "--threads") o.cp.n_threads = int(parse_int(a, v, 0, 4096, "0-4096 (0: one per core)"));
        else if (a == "--ort-provider") {  // the Python CLI's spelling: ONNX Runtime's providers
            if (v == "auto") o.provider = SDRT_BACKEND_AUTO;
            else if (v == "cpu") o.provider = SDRT_BACKEND_ORT_CPU;
            else if (v == "cuda") o.provider = SDRT_BACKEND_ORT_CUDA;
            else if (v == "tensorrt") o.provider = SDRT_BACKEND_ORT_TENSORRT;
            else throw Usage("--ort-provider " + v + " is not a provider; use auto, cuda, tensorrt or cpu");
        } else if (a == "--backend") {
            o.backend_flag = v;
            if (v == "auto" || v == "onnx") o.cp.backend = SDRT_BACKEND_AUTO;  // Python's onnx: ONNX Runtime, best provider
            else if (v == "cpu") o.cp.backend = SDRT_BACKEND_ORT_CPU;
            else if (v == "cuda") o.cp.backend = SDRT_BACKEND_ORT_CUDA;
            else if (v == "ort-tensorrt") o.cp.backend = SDRT_BACKEND_ORT_TENSORRT;
            else if (v == "tensorrt") o.cp.backend = SDRT_BACKEND_TENSORRT;
            else if (v == "torch") throw Usage("--backend torch is the Python runtime's; sdrt-host runs ONNX Runtime: use auto, cpu, cuda or ort-tensorrt");
            else throw Usage("--backend " + v + " is not a backend; use auto, onnx, cpu, cuda, ort-tensorrt or tensorrt");
        } else if (a == "--max-memory") {
            throw Usage("--max-memory is not supported by sdrt-host (it has no memory budget check); use `sdrt generate`");
        } else if (a == "--lora") {  // FILE[:SCALE], as the Python CLI's parse_lora_spec: a colon not before a number stays in the name
            size_t colon = v.rfind(':');
            double scale = 1.0;
            std::string file = v;
            if (colon != std::string::npos) {
                char *end = nullptr;
                const std::string tail = v.substr(colon + 1);
                double x = std::strtod(tail.c_str(), &end);
                if (!tail.empty() && end && *end == '\0') {
                    if (!std::isfinite(x)) throw Usage("--lora " + v + ": the scale " + tail + " is not a finite number; use e.g. 0.8");
                    file = v.substr(0, colon), scale = x;
                }
            }
            if (file.empty()) throw Usage("--lora " + v + " names no file; use --lora FILE[:SCALE]");
            o.lora_files.push_back(file);
            o.loras.push_back({nullptr, scale});
        } else if (a == "--original-size") parse_pair(a, v, true, o.gp.original_height, o.gp.original_width);
        else if (a == "--target-size") parse_pair(a, v, true, o.gp.target_height, o.gp.target_width);
        else if (a == "--crop-top-left") parse_pair(a, v, false, o.gp.crop_top, o.gp.crop_left);
        else if (a == "--negative-original-size") parse_pair(a, v, true, o.gp.negative_original_height, o.gp.negative_original_width);
        else if (a == "--negative-target-size") parse_pair(a, v, true, o.gp.negative_target_height, o.gp.negative_target_width);
        else if (a == "--negative-crop-top-left") parse_pair(a, v, false, o.gp.negative_crop_top, o.gp.negative_crop_left);
        else if (a == "--aesthetic-score" || a == "--negative-aesthetic-score") {
            double s = parse_double(a, v, "e.g. 6.0 (negative: 2.5)");
            if (s == 0) throw Usage(a + " 0 cannot be asked for (0 means the default); use e.g. 0.01");
            (a == "--aesthetic-score" ? o.gp.aesthetic_score : o.gp.negative_aesthetic_score) = s;
        } else if (a == "--embedding") {
            throw Usage(a + " is not supported by sdrt-host; use `sdrt generate`");
        } else {
            throw Usage("unknown option " + a + "; see --help");
        }
    }
    if (o.model.empty()) throw Usage("--model is required: an sdrt export folder (made with `sdrt export`)");
    if (!o.mask_path.empty() && o.image_path.empty()) throw Usage("--mask needs --image, the image it masks");
    if (o.keep_unmasked && o.mask_path.empty()) throw Usage("--keep-unmasked applies to inpainting: add --mask FILE");
    if (o.refiner_start != 0 && o.refiner.empty()) throw Usage("--refiner-start needs --refiner DIR, the refiner that takes over");
    if (!o.refiner.empty() && !o.image_path.empty())
        throw Usage("--refiner hands a txt2img run's latents to the refiner; drop --image (and --mask), or --refiner");
    if (!o.refiner.empty() && o.refiner_start == 0) o.refiner_start = 0.8;
    o.paths = output_paths(o.out, o.gp.batch_count);
    for (size_t k = 0; k < o.loras.size(); ++k) o.loras[k].path = o.lora_files[k].c_str();
    o.gp.loras = o.loras.empty() ? nullptr : o.loras.data();
    o.gp.lora_count = o.loras.size();
    if (o.provider >= 0) {
        if (!o.backend_flag.empty() && o.backend_flag != "onnx" && o.backend_flag != "auto")
            throw Usage("--ort-provider chooses ONNX Runtime's providers; it cannot go with --backend " + o.backend_flag +
                        " (use --backend onnx, or --backend alone)");
        o.cp.backend = static_cast<sdrt_backend>(o.provider);
    }
    if (!o.have_prompt) throw Usage("a prompt is required: sdrt-host \"a red fox\" --model DIR");
    if (o.have_seed && o.seed + o.gp.batch_count - 1 > kSeedMax)
        throw Usage("--seed " + to_string(o.seed) + " with " + std::to_string(o.gp.batch_count) + " images runs past 2^64 - 1 (image k "
                    "uses seed + k); use at most " + to_string(kSeedMax - o.gp.batch_count + 1));
    if (o.have_seed) {
        // The noise depends on the seed modulo 2^32 only (torch seeds its mt19937 with the low 32 bits), so the
        // library (int64 seeds) gets that; the images are labelled with the seed as given.
        o.gp.seed = int64_t(o.seed % (static_cast<__int128>(1) << 32));
    }
    return true;
}

// --refiner: the base up to --refiner-start (its latents), then the refiner from there (sdrt.h's ABI 6 hand-over),
// as the Python CLI's `sdrt generate --refiner` runs them. The refiner gets the base's size and no LoRAs.
sdrt_status with_refiner(const Options &o, sdrt_ctx *base, sdrt_ctx *refiner, sdrt_image **img) {
    sdrt_gen_params gp = o.gp;
    int w = 0, h = 0, shape[3] = {0, 0, 0};
    sdrt_default_size(base, &w, &h);
    gp.width = gp.width ? gp.width : w, gp.height = gp.height ? gp.height : h;  // the refiner's default may differ
    sdrt_status st = sdrt_latent_shape(base, gp.width, gp.height, shape);
    if (st != SDRT_OK) return st;
    std::vector<float> latents(size_t(gp.batch_count) * size_t(shape[0]) * size_t(shape[1]) * size_t(shape[2]));
    gp.denoising_end = o.refiner_start;
    if ((st = sdrt_generate_latents(base, &gp, latents.data())) != SDRT_OK) return st;
    gp.denoising_end = 0, gp.denoising_start = o.refiner_start, gp.init_latents = latents.data();
    gp.loras = nullptr, gp.lora_count = 0;
    return sdrt_generate_image(refiner, &gp, img);
}

int run(int argc, char **argv) {
    Options o;
    try {
        if (!parse(argc, argv, o)) {
            std::fputs(kUsage, stdout);
            return 0;
        }
    } catch (const Usage &e) {
        std::fprintf(stderr, "sdrt-host: %s\n", e.what());
        return 2;
    }

    for (const auto &path : o.paths) {  // the output folders, before the model loads: a bad -o fails fast
        std::string err = make_parents(path);
        if (!err.empty()) {
            std::fprintf(stderr, "sdrt-host: -o %s: %s\n", o.out.c_str(), err.c_str());
            return 1;
        }
    }
    sdrt_tools::Rgb init;  // read before the model loads: a bad file fails fast
    if (!o.image_path.empty()) {
        std::string err = sdrt_tools::read_image(o.image_path, init);
        if (!err.empty()) {
            std::fprintf(stderr, "sdrt-host: --image %s\n", err.c_str());
            return 1;
        }
    }

    std::vector<uint8_t> mask;  // grey: the luma of the file's RGB (PIL's "L"; alpha is composited on white)
    if (!o.mask_path.empty()) {
        sdrt_tools::Rgb m;
        std::string err = sdrt_tools::read_image(o.mask_path, m);
        if (err.empty() && (m.width != init.width || m.height != init.height))
            err = o.mask_path + " is " + std::to_string(m.width) + "x" + std::to_string(m.height) + " but --image is " +
                  std::to_string(init.width) + "x" + std::to_string(init.height) + "; pass a mask of the image's size";
        if (!err.empty()) {
            std::fprintf(stderr, "sdrt-host: --mask %s\n", err.c_str());
            return 1;
        }
        for (size_t p = 0; p < m.data.size() / 3; ++p)
            mask.push_back(uint8_t((m.data[3 * p] * 299 + m.data[3 * p + 1] * 587 + m.data[3 * p + 2] * 114 + 500) / 1000));
    }

    auto t0 = std::chrono::steady_clock::now();
    o.cp.model_dir = o.model.c_str();
    if (!o.quiet) o.cp.progress = progress;
    sdrt_ctx *ctx = nullptr;
    if (sdrt_init(&o.cp, &ctx) != SDRT_OK) {
        std::fprintf(stderr, "sdrt-host: %s\n", sdrt_last_error(nullptr));
        return 1;
    }
    sdrt_ctx *refiner = nullptr;  // --refiner: the context that finishes the image (loaded now: a bad folder fails fast)
    if (!o.refiner.empty()) {
        sdrt_ctx_params cp = o.cp;
        cp.model_dir = o.refiner.c_str();
        if (sdrt_init(&cp, &refiner) != SDRT_OK) {
            std::fprintf(stderr, "sdrt-host: --refiner %s\n", sdrt_last_error(nullptr));
            sdrt_free(ctx);
            return 1;
        }
    }
    double load_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    sdrt_gen_params &gp = o.gp;
    if (!o.image_path.empty()) {
        int default_w = 0, default_h = 0;
        sdrt_default_size(ctx, &default_w, &default_h);
        if (gp.width == 0 && gp.height == 0) gp.width = init.width, gp.height = init.height;
        if (gp.width == 0) gp.width = default_w;  // only --height was given
        if (gp.height == 0) gp.height = default_h;
        if (gp.width != init.width || gp.height != init.height) {
            std::fprintf(stderr, "sdrt-host: --image %s is %dx%d but the output is %dx%d; resize it to the output size first "
                                 "(sdrt-host does not resize)\n", o.image_path.c_str(), init.width, init.height, gp.width, gp.height);
            sdrt_free(ctx);
            return 1;
        }
        gp.init_image = init.data.data();
        if (!mask.empty()) gp.mask_image = mask.data(), gp.keep_unmasked = o.keep_unmasked;
    }
    gp.prompt = o.prompt.c_str();
    gp.negative_prompt = o.negative.c_str();
    gp.scheduler = o.scheduler.empty() ? nullptr : o.scheduler.c_str();

    sdrt_image *img = nullptr;
    std::string refiner_note;
    sdrt_status st = refiner ? with_refiner(o, ctx, refiner, &img) : sdrt_generate_image(ctx, &gp, &img);
    if (st != SDRT_OK) {
        const bool in_refiner = refiner && *sdrt_last_error(refiner);  // the base failed when the refiner has no error
        std::fprintf(stderr, "sdrt-host: %s%s (%s)\n", in_refiner ? "refiner: " : "", sdrt_last_error(in_refiner ? refiner : ctx),
                     sdrt_status_name(st));
        sdrt_free(refiner);
        sdrt_free(ctx);
        return 1;
    }
    if (refiner) {
        char start[32];
        std::snprintf(start, sizeof start, "%g", o.refiner_start);
        refiner_note = ", Refiner: " + o.refiner.substr(o.refiner.find_last_of('/', o.refiner.size() - 2) + 1) + ", Refiner switch at: " + start;
    }
    int rc = 0;
    const __int128 seed = o.have_seed ? o.seed : sdrt_last_seed(ctx);
    const size_t image_bytes = size_t(img->width) * size_t(img->height) * 3;
    char cfg[32];
    std::snprintf(cfg, sizeof cfg, "%g", gp.guidance_scale);
    for (int k = 0; k < img->count; ++k) {
        const std::string &path = o.paths[size_t(k)];
        std::string params = o.prompt + (o.negative.empty() ? "" : "\nNegative prompt: " + o.negative) + "\nSteps: " +
                             std::to_string(gp.steps) + ", CFG scale: " + cfg + ", Seed: " + to_string(seed + k) + ", Size: " +
                             std::to_string(img->width) + "x" + std::to_string(img->height) +
                             (o.scheduler.empty() ? "" : ", Sampler: " + o.scheduler) +
                             (gp.init_image ? ", Denoising strength: " + std::to_string(gp.strength) : "") + refiner_note + ", Version: sdrt " +
                             sdrt_version() + " (C++)";
        std::string err = sdrt_tools::write_png(path, img->data + size_t(k) * image_bytes, img->width, img->height, {{"parameters", params}});
        if (!err.empty()) {
            std::fprintf(stderr, "sdrt-host: %s; check that the folder is writable\n", err.c_str());
            rc = 1;
        } else if (k == 0) {  // as the Python CLI says it
            std::printf("%s  (seed %s)\n", path.c_str(), to_string(seed).c_str());
        } else {
            std::printf("%s  (seed %s: image %d of the batch from seed %s)\n", path.c_str(), to_string(seed + k).c_str(), k + 1,
                        to_string(seed).c_str());
        }
    }
    sdrt_timings t;
    t.struct_size = sizeof t;
    if (!o.quiet && sdrt_last_timings(refiner ? refiner : ctx, &t) == SDRT_OK)
        std::fprintf(stderr, "%s%s: load %.2f s, text %.2f s, loop %.2f s, decode %.2f s, total %.2f s\n", refiner ? "refiner on " : "",
                     sdrt_backend_info(ctx), load_s, t.text, t.loop, t.decode, t.total);
    sdrt_image_free(img);
    sdrt_free(refiner);
    sdrt_free(ctx);
    return rc;
}

}  // namespace

int main(int argc, char **argv) {
    try {
        return run(argc, argv);
    } catch (const std::bad_alloc &) {
        std::fprintf(stderr, "sdrt-host: out of memory; use a smaller image size or --num-images\n");
    } catch (const std::exception &e) {
        std::fprintf(stderr, "sdrt-host: internal error: %s; please report it\n", e.what());
    } catch (...) {
        std::fprintf(stderr, "sdrt-host: internal error (an unknown exception); please report it\n");
    }
    return 1;
}
