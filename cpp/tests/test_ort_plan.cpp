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

    // LoRA slots (the manifest's lora_slots table): rank 0 / 16 / max_lora_rank; a Linear and a conv slot.
    sdrt::NetworkContract slotted = unet;
    slotted.lora_slots = {{"mid.to_q", {320, 768}, "/"}, {"mid.conv1", {320, 640, 3, 3}, "/"}};
    slotted.inputs.insert(slotted.inputs.end(), {"lora_down/mid.to_q", "lora_up/mid.to_q", "lora_down/mid.conv1", "lora_up/mid.conv1"});
    sdrt::ShapeLimits ranks = limits;
    ranks.max_lora_rank = 64;
    sdrt::OrtSessionPlan lora = sdrt::plan_ort_session(opt, true, true, "unet", slotted, sd15, ranks, "c");
    const std::string plain_min = "sample:1x4x32x32,timestep:1,encoder_hidden_states:1x77x768";
    CHECK(option(lora.tensorrt_options, "trt_profile_min_shapes") == plain_min + ",lora_down/mid.to_q:0x768,lora_up/mid.to_q:320x0,"
          "lora_down/mid.conv1:0x640x3x3,lora_up/mid.conv1:320x0x1x1", "slot min shapes: " + option(lora.tensorrt_options, "trt_profile_min_shapes"));
    CHECK(option(lora.tensorrt_options, "trt_profile_opt_shapes").find(",lora_down/mid.to_q:16x768,lora_up/mid.to_q:320x16,") != std::string::npos,
          "slot opt shapes: " + option(lora.tensorrt_options, "trt_profile_opt_shapes"));
    CHECK(option(lora.tensorrt_options, "trt_profile_max_shapes").find(",lora_down/mid.conv1:64x640x3x3,lora_up/mid.conv1:320x64x1x1") != std::string::npos,
          "slot max shapes: " + option(lora.tensorrt_options, "trt_profile_max_shapes"));
    // An older export's names (lora_down:<layer>) cannot be written in the provider's format: left out, not garbled.
    sdrt::NetworkContract old = unet;
    old.lora_slots = {{"mid.to_q", {320, 768}, ":"}};
    old.inputs.insert(old.inputs.end(), {"lora_down:mid.to_q", "lora_up:mid.to_q"});
    sdrt::OrtSessionPlan older = sdrt::plan_ort_session(opt, true, true, "unet", old, sd15, ranks, "c");
    CHECK(option(older.tensorrt_options, "trt_profile_min_shapes") == plain_min, "older slot names left out");

    sdrt::OrtSessionPlan cuda = sdrt::plan_ort_session({SDRT_BACKEND_ORT_CUDA, 0, 0}, false, true, "unet", unet, sd15, limits, "c");
    CHECK(cuda.cuda && !cuda.tensorrt && cuda.cache_optimized_model && cuda.tensorrt_options.empty(), "CUDA path keeps the cache");
    sdrt::OrtSessionPlan cpu = sdrt::plan_ort_session({SDRT_BACKEND_ORT_CPU, 0, 0}, false, false, "unet", unet, sd15, limits, "c");
    CHECK(!cpu.cuda && !cpu.tensorrt && cpu.cache_optimized_model, "CPU path keeps the cache");
    return check::finish("ort_plan");
}
