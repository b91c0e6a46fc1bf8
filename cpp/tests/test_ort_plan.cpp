// How the ONNX Runtime backend makes a session on each provider, without a GPU: the TensorRT provider path must set
// no optimised-model file (ONNX Runtime refuses to save TensorRT-compiled nodes, which made SDRT_BACKEND_ORT_TENSORRT
// fail at init) and must give the provider the options the Python runtime gives it (profiles, fp16, caches).
#include <string>

#include "backend.h"
#include "check.h"
#include "sdrt.h"

static std::string option(const std::vector<std::pair<std::string, std::string>> &kv, const std::string &key) {
    for (const auto &p : kv)
        if (p.first == key) return p.second;
    return "<unset>";
}

int main() {
    sdrt::ModelFacts sd15;  // SD 1.5's facts: size step 64, 77 x 768 text, 4 latent channels
    sdrt::ShapeLimits limits{256, 512, 1024, 4};
    sdrt::BackendOptions opt{SDRT_BACKEND_ORT_TENSORRT, 0, 1};
    // The contracts as an SD export's manifest gives them (the names come from there, not from C++).
    const sdrt::NetworkContract unet{{"sample", "timestep", "encoder_hidden_states"}, {"out_sample"}};
    const sdrt::NetworkContract text_encoder{{"inputs_embeds"}, {"last_hidden_state"}}, vae_decoder{{"latent"}, {"image"}};

    sdrt::OrtSessionPlan trt = sdrt::plan_ort_session(opt, true, true, "unet", unet, sd15, limits, "/e/.ort_trt_cache/cpp-k");
    CHECK(trt.tensorrt && trt.cuda, "the TensorRT path appends TensorRT, then CUDA");
    CHECK(!trt.cache_optimized_model, "the TensorRT path must set no optimised-model file");
    CHECK(option(trt.tensorrt_options, "device_id") == "1", "device id");
    CHECK(option(trt.tensorrt_options, "trt_fp16_enable") == "1", "fp16");
    CHECK(option(trt.tensorrt_options, "trt_engine_cache_enable") == "1", "engine cache");
    CHECK(option(trt.tensorrt_options, "trt_engine_cache_path") == "/e/.ort_trt_cache/cpp-k", "engine cache path");
    CHECK(option(trt.tensorrt_options, "trt_timing_cache_enable") == "1", "timing cache");
    CHECK(option(trt.tensorrt_options, "trt_profile_min_shapes") == "sample:1x4x32x32,timestep:1,encoder_hidden_states:1x77x768",
          "unet min shapes: " + option(trt.tensorrt_options, "trt_profile_min_shapes"));
    CHECK(option(trt.tensorrt_options, "trt_profile_opt_shapes") == "sample:2x4x64x64,timestep:2,encoder_hidden_states:2x77x768",
          "unet opt shapes: " + option(trt.tensorrt_options, "trt_profile_opt_shapes"));
    CHECK(option(trt.tensorrt_options, "trt_profile_max_shapes") == "sample:8x4x128x128,timestep:8,encoder_hidden_states:8x77x768",
          "unet max shapes: " + option(trt.tensorrt_options, "trt_profile_max_shapes"));
    sdrt::OrtSessionPlan text = sdrt::plan_ort_session(opt, true, true, "text_encoder", text_encoder, sd15, limits, "c");
    CHECK(option(text.tensorrt_options, "trt_profile_max_shapes") == "inputs_embeds:4x77x768", "text encoder max shapes");
    sdrt::OrtSessionPlan vae = sdrt::plan_ort_session(opt, true, true, "vae_decoder", vae_decoder, sd15, limits, "c");
    CHECK(option(vae.tensorrt_options, "trt_profile_min_shapes") == "latent:1x4x32x32", "vae decoder min shapes");

    sdrt::OrtSessionPlan cuda = sdrt::plan_ort_session({SDRT_BACKEND_ORT_CUDA, 0, 0}, false, true, "unet", unet, sd15, limits, "c");
    CHECK(cuda.cuda && !cuda.tensorrt && cuda.cache_optimized_model && cuda.tensorrt_options.empty(), "CUDA path keeps the cache");
    sdrt::OrtSessionPlan cpu = sdrt::plan_ort_session({SDRT_BACKEND_ORT_CPU, 0, 0}, false, false, "unet", unet, sd15, limits, "c");
    CHECK(!cpu.cuda && !cpu.tensorrt && cpu.cache_optimized_model, "CPU path keeps the cache");
    return check::finish("ort_plan");
}
