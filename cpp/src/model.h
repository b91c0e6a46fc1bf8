// An sdrt export folder, read as runtime/model/manifest.py reads it: manifest.json (format, facts, contracts, networks,
// files with sizes), the tokenizer folder, the scheduler config and the token-embedding table (safetensors).
#pragma once

#include <map>
#include <string>
#include <vector>

#include "json.h"
#include "scheduler.h"

namespace sdrt {

struct ModelFacts {  // runtime/model/facts.py's ModelFacts
    std::string family, prediction_type;
    int latent_channels = 4, vae_scale_factor = 8, unet_downsamples = 3, text_seq_len = 77, text_hidden_size = 768;
    int cross_attention_dim = 768, default_size = 512, vocab_size = 49408;
    double scaling_factor = 0.18215;
    int unet_in_channels = 4;  // latent_channels, or 2 * latent_channels + 1 for an inpainting UNet
    bool inpainting_unet() const { return unet_in_channels == 2 * latent_channels + 1; }
    // SDXL (0/false for SD 1.x/2.x; see runtime/model/facts.py): the second encoder's width, the pooled width, the
    // micro-conditioning time ids per image, and how CLIP pools and what an empty negative prompt is.
    int text_hidden_size_2 = 0, pooled_dim = 0, time_ids_dim = 0;
    bool pool_at_argmax = false, requires_aesthetics_score = false, force_zeros_for_empty_prompt = false;
    // A VAE with latents_mean/latents_std (one per latent channel; empty: none): encoded latents are
    // (sample - mean) * scaling_factor / std. The export's decoder applies the inverse inside.
    std::vector<float> latents_mean, latents_std;
    int size_step() const { return vae_scale_factor << unet_downsamples; }
};

// One layer that takes run-time LoRA factors (runtime/contracts.py's LoraSlot, from the manifest's contract): the
// network's inputs end with `lora_down/<layer>` [r, in(, kh, kw)] and `lora_up/<layer>` [out, r(, 1, 1)] per slot
// (`lora_down:<layer>` in exports made before 2026-12-05; the manifest's slot "sep" says which).
struct LoraSlot {
    std::string layer;            // module path in the component (the UNet, or the CLIP text model's core)
    std::vector<int64_t> weight;  // the layer's weight shape: (out, in) or (out, in, kh, kw)
    std::string sep = ":";        // input names: "lora_down" + sep + layer ("/" since 2026-12-05; ":" before)
};

struct NetworkContract {  // names only: shapes are checked where tensors are made
    std::vector<std::string> inputs, outputs;
    std::vector<LoraSlot> lora_slots;  // empty: an export without LoRA slots
    size_t plain_inputs() const { return inputs.size() - 2 * lora_slots.size(); }
};

// The manifest's "family" section (sdrt.families' FamilySpec.to_manifest): which networks the model has, the UNet's
// conditioning inputs, and each scheduler's default config - read from the export, never hard-coded here.
struct FamilySpec {
    std::string name;
    std::vector<std::string> networks, conditioning;
    SchedulerFamily schedulers;  // defaults per sdrt scheduler name, and the default scheduler
};

struct TextEncoderFiles {  // one text encoder: its network, tokenizer folder and token table (SDXL has two)
    std::string network, tokenizer_dir, token_embeddings;
};

struct ExportFolder {
    std::string path;
    ModelFacts facts;
    FamilySpec family;
    std::map<std::string, NetworkContract> contracts;
    std::map<std::string, std::string> network_files;  // network -> path of its .onnx
    // network -> (prepass, step): its step split's graphs (sdrt.export.step_split), run on CPU instead of the whole
    std::map<std::string, std::pair<std::string, std::string>> split_files;
    std::string manifest_digest;  // a hash of manifest.json (every file's size and sha256): keys the graph cache
    std::string tokenizer_dir, scheduler_config, token_embeddings;  // the first text encoder's (SD: the only one)
    std::vector<TextEncoderFiles> text_encoders;  // in the order their states are concatenated
};

// Reads and checks an export; throws Error(SDRT_ERR_MODEL) naming the problem and the fix.
ExportFolder read_export(const std::string &path);

// The networks the C++ pipeline runs, by the role their name gives them, and how many inputs and outputs each
// contract has by position (the names themselves come from the manifest's contracts): the UNet's inputs are
// [latent sample, timestep, conditioning...]. read_export refuses a family that needs another network, and the
// backend refuses ONNX files that disagree with the manifest's contracts.
extern const char *const kTextEncoder, *const kTextEncoder2, *const kUnet, *const kVaeEncoder, *const kVaeDecoder;

struct TokenTable {
    std::vector<float> data;  // [rows, hidden]
    int rows = 0, hidden = 0;
};

// The token-embedding table from a safetensors file (key "token_embedding" or a checkpoint's own key);
// F32, F16, BF16 and F64 tensors are read as float32.
TokenTable read_token_table(const std::string &path);

// "height 500 is not a multiple of 64 for this model; use 448 or 512", or "" when the size is fine.
std::string check_size(const ModelFacts &facts, int height, int width);

}  // namespace sdrt
