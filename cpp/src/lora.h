// Run-time LoRAs for exports with LoRA slots: a LoRA file read and mapped onto the slots the manifest lists, as
// runtime/adapters/lora.py (read_lora, match_layers, slot_factors) and lora_switch.py (combined_factors) do, and
// the slot inputs a network call takes (rank 0, empty, when no LoRA adapts a layer).
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "json.h"
#include "model.h"

namespace sdrt {

// A .safetensors file, every tensor widened to float32 (F32, F16, BF16, F64), and its __metadata__ (an object or null).
struct SafeTensor {
    std::vector<int64_t> shape;
    std::vector<float> data;
};
struct SafeTensors {
    std::map<std::string, SafeTensor> tensors;
    std::vector<std::string> keys;  // in the file's order
    Json metadata;
};
SafeTensors read_safetensors(const std::string &path, const std::string &what);

// One slot's factors at scale 1 (alpha/rank folded into up): down [rank, in * kh * kw], up [out, rank].
struct SlotFactors {
    int64_t rank = 0;
    std::vector<float> down, up;
};
using LoraFactors = std::map<std::string, std::map<std::string, SlotFactors>>;  // network -> slot layer -> factors

// Reads a LoRA (kohya incl. LoCon, diffusers/PEFT, older diffusers) and maps it onto `contracts`' slots; throws
// model_error naming the file and, for a LoRA of another model, the layer. LyCORIS LoHa/LoKr are refused by name.
LoraFactors read_lora(const std::string &path, const std::map<std::string, NetworkContract> &contracts);

// The slot inputs of one network for a set of LoRAs: per slot (contract order) down [R, in(, kh, kw)] and
// up [out, R(, 1, 1)], the LoRAs concatenated along R with their scales folded into up (R = 0: no LoRA there).
struct SlotFeed {
    std::vector<float> down, up;
    std::vector<int64_t> down_shape, up_shape;
};
std::vector<SlotFeed> slot_feeds(const NetworkContract &contract, const std::string &network,
                                 const std::vector<std::pair<const LoraFactors *, double>> &loras);

}  // namespace sdrt
