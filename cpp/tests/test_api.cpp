// The C API under bad input: NULL pointers, missing / damaged / mismatched exports, bad sizes and parameters,
// unknown schedulers and backends, a damaged graph cache, cancellation (callback and another thread) - each a status and a message,
// never a crash - plus seeds (same seed, same image; image k of a batch = seed + k) and two contexts at once.
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "check.h"
#include "sdrt.h"

namespace fs = std::filesystem;

namespace {

bool has(const char *text, const char *part) { return text && std::strstr(text, part) != nullptr; }

std::string tmpdir() {
    char tmpl[] = "/tmp/sdrt-test-XXXXXX";
    return mkdtemp(tmpl) ? tmpl : "/tmp";
}

sdrt_status init_at(const std::string &dir, sdrt_ctx **ctx, sdrt_backend backend = SDRT_BACKEND_ORT_CPU) {
    sdrt_ctx_params cp = sdrt_ctx_default_params();
    cp.model_dir = dir.c_str();
    cp.backend = backend;
    return sdrt_init(&cp, ctx);
}

// A copy of the export with one thing changed; sdrt_init must refuse it with SDRT_ERR_MODEL and say `hint`.
void broken_export(const std::string &src, const std::string &root, const char *name, void (*breaker)(const fs::path &), const char *hint) {
    fs::path dst = fs::path(root) / name;
    fs::copy(src, dst, fs::copy_options::recursive);
    fs::remove_all(dst / ".ort_cache");
    breaker(dst);
    sdrt_ctx *ctx = reinterpret_cast<sdrt_ctx *>(1);
    sdrt_status st = init_at(dst.string(), &ctx);
    CHECK(st == SDRT_ERR_MODEL && ctx == nullptr, std::string(name) + ": status " + sdrt_status_name(st));
    CHECK(has(sdrt_last_error(nullptr), hint), std::string(name) + ": message \"" + sdrt_last_error(nullptr) + "\" lacks \"" + hint + "\"");
}

std::string read_text(const fs::path &p) {
    std::ifstream f(p);
    return std::string((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}
void write_text(const fs::path &p, const std::string &s) { std::ofstream(p, std::ios::binary | std::ios::trunc) << s; }
void replace_in(const fs::path &p, const std::string &from, const std::string &to) {
    std::string s = read_text(p);
    size_t at = s.find(from);
    if (at != std::string::npos) s.replace(at, from.size(), to);
    write_text(p, s);
}
void overwrite_start(const fs::path &p, const std::string &bytes) {
    std::fstream f(p, std::ios::in | std::ios::out | std::ios::binary);
    f.write(bytes.data(), std::streamsize(bytes.size()));
}

struct Canceller {
    std::atomic<int> step{0};
    int cancel_at = 0;
};

int cancel_at_step(int step, int, void *user) {
    auto *c = static_cast<Canceller *>(user);
    c->step = step;
    return c->cancel_at && step >= c->cancel_at;
}

void bad_exports(const std::string &exp) {
    std::string root = tmpdir();
    broken_export(exp, root, "damaged_manifest", [](const fs::path &d) { write_text(d / "manifest.json", "{\"format\": \"sdrt-exp"); }, "not valid JSON");
    broken_export(exp, root, "future_manifest", [](const fs::path &d) { replace_in(d / "manifest.json", "\"format_version\": 1", "\"format_version\": 2"); }, "format 2");
    broken_export(exp, root, "truncated_unet", [](const fs::path &d) { fs::resize_file(d / "unet/model.onnx", 100); }, "truncated");
    broken_export(exp, root, "missing_vocab", [](const fs::path &d) { fs::remove(d / "tokenizer/merges.txt"); }, "missing tokenizer/merges.txt");
    broken_export(exp, root, "garbage_onnx", [](const fs::path &d) { overwrite_start(d / "vae_decoder/model.onnx", std::string(64, '\x7f')); }, "could not load");
    // The UNet runs as its step split on CPU (prepass.onnx, step.onnx beside model.onnx): a damaged one is refused too.
    broken_export(exp, root, "garbage_step", [](const fs::path &d) { overwrite_start(d / "unet/step.onnx", std::string(64, '\x7f')); }, "could not load");
    broken_export(exp, root, "swapped_network", [](const fs::path &d) {
        replace_in(d / "manifest.json", "\"file\": \"unet/model.onnx\"", "\"file\": \"vae_decoder/model.onnx\""); }, "mismatched");
    broken_export(exp, root, "bad_safetensors", [](const fs::path &d) { overwrite_start(d / "token_embeddings.safetensors", std::string(8, '\xff')); }, "safetensors");
    broken_export(exp, root, "no_family", [](const fs::path &d) { replace_in(d / "manifest.json", "\"family\": {", "\"old_family\": {"); }, "no \"family\" section");
    broken_export(exp, root, "unknown_network", [](const fs::path &d) {
        replace_in(d / "manifest.json", "\"networks\": [", "\"networks\": [\"text_encoder_3\", "); }, "network text_encoder_3");
    broken_export(exp, root, "no_scheduler_defaults", [](const fs::path &d) {
        replace_in(d / "manifest.json", "\"schedulers\": {", "\"schedulers\": {\"x\": {}}, \"unused\": {"); }, "default scheduler");
    broken_export(exp, root, "depth_unet", [](const fs::path &d) {
        replace_in(d / "manifest.json", "\"vocab_size\":", "\"unet_in_channels\": 5, \"vocab_size\":"); }, "5 input channels");
    broken_export(exp, root, "no_facts", [](const fs::path &d) { replace_in(d / "manifest.json", "\"facts\"", "\"fakts\""); }, "facts");

    // A damaged optimised-graph cache (.ort_cache/cpp-*) costs a rebuild, never the load.
    sdrt_ctx *ctx = nullptr;
    fs::path cached = fs::path(root) / "damaged_cache";
    fs::copy(exp, cached, fs::copy_options::recursive);
    CHECK(init_at(cached.string(), &ctx) == SDRT_OK, std::string("fresh copy: ") + sdrt_last_error(nullptr));
    sdrt_free(ctx);
    int damaged = 0;
    for (const auto &e : fs::directory_iterator(cached / ".ort_cache"))
        if (e.path().filename().string().rfind("cpp-", 0) == 0 && e.path().extension() == ".onnx")
            overwrite_start(e.path(), std::string(32, '\x01')), ++damaged;
    // 5: text encoder, the UNet's prepass and step graphs, VAE encoder and decoder
    CHECK(damaged == 5, "the C++ runtime wrote its optimised graphs to .ort_cache (" + std::to_string(damaged) + " files)");
    CHECK(init_at(cached.string(), &ctx) == SDRT_OK, std::string("damaged cache: ") + sdrt_last_error(nullptr));
    sdrt_free(ctx);
    fs::remove_all(root);

    CHECK(init_at(exp, &ctx, SDRT_BACKEND_TENSORRT) == SDRT_ERR_UNSUPPORTED && has(sdrt_last_error(nullptr), "TensorRT"), "tensorrt backend");
    sdrt_status st = init_at(exp, &ctx, SDRT_BACKEND_ORT_CUDA);  // no CUDA provider in a CPU build of ONNX Runtime
    if (st == SDRT_OK) sdrt_free(ctx);
    CHECK(st == SDRT_OK || st == SDRT_ERR_UNSUPPORTED || st == SDRT_ERR_BACKEND, std::string("cuda backend: ") + sdrt_last_error(nullptr));
    sdrt_ctx_params cp = sdrt_ctx_default_params();
    cp.model_dir = exp.c_str();
    const int bogus = 99;  // what a C caller can store in the enum field
    std::memcpy(&cp.backend, &bogus, sizeof bogus);
    CHECK(sdrt_init(&cp, &ctx) == SDRT_ERR_INVALID_ARGUMENT && has(sdrt_last_error(nullptr), "backend 99"), "backend 99");
}

void bad_generate(sdrt_ctx *ctx) {
    int w = 0, h = 0;
    CHECK(sdrt_default_size(ctx, &w, &h) == SDRT_OK && w > 0 && h > 0, "default size");
    const int step = sdrt_size_step(ctx);
    std::vector<uint8_t> rgb(size_t(w) * size_t(h) * 3 * 4);
    sdrt_gen_params gp = sdrt_gen_default_params();
    gp.prompt = "a cat";
    gp.steps = 3;
    gp.seed = 1;
    auto expect = [&](sdrt_gen_params p, sdrt_status want, const char *hint, const char *what) {
        sdrt_status got = sdrt_generate(ctx, &p, rgb.data());
        CHECK(got == want, std::string(what) + ": " + sdrt_status_name(got) + " \"" + sdrt_last_error(ctx) + "\"");
        CHECK(has(sdrt_last_error(ctx), hint), std::string(what) + ": message \"" + sdrt_last_error(ctx) + "\" lacks \"" + hint + "\"");
    };
    sdrt_gen_params p = gp;
    expect(p, SDRT_OK, "", "valid call");
    p = gp, p.prompt = nullptr, expect(p, SDRT_ERR_INVALID_ARGUMENT, "prompt is NULL", "NULL prompt");
    p = gp, p.width = step + 1, expect(p, SDRT_ERR_INVALID_ARGUMENT, "not a multiple of", "bad width");
    p = gp, p.height = -5, expect(p, SDRT_ERR_INVALID_ARGUMENT, "negative", "negative height");
    p = gp, p.height = 1 << 20, expect(p, SDRT_ERR_INVALID_ARGUMENT, "too large", "huge height");
    p = gp, p.steps = 0, expect(p, SDRT_ERR_INVALID_ARGUMENT, "steps 0", "zero steps");
    p = gp, p.steps = -3, expect(p, SDRT_ERR_INVALID_ARGUMENT, "steps -3", "negative steps");
    p = gp, p.guidance_scale = -1, expect(p, SDRT_ERR_INVALID_ARGUMENT, "guidance_scale", "negative guidance");
    p = gp, p.guidance_scale = NAN, expect(p, SDRT_ERR_INVALID_ARGUMENT, "guidance_scale", "NaN guidance");
    p = gp, p.batch_count = 0, expect(p, SDRT_ERR_INVALID_ARGUMENT, "batch_count", "zero batch");
    p = gp, p.scheduler = "nope", expect(p, SDRT_ERR_INVALID_ARGUMENT, "euler_a", "unknown scheduler");
    p = gp, p.init_image = rgb.data(), p.strength = 0, expect(p, SDRT_ERR_INVALID_ARGUMENT, "strength", "strength 0");
    p = gp, p.init_image = rgb.data(), p.strength = 1.5, expect(p, SDRT_ERR_INVALID_ARGUMENT, "strength", "strength 1.5");
    p = gp, p.init_image = rgb.data(), p.strength = 0.1, expect(p, SDRT_ERR_INVALID_ARGUMENT, "runs no step", "strength too small");
    std::vector<uint8_t> black(size_t(w) * size_t(h), 0), white(size_t(w) * size_t(h), 255);
    p = gp, p.mask_image = white.data(), expect(p, SDRT_ERR_INVALID_ARGUMENT, "needs init_image", "mask without image");
    p = gp, p.keep_unmasked = 1, expect(p, SDRT_ERR_INVALID_ARGUMENT, "pass mask_image", "keep_unmasked without mask");
    p = gp, p.init_image = rgb.data(), p.mask_image = black.data(), expect(p, SDRT_ERR_INVALID_ARGUMENT, "all black", "empty mask");
    p = gp, p.init_image = rgb.data(), p.mask_image = white.data(), p.keep_unmasked = 1, expect(p, SDRT_OK, "", "full mask");
    p = gp, p.prompt = "\xff\xfe broken utf-8 \xc3", expect(p, SDRT_OK, "", "invalid UTF-8 prompt");
    std::string long_prompt;
    for (int i = 0; i < 500; ++i) long_prompt += "word ";
    p = gp, p.prompt = long_prompt.c_str(), p.negative_prompt = "東京 🐱", expect(p, SDRT_OK, "", "long prompt, unicode negative");

    CHECK(sdrt_generate(nullptr, &gp, rgb.data()) == SDRT_ERR_INVALID_ARGUMENT && has(sdrt_last_error(nullptr), "ctx is NULL"), "NULL ctx");
    CHECK(sdrt_generate(ctx, nullptr, rgb.data()) == SDRT_ERR_INVALID_ARGUMENT && has(sdrt_last_error(ctx), "params"), "NULL params");
    CHECK(sdrt_generate(ctx, &gp, nullptr) == SDRT_ERR_INVALID_ARGUMENT && has(sdrt_last_error(ctx), "rgb_out"), "NULL output");
    CHECK(sdrt_generate_image(ctx, &gp, nullptr) == SDRT_ERR_INVALID_ARGUMENT, "NULL image pointer");
    CHECK(sdrt_default_size(nullptr, &w, &h) == SDRT_ERR_INVALID_ARGUMENT, "default size of NULL");
    sdrt_image_free(nullptr);
    sdrt_free(nullptr);

    // Cancellation by the callback, then the context still works.
    Canceller c;
    c.cancel_at = 2;
    sdrt_set_progress_callback(ctx, cancel_at_step, &c);
    expect(gp, SDRT_ERR_CANCELLED, "cancelled by the progress callback after step 2", "callback cancel");
    c.cancel_at = 0;
    expect(gp, SDRT_OK, "", "after a cancel");
    // Cancellation from another thread, while the loop runs.
    c.step = 0;
    sdrt_gen_params slow = gp;
    slow.steps = 400;
    std::thread canceller([&] {
        while (c.step < 2) std::this_thread::sleep_for(std::chrono::milliseconds(1));
        sdrt_request_cancel(ctx);
    });
    sdrt_status st = sdrt_generate(ctx, &slow, rgb.data());
    canceller.join();
    CHECK(st == SDRT_ERR_CANCELLED && has(sdrt_last_error(ctx), "sdrt_request_cancel"), std::string("thread cancel: ") + sdrt_last_error(ctx));
    sdrt_set_progress_callback(ctx, nullptr, nullptr);
    CHECK(sdrt_generate(ctx, &gp, rgb.data()) == SDRT_OK, "after a thread cancel");
}

// Growable structs (sdrt.h's ABI rule): a bad struct_size is refused; a host built against a newer header (a
// bigger struct) runs when the fields this library does not know are zero, and is refused otherwise.
void struct_sizes(sdrt_ctx *ctx) {
    int w = 0, h = 0;
    sdrt_default_size(ctx, &w, &h);
    std::vector<uint8_t> rgb(size_t(w) * size_t(h) * 3);
    sdrt_gen_params gp = sdrt_gen_default_params();
    CHECK(gp.struct_size == sizeof gp && gp.seed == SDRT_SEED_RANDOM && gp.steps == 30, "gen defaults");
    gp.prompt = "a tree";
    gp.steps = 2;
    gp.seed = 3;
    for (size_t bad : {size_t(0), size_t(7), sizeof gp - 8, size_t(1) << 40}) {
        sdrt_gen_params p = gp;
        p.struct_size = bad;
        sdrt_status st = sdrt_generate(ctx, &p, rgb.data());
        CHECK(st == SDRT_ERR_INVALID_ARGUMENT && has(sdrt_last_error(ctx), ("struct_size " + std::to_string(bad)).c_str()),
              "struct_size " + std::to_string(bad) + ": " + sdrt_last_error(ctx));
    }
    struct Newer {  // what a future header's struct looks like to this library: ours plus a field
        sdrt_gen_params base;
        int64_t future_field;
    } newer;
    sdrt_gen_params_init(&newer.base, sizeof newer);
    CHECK(newer.base.struct_size == sizeof newer && newer.future_field == 0, "init of a newer struct zeroes the unknown field");
    newer.base.prompt = "a tree", newer.base.steps = 2, newer.base.seed = 3;
    CHECK(sdrt_generate(ctx, &newer.base, rgb.data()) == SDRT_OK, std::string("newer struct, new field zero: ") + sdrt_last_error(ctx));
    newer.future_field = 7;
    CHECK(sdrt_generate(ctx, &newer.base, rgb.data()) == SDRT_ERR_UNSUPPORTED && has(sdrt_last_error(ctx), "does not know"),
          std::string("newer struct, new field set: ") + sdrt_last_error(ctx));

    // An ABI 3 host's struct ends before loras/lora_count: whatever lies past it is never read.
    std::vector<uint8_t> want(rgb.size());
    CHECK(sdrt_generate(ctx, &gp, want.data()) == SDRT_OK, std::string("ABI 4 struct: ") + sdrt_last_error(ctx));
    sdrt_gen_params v3 = gp;
    v3.struct_size = offsetof(sdrt_gen_params, loras);
    v3.loras = reinterpret_cast<const sdrt_lora *>(16), v3.lora_count = 5;  // garbage past an ABI 3 struct
    CHECK(sdrt_generate(ctx, &v3, rgb.data()) == SDRT_OK && rgb == want, std::string("ABI 3 struct: ") + sdrt_last_error(ctx));
    // An ABI 4 host's struct ends before the micro-conditioning fields (ABI 5): garbage past it is never read.
    sdrt_gen_params v4 = gp;
    v4.struct_size = offsetof(sdrt_gen_params, original_height);
    v4.original_height = 7, v4.crop_left = -3, v4.aesthetic_score = std::nan("");
    CHECK(sdrt_generate(ctx, &v4, rgb.data()) == SDRT_OK && rgb == want, std::string("ABI 4 struct: ") + sdrt_last_error(ctx));
    // An ABI 5 host's struct ends before the hand-over fields (ABI 6): garbage past it is never read.
    sdrt_gen_params v5 = gp;
    v5.struct_size = offsetof(sdrt_gen_params, denoising_start);
    v5.denoising_start = 7, v5.denoising_end = std::nan(""), v5.init_latents = reinterpret_cast<const float *>(16);
    CHECK(sdrt_generate(ctx, &v5, rgb.data()) == SDRT_OK && rgb == want, std::string("ABI 5 struct: ") + sdrt_last_error(ctx));
    // The latents entry points (ABI 6): the latents sdrt_generate decodes, the shape that sizes them.
    int shape[3] = {0, 0, 0};
    CHECK(sdrt_latent_shape(ctx, 0, 0, shape) == SDRT_OK && shape[0] > 0 && shape[1] * sdrt_size_step(ctx) >= h &&
              shape[2] > 0, std::string("sdrt_latent_shape: ") + sdrt_last_error(ctx));
    CHECK(sdrt_latent_shape(ctx, 13, 0, shape) == SDRT_ERR_INVALID_ARGUMENT && has(sdrt_last_error(ctx), "13"),
          std::string("sdrt_latent_shape of a bad width: ") + sdrt_last_error(ctx));
    CHECK(sdrt_latent_shape(ctx, 0, 0, nullptr) == SDRT_ERR_INVALID_ARGUMENT, "sdrt_latent_shape into NULL");
    std::vector<float> latents(size_t(shape[0]) * size_t(shape[1]) * size_t(shape[2]));
    CHECK(sdrt_generate_latents(ctx, &gp, latents.data()) == SDRT_OK &&
              std::any_of(latents.begin(), latents.end(), [](float v) { return v != 0; }),
          std::string("sdrt_generate_latents: ") + sdrt_last_error(ctx));
    CHECK(sdrt_generate_latents(ctx, &gp, nullptr) == SDRT_ERR_INVALID_ARGUMENT && has(sdrt_last_error(ctx), "latents_out"),
          "sdrt_generate_latents into NULL");
    sdrt_gen_params hand = gp;  // refused before any work, whatever the model (an SD 1.x/2.x one: any hand-over)
    hand.init_latents = latents.data();
    CHECK(sdrt_generate(ctx, &hand, rgb.data()) == SDRT_ERR_INVALID_ARGUMENT && has(sdrt_last_error(ctx), "set denoising_start"),
          std::string("init_latents without denoising_start: ") + sdrt_last_error(ctx));
    hand.init_latents = nullptr, hand.denoising_end = 0.8;
    const bool xl = sdrt_generate(ctx, &hand, rgb.data()) == SDRT_OK;
    CHECK(xl || has(sdrt_last_error(ctx), "hand latents between SDXL base and refiner"), std::string("denoising_end: ") + sdrt_last_error(ctx));
    sdrt_gen_params micro = gp;  // a half-given size is refused whatever the model
    micro.original_width = 512;
    CHECK(sdrt_generate(ctx, &micro, rgb.data()) == SDRT_ERR_INVALID_ARGUMENT && has(sdrt_last_error(ctx), "original_height/width (0, 512)"),
          std::string("half an original size: ") + sdrt_last_error(ctx));
    micro.original_height = 512;
    const bool ran = sdrt_generate(ctx, &micro, rgb.data()) == SDRT_OK;  // an SDXL export runs it, SD 1.x/2.x refuse it
    CHECK(ran || has(sdrt_last_error(ctx), "condition SDXL models only"), std::string("micro-conditioning: ") + sdrt_last_error(ctx));
    sdrt_gen_params bad = gp;
    bad.lora_count = 1;
    CHECK(sdrt_generate(ctx, &bad, rgb.data()) == SDRT_ERR_INVALID_ARGUMENT && has(sdrt_last_error(ctx), "loras is NULL"),
          std::string("lora_count without loras: ") + sdrt_last_error(ctx));
    sdrt_lora nan_scale = {"x.safetensors", std::nan("")};
    bad.loras = &nan_scale;
    CHECK(sdrt_generate(ctx, &bad, rgb.data()) == SDRT_ERR_INVALID_ARGUMENT && has(sdrt_last_error(ctx), "loras[0].scale"),
          std::string("NaN LoRA scale: ") + sdrt_last_error(ctx));

    sdrt_timings t;
    t.struct_size = 0;
    CHECK(sdrt_last_timings(ctx, &t) == SDRT_ERR_INVALID_ARGUMENT && has(sdrt_last_error(ctx), "sizeof(sdrt_timings)"), "timings without struct_size");
    t.struct_size = sizeof t;
    CHECK(sdrt_last_timings(ctx, &t) == SDRT_OK && t.total > 0 && t.struct_size == sizeof t, "timings");
    CHECK(sdrt_last_timings(ctx, nullptr) == SDRT_ERR_INVALID_ARGUMENT, "timings into NULL");
}

void seeds(sdrt_ctx *ctx, const std::string &exp) {
    int w = 0, h = 0;
    sdrt_default_size(ctx, &w, &h);
    const size_t one = size_t(w) * size_t(h) * 3;
    sdrt_gen_params gp = sdrt_gen_default_params();
    gp.prompt = "a lighthouse";
    gp.steps = 4;
    gp.guidance_scale = 2.0;
    gp.scheduler = "euler_a";
    gp.seed = 10;
    gp.batch_count = 3;
    sdrt_image *batch = nullptr;
    CHECK(sdrt_generate_image(ctx, &gp, &batch) == SDRT_OK && batch && batch->count == 3, "batch of 3");
    if (!batch) return;
    std::vector<uint8_t> single(one), again(one);
    gp.batch_count = 1;
    for (int k = 0; k < 3; ++k) {
        gp.seed = 10 + k;
        CHECK(sdrt_generate(ctx, &gp, single.data()) == SDRT_OK, "single");
        CHECK(std::memcmp(single.data(), batch->data + size_t(k) * one, one) == 0, "image " + std::to_string(k) + " of a batch = seed + k alone");
    }
    gp.seed = 12;
    sdrt_generate(ctx, &gp, again.data());
    CHECK(single == again, "same seed, same image");
    gp.seed = 13;
    sdrt_generate(ctx, &gp, again.data());
    CHECK(single != again, "another seed, another image");
    gp.seed = SDRT_SEED_RANDOM;
    CHECK(sdrt_generate(ctx, &gp, again.data()) == SDRT_OK && sdrt_last_seed(ctx) >= 0 && sdrt_last_seed(ctx) < (int64_t(1) << 31), "random seed");
    // Other negative seeds are refused, as Python's sdrt refuses them.
    gp.seed = -5;
    CHECK(sdrt_generate(ctx, &gp, again.data()) == SDRT_ERR_INVALID_ARGUMENT && has(sdrt_last_error(ctx), "seed -5 is negative"), "seed -5");
    gp.seed = INT64_MIN;
    CHECK(sdrt_generate(ctx, &gp, again.data()) == SDRT_ERR_INVALID_ARGUMENT, "seed INT64_MIN");
    gp.seed = INT64_MAX, gp.batch_count = 2;  // image 1's seed is 2^63: past int64, inside Python's 0..2**64-2
    sdrt_image *wrapped = nullptr;
    CHECK(sdrt_generate_image(ctx, &gp, &wrapped) == SDRT_OK && sdrt_last_seed(ctx) == INT64_MAX, "seed INT64_MAX, batch 2");
    sdrt_image_free(wrapped);
    gp.batch_count = 1;
    sdrt_image_free(batch);

    // Two contexts on two threads at once give what one context gives alone.
    gp.seed = 12;
    std::vector<uint8_t> a(one), b(one);
    sdrt_status sa = SDRT_ERR_INTERNAL, sb = SDRT_ERR_INTERNAL;
    sdrt_ctx *other = nullptr;
    CHECK(init_at(exp, &other) == SDRT_OK, "second context");
    std::thread ta([&] { sa = sdrt_generate(ctx, &gp, a.data()); });
    std::thread tb([&] { sb = sdrt_generate(other, &gp, b.data()); });
    ta.join(), tb.join();
    CHECK(sa == SDRT_OK && sb == SDRT_OK && a == single && b == single, "two contexts on two threads");
    sdrt_free(other);
}

}  // namespace

int main(int argc, char **argv) {
    sdrt_ctx *ctx = reinterpret_cast<sdrt_ctx *>(1);
    CHECK(sdrt_init(nullptr, &ctx) == SDRT_ERR_INVALID_ARGUMENT && ctx == nullptr && has(sdrt_last_error(nullptr), "params"), "NULL params");
    sdrt_ctx_params cp = sdrt_ctx_default_params();
    CHECK(sdrt_init(&cp, nullptr) == SDRT_ERR_INVALID_ARGUMENT, "NULL out");
    CHECK(sdrt_init(&cp, &ctx) == SDRT_ERR_INVALID_ARGUMENT && has(sdrt_last_error(nullptr), "model_dir"), "NULL model_dir");
    CHECK(init_at("/nonexistent/sdrt-export", &ctx) == SDRT_ERR_MODEL && has(sdrt_last_error(nullptr), "/nonexistent/sdrt-export"), "missing folder");
    CHECK(init_at("/etc/hostname", &ctx) == SDRT_ERR_MODEL, "a file, not a folder");
    std::string empty = tmpdir();
    CHECK(init_at(empty, &ctx) == SDRT_ERR_MODEL && has(sdrt_last_error(nullptr), "no manifest.json"), "folder without manifest");
    fs::remove_all(empty);
    cp.model_dir = "x";
    cp.n_threads = -2;
    CHECK(sdrt_init(&cp, &ctx) == SDRT_ERR_INVALID_ARGUMENT && has(sdrt_last_error(nullptr), "n_threads -2"), "negative threads");
    cp.n_threads = 0;
    cp.device_id = -1;
    CHECK(sdrt_init(&cp, &ctx) == SDRT_ERR_INVALID_ARGUMENT && has(sdrt_last_error(nullptr), "device_id -1"), "negative device");
    cp.device_id = 0;
    cp.struct_size = 12;
    CHECK(sdrt_init(&cp, &ctx) == SDRT_ERR_INVALID_ARGUMENT && has(sdrt_last_error(nullptr), "struct_size 12"), "ctx struct_size 12");
    cp.struct_size = sizeof cp;
    CHECK(sdrt_abi_version() == SDRT_ABI_VERSION && std::string(sdrt_version()) == SDRT_VERSION, "versions");
    CHECK(sdrt_last_seed(nullptr) == SDRT_SEED_RANDOM && sdrt_size_step(nullptr) == 0 && std::string(sdrt_backend_info(nullptr)).empty(), "NULL ctx getters");
    CHECK(sdrt_set_progress_callback(nullptr, nullptr, nullptr) == SDRT_ERR_INVALID_ARGUMENT, "callback on NULL");
    sdrt_request_cancel(nullptr);
    CHECK(std::string(sdrt_status_name(static_cast<sdrt_status>(42))) == "SDRT_ERR_UNKNOWN", "unknown status name");
    CHECK(std::string(sdrt_status_name(SDRT_ERR_CANCELLED)) == "SDRT_ERR_CANCELLED", "status names");
    std::thread([] { CHECK(std::string(sdrt_last_error(nullptr)).empty(), "last error is per thread"); }).join();

    if (argc < 3) {
        check::finish("test_api");
        return check::failures ? 1 : check::skip("no export: the export checks did not run");
    }
    const std::string exp = argv[2];
    bad_exports(exp);
    CHECK(init_at(exp, &ctx) == SDRT_OK, std::string("init: ") + sdrt_last_error(nullptr));
    if (ctx) {
        std::printf("backend: %s\n", sdrt_backend_info(ctx));
        CHECK(has(sdrt_backend_info(ctx), "step-invariant prepass for unet"), "the UNet runs as its step split on the CPU");
        bad_generate(ctx);
        struct_sizes(ctx);
        seeds(ctx, exp);
        sdrt_free(ctx);
    }
    return check::finish("test_api");
}
