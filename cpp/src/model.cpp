// Reading an export folder (see model.h): the manifest checks of runtime/model/manifest.py and a safetensors reader.
#include "model.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>

#include "floats.h"
#include "util.h"

namespace sdrt {

static const char *kReexport = "; re-export the model with `sdrt export`";

const char *const kTextEncoder = "text_encoder", *const kTextEncoder2 = "text_encoder_2", *const kUnet = "unet",
                  *const kVaeEncoder = "vae_encoder", *const kVaeDecoder = "vae_decoder";

namespace {

struct Role {
    const char *network;
    bool required;
    size_t inputs, outputs;  // by position; the UNet's inputs are 2 + the conditioning count
};
// SDXL's text_encoder_2 takes (embeddings, pool_weights) and gives (hidden_states, text_embeds); a family needs one
// text encoder at least (SDXL's refiner has only the second).
const Role kRoles[] = {{kTextEncoder, false, 1, 1}, {kTextEncoder2, false, 2, 2}, {kUnet, true, 2, 1}, {kVaeEncoder, false, 1, 2},
                       {kVaeDecoder, true, 1, 1}};
const std::vector<std::string> kSdxlConditioning = {"encoder_hidden_states", "text_embeds", "time_ids"};

std::vector<std::string> strings_of(const Json &list) {
    std::vector<std::string> out;
    for (const auto &s : list.as_array()) out.push_back(s.as_string());
    return out;
}

// The "family" section: network names, conditioning and scheduler defaults, checked against what this runtime runs.
FamilySpec read_family(const Json &m, const std::string &mpath, const std::string &facts_family) {
    const Json *f = m.find("family");
    if (!f)
        throw model_error(mpath + " has no \"family\" section (the export predates it); re-export the model with this "
                          "version's `sdrt export`");
    FamilySpec fam;
    fam.name = f->at("name").as_string();
    if (fam.name != facts_family)
        throw model_error(mpath + " says family " + fam.name + " but its facts say " + facts_family + kReexport);
    fam.networks = strings_of(f->at("networks"));
    fam.conditioning = strings_of(f->at("conditioning"));
    for (const auto &n : fam.networks) {
        bool known = false;
        for (const Role &r : kRoles) known |= n == r.network;
        if (!known)
            throw model_error(mpath + ": family " + fam.name + " has network " + n + ", which the C++ runtime does not run " +
                              "yet; use the Python runtime (`sdrt generate`)");
    }
    if (fam.conditioning.size() != 1 && fam.conditioning != kSdxlConditioning)
        throw model_error(mpath + ": family " + fam.name + " conditions the UNet on " + std::to_string(fam.conditioning.size()) +
                          " inputs; the C++ runtime feeds the text encoder's states (and SDXL's text_embeds and time_ids): "
                          "use the Python runtime");
    for (const auto &kv : f->at("schedulers").as_object()) fam.schedulers.defaults[kv.first] = kv.second;
    fam.schedulers.default_name = f->at("default_scheduler").as_string();
    if (!fam.schedulers.defaults.count(fam.schedulers.default_name))
        throw model_error(mpath + ": the family's default scheduler " + fam.schedulers.default_name + " has no defaults" + kReexport);
    return fam;
}

}  // namespace

static std::vector<std::string> names_of(const Json &specs) {
    std::vector<std::string> out;
    for (const auto &s : specs.as_array()) out.push_back(s.at("name").as_string());
    return out;
}

// A contract's tensor names and LoRA slots; the slots' inputs must close the input list, two per slot in order.
static NetworkContract read_contract(const std::string &network, const Json &c, const std::string &mpath) {
    NetworkContract out{names_of(c.at("inputs")), names_of(c.at("outputs")), {}};
    if (const Json *slots = c.find("lora_slots")) {
        for (const Json &s : slots->as_array()) {
            LoraSlot slot{s.at("layer").as_string(), {}};
            for (const Json &d : s.at("weight").as_array()) slot.weight.push_back(d.as_int());
            if (const Json *sep = s.find("sep")) slot.sep = sep->as_string();  // absent: an export from before "/"
            if (slot.weight.size() != 2 && slot.weight.size() != 4)
                throw model_error(mpath + ": the " + network + " LoRA slot " + slot.layer + " has a weight of " +
                                  std::to_string(slot.weight.size()) + " dimensions" + kReexport);
            out.lora_slots.push_back(std::move(slot));
        }
    }
    if (out.inputs.size() < 2 * out.lora_slots.size())
        throw model_error(mpath + ": the " + network + " contract has fewer inputs than its LoRA slots need" + kReexport);
    for (size_t i = 0; i < out.lora_slots.size(); ++i) {
        const std::string &layer = out.lora_slots[i].layer, &sep = out.lora_slots[i].sep;
        size_t at = out.plain_inputs() + 2 * i;
        if (out.inputs[at] != "lora_down" + sep + layer || out.inputs[at + 1] != "lora_up" + sep + layer)
            throw model_error(mpath + ": the " + network + " contract's inputs " + out.inputs[at] + ", " + out.inputs[at + 1] +
                              " are not LoRA slot " + layer + "'s lora_down/lora_up" + kReexport);
    }
    return out;
}

ExportFolder read_export(const std::string &path) {
    if (path.empty()) throw input_error("model_dir is empty; pass an sdrt export folder (made with `sdrt export`)");
    if (!is_directory(path))
        throw model_error("model folder " + path + " does not exist or is not a folder; pass an sdrt export (made with `sdrt export`)");
    std::string mpath = join_path(path, "manifest.json");
    if (!file_exists(mpath)) {
        bool diffusers = file_exists(join_path(path, "unet/config.json"));
        throw model_error(path + " has no manifest.json; it is not an sdrt export" +
                          std::string(diffusers ? " but a diffusers folder: export it first with `sdrt export " + path + " OUT`"
                                                : " (create one with `sdrt export`)"));
    }
    const std::string text = read_file(mpath);
    Json m = Json::parse(text, mpath);
    ExportFolder ex;
    ex.path = path;
    uint64_t h = 1469598103934665603ull;  // FNV-1a
    for (unsigned char ch : text) h = (h ^ ch) * 1099511628211ull;
    char hex[17];
    std::snprintf(hex, sizeof hex, "%016llx", static_cast<unsigned long long>(h));
    ex.manifest_digest = hex;
    try {
        const Json *fmt = m.find("format");
        if (!fmt || !fmt->is_string() || fmt->as_string() != "sdrt-export")
            throw model_error(mpath + " is not an sdrt export manifest" + kReexport);
        const Json *ver = m.find("format_version");
        if (!ver || !ver->is_number() || ver->as_number() != 1)
            throw model_error(mpath + " has manifest format " + (ver && ver->is_number() ? std::to_string(ver->as_int()) : "?") +
                              ", this sdrt reads 1; re-export the model with this version's `sdrt export`");
        const Json &f = m.at("facts");
        ModelFacts &facts = ex.facts;
        facts.family = f.at("family").as_string();
        facts.prediction_type = f.at("prediction_type").as_string();
        facts.latent_channels = int(f.at("latent_channels").as_int());
        facts.vae_scale_factor = int(f.at("vae_scale_factor").as_int());
        facts.scaling_factor = f.at("scaling_factor").as_number();
        facts.unet_downsamples = int(f.at("unet_downsamples").as_int());
        facts.text_seq_len = int(f.at("text_seq_len").as_int());
        facts.text_hidden_size = int(f.at("text_hidden_size").as_int());
        facts.cross_attention_dim = int(f.at("cross_attention_dim").as_int());
        facts.default_size = int(f.at("default_size").as_int());
        facts.vocab_size = int(f.at("vocab_size").as_int());
        // An inpainting UNet takes [latents, mask, masked-image latents]; older manifests lack the key (= latents).
        const Json *uin = f.find("unet_in_channels");
        facts.unet_in_channels = uin && uin->is_number() ? int(uin->as_int()) : facts.latent_channels;
        if (facts.unet_in_channels != facts.latent_channels && facts.unet_in_channels != 2 * facts.latent_channels + 1)
            throw model_error(mpath + "'s UNet takes " + std::to_string(facts.unet_in_channels) + " input channels: neither a "
                              "text-to-image nor an inpainting UNet; re-export the model with `sdrt export`");
        auto int_or = [&](const char *key) { const Json *v = f.find(key); return v ? int(v->as_int()) : 0; };
        auto bool_or = [&](const char *key) { const Json *v = f.find(key); return v && v->as_bool(); };
        facts.text_hidden_size_2 = int_or("text_hidden_size_2");
        facts.pooled_dim = int_or("pooled_dim");
        facts.time_ids_dim = int_or("time_ids_dim");
        facts.pool_at_argmax = bool_or("pool_at_argmax");
        facts.requires_aesthetics_score = bool_or("requires_aesthetics_score");
        facts.force_zeros_for_empty_prompt = bool_or("force_zeros_for_empty_prompt");
        auto channels_or_empty = [&](const char *key) {
            std::vector<float> out;
            const Json *v = f.find(key);
            if (!v || v->is_null()) return out;
            if (!v->is_array() || v->as_array().size() != size_t(facts.latent_channels))
                throw model_error(mpath + "'s " + key + " is not one number per latent channel" + kReexport);
            for (const Json &x : v->as_array()) out.push_back(float(x.as_number()));
            return out;
        };
        facts.latents_mean = channels_or_empty("latents_mean");
        facts.latents_std = channels_or_empty("latents_std");
        if (facts.latents_mean.empty() != facts.latents_std.empty())
            throw model_error(mpath + " has only one of latents_mean and latents_std" + kReexport);
        for (float s : facts.latents_std)
            if (!(s > 0.0f)) throw model_error(mpath + "'s latents_std holds a value that is not positive" + kReexport);
        if (facts.latent_channels < 1 || facts.vae_scale_factor < 1 || facts.unet_downsamples < 0 || facts.unet_downsamples > 8 ||
            facts.text_seq_len < 2 || (facts.text_hidden_size < 1 && facts.text_hidden_size_2 < 1) ||
            facts.cross_attention_dim < 1 || facts.default_size < 1 || facts.time_ids_dim < 0 || facts.time_ids_dim > 16 ||
            (facts.time_ids_dim && facts.pooled_dim < 1))
            throw model_error(mpath + " has model facts out of range" + kReexport);

        ex.family = read_family(m, mpath, facts.family);
        for (const auto &kv : m.at("contracts").as_object())
            ex.contracts[kv.first] = read_contract(kv.first, kv.second, mpath);
        const Json &networks = m.at("networks");
        for (const Role &role : kRoles) {
            const std::string name = role.network;
            bool listed = std::find(ex.family.networks.begin(), ex.family.networks.end(), name) != ex.family.networks.end();
            if (!listed || !networks.find(name)) {
                if (role.required) throw model_error(mpath + " has no " + name + " network" + kReexport);
                continue;
            }
            auto c = ex.contracts.find(name);
            if (c == ex.contracts.end()) throw model_error(mpath + " lists network " + name + " without a contract" + kReexport);
            size_t inputs = role.inputs + (name == kUnet ? ex.family.conditioning.size() : 0);
            if (c->second.plain_inputs() != inputs || c->second.outputs.size() != role.outputs)
                throw model_error(mpath + ": the " + name + " contract has " + std::to_string(c->second.plain_inputs()) + " inputs and " +
                                  std::to_string(c->second.outputs.size()) + " outputs; the C++ runtime feeds " + std::to_string(inputs) +
                                  " and reads " + std::to_string(role.outputs) + kReexport);
            if (name == kUnet && c->second.inputs[2] != ex.family.conditioning[0])
                throw model_error(mpath + ": the unet contract's third input is " + c->second.inputs[2] + " but the family's "
                                  "conditioning is " + ex.family.conditioning[0] + kReexport);
            ex.network_files[name] = join_path(path, networks.at(name).at("file").as_string());
            if (const Json *split = networks.at(name).find("step_split")) {
                const std::string &file = ex.network_files[name], dir = file.substr(0, file.rfind('/'));
                ex.split_files[name] = {join_path(dir, split->at("prepass").as_string()), join_path(dir, split->at("step").as_string())};
            }
        }
        if (!ex.network_files.count(kTextEncoder) && !ex.network_files.count(kTextEncoder2))
            throw model_error(mpath + " has no text encoder network" + kReexport);
        if ((ex.family.conditioning.size() == 3) != (facts.time_ids_dim > 0))
            throw model_error(mpath + ": the family's UNet conditioning and the facts' time ids disagree" + kReexport);

        auto str_or = [&](const char *key, const char *fallback) {
            const Json *v = m.find(key);
            return v && v->is_string() ? v->as_string() : std::string(fallback);
        };
        ex.tokenizer_dir = join_path(path, str_or("tokenizer", "tokenizer"));
        ex.scheduler_config = join_path(path, str_or("scheduler", "scheduler/scheduler_config.json"));
        ex.token_embeddings = join_path(path, str_or("token_embeddings", "token_embeddings.safetensors"));
        // SDXL: every text encoder's tokenizer and table (extras.text_encoders); SD: the manifest's own pair.
        const Json *extras = m.find("extras");
        const Json *saved = extras ? extras->find("text_encoders") : nullptr;
        for (const auto &n : ex.family.networks) {
            if (n != kTextEncoder && n != kTextEncoder2) continue;
            if (saved && saved->find(n)) {
                const Json &t = saved->at(n);
                ex.text_encoders.push_back({n, join_path(path, t.at("tokenizer").as_string()),
                                            join_path(path, t.at("token_embeddings").as_string())});
            } else if (ex.text_encoders.empty()) {
                ex.text_encoders.push_back({n, ex.tokenizer_dir, ex.token_embeddings});
            } else {
                throw model_error(mpath + " lacks extras.text_encoders for " + n + kReexport);
            }
        }

        // The cheap load-time check: every file is there at its recorded size.
        for (const auto &kv : m.at("files").as_object()) {
            std::string p = join_path(path, kv.first);
            long long size = file_size(p), want = kv.second.at("size").as_int();
            if (size < 0) throw model_error(path + " is missing " + kv.first + "; the export is incomplete" + kReexport);
            if (size != want)
                throw model_error(p + " is " + std::to_string(size) + " bytes but the manifest says " + std::to_string(want) +
                                  ": the file is truncated or was changed" + kReexport);
        }
    } catch (const Error &e) {
        std::string msg = e.what();
        if (msg.rfind("a JSON", 0) == 0) msg = mpath + ": " + msg + kReexport;  // a missing key or a wrong type
        throw model_error(msg);
    }
    return ex;
}

TokenTable read_token_table(const std::string &path) {
    std::string data = read_file(path);
    auto bad = [&](const std::string &why) { return model_error(path + " is not a valid safetensors file (" + why + ")" + kReexport); };
    if (data.size() < 8) throw bad("shorter than its header");
    uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<unsigned char>(data[size_t(i)]);
    if (n > data.size() - 8) throw bad("header length past the end");
    Json header = Json::parse(data.substr(8, size_t(n)), path + " (header)");
    const Json *entry = nullptr;
    for (const char *key : {"token_embedding", "embeddings.token_embedding.weight", "text_model.embeddings.token_embedding.weight"})
        if ((entry = header.find(key))) break;
    if (!entry) throw model_error(path + " holds no token-embedding table (looked for token_embedding)" + kReexport);
    const std::string &dtype = entry->at("dtype").as_string();
    const auto &shape = entry->at("shape").as_array();
    const auto &offsets = entry->at("data_offsets").as_array();
    if (shape.size() != 2 || offsets.size() != 2) throw bad("the token table is not 2-D");
    TokenTable t;
    t.rows = int(shape[0].as_int());
    t.hidden = int(shape[1].as_int());
    size_t begin = size_t(offsets[0].as_int()), end = size_t(offsets[1].as_int()), base = 8 + size_t(n);
    size_t count = size_t(t.rows) * size_t(t.hidden);
    size_t width = float_width(dtype);
    if (!width) throw model_error(path + ": the token table's dtype " + dtype + " is not supported (F32, F16, BF16, F64)");
    if (t.rows < 1 || t.hidden < 1 || end < begin || end - begin != count * width || base + end > data.size())
        throw bad("the token table's offsets do not match its shape");
    const char *p = data.data() + base + begin;
    t.data.resize(count);
    widen_floats(p, count, dtype, t.data.data());
    return t;
}

std::string check_size(const ModelFacts &facts, int height, int width) {
    int step = facts.size_step();
    for (int which = 0; which < 2; ++which) {
        int value = which ? width : height;
        if (value > (1 << 16))
            return std::string(which ? "width " : "height ") + std::to_string(value) + " is too large; use at most 65536";
        if (value < step || value % step) {
            int lower = std::max(step, value / step * step), upper = std::max(step, (value + step - 1) / step * step);
            std::string options = lower == upper ? std::to_string(lower) : std::to_string(lower) + " or " + std::to_string(upper);
            return std::string(which ? "width " : "height ") + std::to_string(value) + " is not a multiple of " +
                   std::to_string(step) + " for this model; use " + options;
        }
    }
    return "";
}

}  // namespace sdrt
