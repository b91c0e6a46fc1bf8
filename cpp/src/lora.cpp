// LoRA files onto an export's slots (see lora.h); every rule mirrors runtime/adapters/lora.py, names included.
#include "lora.h"

#include <cmath>
#include <cstring>

#include "floats.h"
#include "util.h"

namespace sdrt {

SafeTensors read_safetensors(const std::string &path, const std::string &what) {
    std::string data = read_file(path);
    auto bad = [&](const std::string &why) { return model_error(path + " is not a valid safetensors " + what + " (" + why + ")"); };
    if (data.size() < 8) throw bad("shorter than its header");
    uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<unsigned char>(data[size_t(i)]);
    if (n < 2 || n > data.size() - 8) throw bad("header length past the end");
    Json header;
    try {
        header = Json::parse(data.substr(8, size_t(n)), path);
    } catch (const Error &) {
        throw bad("its header is not JSON");
    }
    if (!header.is_object()) throw bad("its header is not a JSON object");
    SafeTensors out;
    const size_t base = 8 + size_t(n);
    for (const auto &kv : header.as_object()) {
        if (kv.first == "__metadata__") {
            out.metadata = kv.second;
            continue;
        }
        const Json &e = kv.second;
        const Json *dt = e.find("dtype"), *sh = e.find("shape"), *off = e.find("data_offsets");
        if (!dt || !dt->is_string() || !sh || !sh->is_array() || !off || !off->is_array() || off->size() != 2)
            throw bad("tensor " + kv.first + " has no dtype, shape or data_offsets");
        const std::string &dtype = dt->as_string();
        size_t width = float_width(dtype);
        if (!width) throw model_error(path + ": tensor " + kv.first + " has dtype " + dtype + "; a LoRA's are F32, F16, BF16 or F64");
        SafeTensor t;
        size_t count = 1;
        for (const Json &d : sh->as_array()) {
            long long v = d.as_int();
            if (v < 0 || v > (1ll << 40)) throw bad("tensor " + kv.first + " has a bad shape");
            t.shape.push_back(v);
            count *= size_t(v);
        }
        long long b = off->as_array()[0].as_int(), en = off->as_array()[1].as_int();
        if (b < 0 || en < b || size_t(en - b) != count * width || base + size_t(en) > data.size())
            throw bad("tensor " + kv.first + "'s offsets do not match its shape, or run past the end");
        const char *p = data.data() + base + size_t(b);
        t.data.resize(count);
        widen_floats(p, count, dtype, t.data.data());
        out.keys.push_back(kv.first);
        out.tensors.emplace(kv.first, std::move(t));
    }
    return out;
}

namespace {

bool starts(const std::string &s, const char *p) { return s.rfind(p, 0) == 0; }
bool ends(const std::string &s, const std::string &p) { return s.size() >= p.size() && s.compare(s.size() - p.size(), p.size(), p) == 0; }
bool has(const std::string &s, const char *p) { return s.find(p) != std::string::npos; }

// lora.py's _refusal: what sdrt cannot apply, named.
std::string refusal(const std::vector<std::string> &keys) {
    if (keys.empty()) return "empty";
    bool any_lora = false;
    for (const auto &k : keys) {
        if (starts(k, "lora_te1_") || starts(k, "lora_te2_") || starts(k, "text_encoder_2.")) return "an SDXL LoRA (two text encoders)";
        if (starts(k, "lora_unet_") && (has(k, "input_blocks") || has(k, "output_blocks")))
            return "a LoRA in the original (LDM) UNet layout (SDXL trainers write it)";
        if (ends(k, ".hada_t1") || ends(k, ".hada_t2") || ends(k, ".lokr_t2"))
            return "a LyCORIS LoHa/LoKr with Tucker-decomposed conv kernels (hada_t1/lokr_t2)";
        if (has(k, "dora_scale") || has(k, "lora_magnitude_vector")) return "a DoRA";
        if (ends(k, ".lora_mid.weight")) return "a LoCon with a CP-decomposed middle layer (lora_mid)";
        if (ends(k, "lora_B.bias") || ends(k, "lora_up.bias") || ends(k, ".up.bias")) return "a LoRA with bias terms";
        any_lora |= has(k, "lora") || has(k, ".hada_") || has(k, ".lokr_");
    }
    if (!any_lora) return "not a LoRA (no lora keys)";
    for (const auto &k : keys)  // the Python runtime factorises these by a truncated SVD; the C++ host does not
        if (has(k, ".hada_") || has(k, ".lokr_"))
            return "a LyCORIS LoHa/LoKr, which the C++ host does not take (the Python runtime does: `sdrt generate --lora`)";
    return "";
}

struct Layer {
    std::string component, name;  // component: "unet" / "text_encoder"; name: dotted, or kohya's flat name
    bool flat;
    const SafeTensor *down, *up;
    bool has_alpha;
    double alpha;
    bool rslora;
};

double scalar(const std::string &path, const std::string &base, const SafeTensor &t) {
    if (t.data.size() != 1)
        throw model_error(path + ": " + base + ".alpha has " + std::to_string(t.data.size()) + " values; a LoRA's alpha is one number: the file is damaged");
    return double(t.data[0]);
}

const char *const kKohyaSuffixes[] = {".lora_down.weight", ".lora_up.weight", ".alpha"};

bool kohya_key(const std::string &k) {
    if (!starts(k, "lora_unet_") && !starts(k, "lora_te_")) return false;
    for (const char *s : kKohyaSuffixes)
        if (ends(k, s)) return true;
    return false;
}

// (down suffix, up suffix) of the dotted layouts, newest first (lora.py's _DOTTED).
const std::pair<const char *, const char *> kDotted[] = {{".lora_A.weight", ".lora_B.weight"},
                                                         {".lora.down.weight", ".lora.up.weight"},
                                                         {".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"},
                                                         {".down.weight", ".up.weight"}};

// lora.py's _component_and_module: a dotted key's base -> (component or "", module path in it).
std::pair<std::string, std::string> component_and_module(const std::string &base) {
    std::string component, name;
    if (starts(base, "unet.")) component = "unet", name = base.substr(5);
    else if (starts(base, "text_encoder.")) component = "text_encoder", name = base.substr(13);
    else if (starts(base, "down_blocks.") || starts(base, "up_blocks.") || starts(base, "mid_block.") || starts(base, "conv_in") ||
             starts(base, "conv_out") || starts(base, "time_embedding."))
        component = "unet", name = base;
    else if (starts(base, "text_model.")) component = "text_encoder", name = base;
    else return {"", base};
    if (component == "text_encoder" && starts(name, "text_model.")) name = name.substr(11);
    size_t dot = name.rfind('.');
    std::string parent = dot == std::string::npos ? "" : name.substr(0, dot), last = dot == std::string::npos ? name : name.substr(dot + 1);
    static const char *const procs[][3] = {{"to_q_lora", "to_q", "q_proj"}, {"to_k_lora", "to_k", "k_proj"},
                                           {"to_v_lora", "to_v", "v_proj"}, {"to_out_lora", "to_out.0", "out_proj"}};
    for (const auto &p : procs)
        if (last == p[0]) {  // the old attention-processor layout
            if (ends(parent, ".processor")) parent = parent.substr(0, parent.size() - 10);
            name = parent + "." + (component == "unet" ? p[1] : p[2]);
        }
    return {component, name};
}

// PEFT's LoraConfig values diffusers stores in the metadata ("unet.lora_alpha", ...), for one component.
const Json *adapter_value(const Json &config, const std::string &component, const char *key) {
    return config.is_object() ? config.find(component + "." + key) : nullptr;
}

std::vector<Layer> read_layers(const std::string &path, const SafeTensors &st) {
    std::vector<Layer> layers;
    bool kohya = !st.keys.empty();
    for (const auto &k : st.keys) kohya &= kohya_key(k);
    if (kohya) {
        for (const auto &key : st.keys) {
            if (!ends(key, ".lora_down.weight")) continue;
            std::string base = key.substr(0, key.size() - 17);
            auto up = st.tensors.find(base + ".lora_up.weight");
            if (up == st.tensors.end()) throw model_error(path + ": " + base + " has lora_down but no lora_up; the LoRA file is damaged");
            auto alpha = st.tensors.find(base + ".alpha");
            bool unet = starts(base, "lora_unet_");
            layers.push_back({unet ? "unet" : "text_encoder", base.substr(unet ? 10 : 8), true, &st.tensors.at(key), &up->second,
                              alpha != st.tensors.end(), alpha != st.tensors.end() ? scalar(path, base, alpha->second) : 0.0, false});
        }
        return layers;
    }
    Json config;  // lora_adapter_metadata, a JSON string in the metadata
    if (const Json *raw = st.metadata.find("lora_adapter_metadata"))
        if (raw->is_string()) try {
                config = Json::parse(raw->as_string(), path + " (lora_adapter_metadata)");
            } catch (const Error &) {
            }
    std::map<std::string, bool> used;
    for (const auto &key : st.keys) {
        const std::pair<const char *, const char *> *pair = nullptr;
        for (const auto &p : kDotted)
            if (ends(key, p.first)) {
                pair = &p;
                break;
            }
        if (!pair) continue;
        std::string base = key.substr(0, key.size() - std::strlen(pair->first)), up_key = base + pair->second;
        if (!st.tensors.count(up_key)) continue;
        auto cm = component_and_module(base);
        if (cm.first.empty()) throw model_error(path + ": LoRA layer '" + base + "' is for neither the UNet nor the text encoder");
        Layer layer{cm.first, cm.second, false, &st.tensors.at(key), &st.tensors.at(up_key), false, 0.0, false};
        auto alpha = st.tensors.find(base + ".alpha");
        if (alpha != st.tensors.end()) {  // network alphas stored as tensors, as kohya does
            layer.has_alpha = true, layer.alpha = scalar(path, base, alpha->second);
            used[base + ".alpha"] = true;
        } else {
            const Json *value = adapter_value(config, cm.first, "lora_alpha");
            if (const Json *pattern = adapter_value(config, cm.first, "alpha_pattern"))
                if (pattern->is_object())
                    for (const auto &kv : pattern->as_object())
                        if (layer.name == kv.first || ends(layer.name, "." + kv.first)) {
                            value = &kv.second;
                            break;
                        }
            if (value && value->is_number()) layer.has_alpha = true, layer.alpha = value->as_number();
        }
        const Json *rs = adapter_value(config, cm.first, "use_rslora");
        layer.rslora = rs && rs->truthy();
        layers.push_back(layer);
        used[key] = used[up_key] = true;
    }
    size_t left = 0;
    std::string example;
    for (const auto &k : st.keys)
        if (!used.count(k)) {
            if (!left++) example = k;
        }
    if (left) throw model_error(path + ": " + std::to_string(left) + " keys of this LoRA are in no layout sdrt reads (e.g. '" + example + "')");
    return layers;
}

int64_t product(const std::vector<int64_t> &s, size_t from = 0) {
    int64_t n = 1;
    for (size_t i = from; i < s.size(); ++i) n *= s[i];
    return n;
}

std::string dims(const std::vector<int64_t> &s) {
    std::string out = "[";
    for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
    return out + "]";
}

}  // namespace

LoraFactors read_lora(const std::string &path, const std::map<std::string, NetworkContract> &contracts) {
    if (!file_exists(path)) throw model_error("LoRA file " + path + " does not exist; pass a .safetensors LoRA");
    SafeTensors st = read_safetensors(path, "LoRA");
    std::string why = refusal(st.keys);
    if (!why.empty()) throw model_error(path + " is " + why + "; sdrt applies plain LoRAs (kohya or diffusers layout) for SD 1.x/2.x");
    std::vector<Layer> layers = read_layers(path, st);
    for (const Layer &l : layers) {  // lora.py's _check_shapes
        const auto &d = l.down->shape, &u = l.up->shape;
        if ((d.size() != 2 && d.size() != 4) || u.size() != d.size() || u[1] != d[0] || d[0] < 1)
            throw model_error(path + ": layer '" + l.name + "' has lora_down " + dims(d) + " and lora_up " + dims(u) +
                              "; a LoRA needs down [rank, in] and up [out, rank] (or 4-d conv kernels): the file is damaged or not a LoRA");
        if (l.has_alpha && !std::isfinite(l.alpha))
            throw model_error(path + ": layer '" + l.name + "' has alpha " + std::to_string(l.alpha) + "; the file is damaged");
    }
    LoraFactors out;
    size_t matched = 0;
    for (const char *component : {"unet", "text_encoder"}) {
        const std::string network = component == std::string("unet") ? kUnet : kTextEncoder;
        std::map<std::string, const LoraSlot *> index, by_name;  // kohya's flat names and the dotted ones -> slot
        auto c = contracts.find(network);
        if (c != contracts.end())
            for (const LoraSlot &s : c->second.lora_slots) {
                std::string flat = s.layer;
                for (char &ch : flat) ch = ch == '.' ? '_' : ch;
                index[flat] = by_name[s.layer] = &s;
                if (network == kTextEncoder) index["text_model_" + flat] = &s;  // kohya writes CLIPTextModel's paths
            }
        size_t total = 0, missing = 0;
        std::string first_missing;
        for (const Layer &l : layers) {
            if (l.component != component) continue;
            ++total;
            const auto &table = l.flat ? index : by_name;
            auto it = table.find(l.name);
            if (it == table.end()) {
                if (!missing++) first_missing = l.name;
                continue;
            }
            const LoraSlot &slot = *it->second;
            const auto &shape = slot.weight;
            const SafeTensor &down = *l.down, &up = *l.up;
            const int64_t r = down.shape[0];
            // lora.py's _delta(product=False): the shape checks, naming the layer
            if ((up.shape.size() == 4 && (up.shape[2] != 1 || up.shape[3] != 1)))
                throw model_error(path + ": layer " + slot.layer + ": up " + dims(up.shape) + " does not fit down " + dims(down.shape) + "; not a plain LoRA");
            const int64_t rows = up.shape[0], cols = product(down.shape) / r;
            bool kernel_differs = shape.size() == 4 && down.shape.size() == 4 &&
                                  std::vector<int64_t>(down.shape.begin() + 1, down.shape.end()) != std::vector<int64_t>(shape.begin() + 1, shape.end());
            if (rows != shape[0] || rows * cols != product(shape) || kernel_differs) {
                std::vector<int64_t> makes = {rows, cols};
                if (kernel_differs) makes = {rows, down.shape[1], down.shape[2], down.shape[3]};
                throw model_error(path + " does not match this model: layer " + slot.layer + " has a weight of shape " + dims(shape) +
                                  " but the LoRA makes " + dims(makes) + "; it was trained for another base model (SD 1.x and 2.x differ)");
            }
            double alpha = l.has_alpha ? l.alpha : double(r);
            const float scaling = float(alpha / (l.rslora ? std::sqrt(double(r)) : double(r)));
            SlotFactors &f = out[network][slot.layer];  // a layer twice in one file: concatenated, as slot_factors does
            const int64_t old = f.rank;
            f.down.insert(f.down.end(), down.data.begin(), down.data.end());
            std::vector<float> up_all(size_t(rows * (old + r)));
            for (int64_t o = 0; o < rows; ++o) {
                for (int64_t j = 0; j < old; ++j) up_all[size_t(o * (old + r) + j)] = f.up[size_t(o * old + j)];
                for (int64_t j = 0; j < r; ++j) up_all[size_t(o * (old + r) + old + j)] = up.data[size_t(o * r + j)] * scaling;
            }
            f.up = std::move(up_all);
            f.rank = old + r;
            ++matched;
        }
        if (missing)
            throw model_error(path + " does not match this model's LoRA slots: " + std::to_string(missing) + " of its " + std::to_string(total) +
                              " " + component + " layers are not in it (e.g. '" + first_missing + "'); it was made for another model "
                              "or architecture, or the export's --lora-slots set leaves those layers out");
    }
    if (!matched) throw model_error(path + " holds no UNet or text-encoder layers to apply");
    return out;
}

std::vector<SlotFeed> slot_feeds(const NetworkContract &contract, const std::string &network,
                                 const std::vector<std::pair<const LoraFactors *, double>> &loras) {
    std::vector<SlotFeed> feeds;
    for (const LoraSlot &slot : contract.lora_slots) {
        const int64_t out = slot.weight[0], in = product(slot.weight, 1);
        std::vector<const SlotFactors *> parts;
        std::vector<float> scales;
        int64_t R = 0;
        for (const auto &l : loras) {
            auto n = l.first->find(network);
            if (n == l.first->end()) continue;
            auto f = n->second.find(slot.layer);
            if (f == n->second.end()) continue;
            parts.push_back(&f->second);
            scales.push_back(float(l.second));
            R += f->second.rank;
        }
        SlotFeed feed;
        feed.down.reserve(size_t(R * in));
        for (const SlotFactors *p : parts) feed.down.insert(feed.down.end(), p->down.begin(), p->down.end());
        feed.up.resize(size_t(out * R));
        for (int64_t o = 0; o < out; ++o) {
            int64_t col = 0;
            for (size_t k = 0; k < parts.size(); ++k)  // up * scale, as lora_switch.combined_factors folds it
                for (int64_t j = 0; j < parts[k]->rank; ++j) feed.up[size_t(o * R + col++)] = parts[k]->up[size_t(o * parts[k]->rank + j)] * scales[k];
        }
        if (slot.weight.size() == 4) {
            feed.down_shape = {R, slot.weight[1], slot.weight[2], slot.weight[3]};
            feed.up_shape = {out, R, 1, 1};
        } else {
            feed.down_shape = {R, slot.weight[1]};
            feed.up_shape = {out, R};
        }
        feeds.push_back(std::move(feed));
    }
    return feeds;
}

}  // namespace sdrt
