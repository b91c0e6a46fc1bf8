// The ONNX Runtime backend (see backend.h) over ORT's C++ API. The API table is fetched by hand
// (ORT_API_MANUAL_INIT) so that an ONNX Runtime older than the headers is an error message, not a crash.
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <fstream>
#include <mutex>

#include "backend.h"
#include "util.h"

namespace sdrt {

namespace {

const OrtApi *init_api() {
    static const OrtApi *api = nullptr;
    static std::once_flag once;
    std::call_once(once, [] {
        const OrtApiBase *base = OrtGetApiBase();
        api = base ? base->GetApi(ORT_API_VERSION) : nullptr;
        if (api) Ort::InitApi(api);
    });
    if (!api) {
        const OrtApiBase *base = OrtGetApiBase();
        throw Error(SDRT_ERR_BACKEND, std::string("the ONNX Runtime library (") + (base ? base->GetVersionString() : "?") +
                                          ") is older than the headers sdrt was built with (API " + std::to_string(ORT_API_VERSION) +
                                          "); use ONNX Runtime 1." + std::to_string(ORT_API_VERSION) + " or newer");
    }
    return api;
}

Ort::Env &env() {
    static Ort::Env e(ORT_LOGGING_LEVEL_ERROR, "sdrt");  // one per process, shared by every context
    return e;
}

// "sample:1x4x8x8,timestep:1" (the TensorRT provider's shape format) for one network at one end of the profile;
// the tensor names are the contract's inputs, by position (read_export checked how many each network has). LoRA
// slots (the manifest's lora_slots table) at `rank`: down [rank, in(, kh, kw)], up [out, rank(, 1, 1)]. The provider
// cuts each entry at its first ':' and the list at ',', so a name holding either (the slots of exports made before
// 2026-12-05: lora_down:<layer>) is left out, as the Python runtime does; the provider then sizes it from its feeds.
std::string profile_shapes(const std::string &network, const NetworkContract &c, const ModelFacts &f, int batch, int unet_batch,
                           int size, int64_t rank) {
    size = std::max(f.size_step(), size / f.size_step() * f.size_step());
    auto dims = [](std::initializer_list<int> d) {
        std::string s;
        for (int x : d) s += (s.empty() ? "" : "x") + std::to_string(x);
        return s;
    };
    const int lat = size / f.vae_scale_factor;
    std::vector<std::string> shapes;
    if (network == kTextEncoder) shapes = {dims({batch, f.text_seq_len, f.text_hidden_size})};
    if (network == kTextEncoder2) shapes = {dims({batch, f.text_seq_len, f.text_hidden_size_2}), dims({batch, f.text_seq_len})};
    if (network == kUnet) {
        shapes = {dims({unet_batch, f.unet_in_channels, lat, lat}), dims({unet_batch}), dims({unet_batch, f.text_seq_len, f.cross_attention_dim})};
        if (f.time_ids_dim) shapes.insert(shapes.end(), {dims({unet_batch, f.pooled_dim}), dims({unet_batch, f.time_ids_dim})});
    }
    if (network == kVaeEncoder) shapes = {dims({batch, 3, size, size})};
    if (network == kVaeDecoder) shapes = {dims({batch, f.latent_channels, lat, lat})};
    std::string out;
    for (size_t i = 0; i < shapes.size() && i < c.inputs.size(); ++i) out += (i ? "," : "") + c.inputs[i] + ":" + shapes[i];
    auto joined = [](const std::vector<int64_t> &d) {
        std::string s;
        for (int64_t x : d) s += (s.empty() ? "" : "x") + std::to_string(x);
        return s;
    };
    for (size_t i = 0; i < c.lora_slots.size(); ++i) {
        const LoraSlot &slot = c.lora_slots[i];
        const std::string &down = c.inputs[c.plain_inputs() + 2 * i], &up = c.inputs[c.plain_inputs() + 2 * i + 1];
        if (down.find_first_of(":,") != std::string::npos || up.find_first_of(":,") != std::string::npos) continue;
        std::vector<int64_t> d{rank, slot.weight[1]}, u{slot.weight[0], rank};
        if (slot.weight.size() == 4) {
            d.insert(d.end(), {slot.weight[2], slot.weight[3]});
            u.insert(u.end(), {1, 1});
        }
        out += (out.empty() ? "" : ",") + down + ":" + joined(d) + "," + up + ":" + joined(u);
    }
    return out;
}

ShapeLimits read_limits(const std::string &export_path) {
    ShapeLimits l;
    try {
        Json m = Json::parse_file(join_path(export_path, "manifest.json"));
        if (const Json *j = m.find("limits")) {
            if (const Json *v = j->find("min_size")) l.min_size = int(v->as_int());
            if (const Json *v = j->find("opt_size")) l.opt_size = int(v->as_int());
            if (const Json *v = j->find("max_size")) l.max_size = int(v->as_int());
            if (const Json *v = j->find("max_batch")) l.max_batch = int(v->as_int());
            if (const Json *v = j->find("max_lora_rank")) l.max_lora_rank = int(v->as_int());
        }
    } catch (const std::exception &) {  // read_export already checked the manifest; defaults otherwise
    }
    return l;
}

class OnnxBackend : public Backend {
public:
    OnnxBackend(const ExportFolder &model, const BackendOptions &opt) : contracts_(model.contracts) {
        std::vector<std::string> available = Ort::GetAvailableProviders();
        auto has_provider = [&](const char *p) { return std::find(available.begin(), available.end(), p) != available.end(); };
        bool want_trt = opt.provider == SDRT_BACKEND_ORT_TENSORRT, want_cuda = opt.provider == SDRT_BACKEND_ORT_CUDA || want_trt;
        bool auto_cuda = opt.provider == SDRT_BACKEND_AUTO && has_provider("CUDAExecutionProvider");
        if ((want_cuda && !has_provider("CUDAExecutionProvider")) || (want_trt && !has_provider("TensorrtExecutionProvider")))
            throw Error(SDRT_ERR_UNSUPPORTED, std::string("the loaded ONNX Runtime (") + Ort::GetVersionString() + ") has no " +
                                                  (want_trt ? "TensorRT" : "CUDA") + " execution provider; use a GPU build of "
                                                  "ONNX Runtime (onnxruntime-gpu), or SDRT_BACKEND_ORT_CPU");
        const ShapeLimits limits = read_limits(model.path);
        // ORT's engine cache does not notice a new ONNX Runtime or export by itself: key its folder by both.
        uint64_t h = 1469598103934665603ull;  // FNV-1a
        for (unsigned char ch : Ort::GetVersionString() + "|" + model.manifest_digest) h = (h ^ ch) * 1099511628211ull;
        char hex[17];
        std::snprintf(hex, sizeof hex, "%016llx", static_cast<unsigned long long>(h));
        const std::string trt_cache = join_path(join_path(model.path, ".ort_trt_cache"), std::string("cpp-") + hex);
        if (want_trt) {
            mkdir(join_path(model.path, ".ort_trt_cache").c_str(), 0755);  // a read-only export: engines are rebuilt each time
            mkdir(trt_cache.c_str(), 0755);
        }
        for (const auto &kv : model.network_files) {
            std::string used;
            OrtSessionPlan plan = plan_ort_session(opt, want_trt, want_cuda || auto_cuda, kv.first, model.contracts.at(kv.first),
                                                   model.facts, limits, trt_cache);
            const std::string cache_dir = join_path(model.path, ".ort_cache");
            auto split = model.split_files.find(kv.first);
            if (split != model.split_files.end() && !plan.cuda && file_exists(split->second.first) && file_exists(split->second.second)) {
                splits_[kv.first] = load_split(kv.first, split->second, model.manifest_digest, cache_dir, opt, plan, used);
            } else {
                sessions_[kv.first] = load(kv.first, kv.second, model.manifest_digest, cache_dir, opt, plan, used);
            }
            providers_ = used;
        }
    }

    bool has(const std::string &network) const override { return sessions_.count(network) != 0 || splits_.count(network) != 0; }

    void run(const std::string &network, const std::vector<TensorIn> &inputs, const std::vector<TensorOut> &outputs) override {
        auto split = splits_.find(network);
        if (split != splits_.end()) return run_split(network, *split->second, inputs, outputs);
        auto it = sessions_.find(network);
        if (it == sessions_.end()) throw model_error("this export has no " + network + " network; re-export the model with `sdrt export`");
        const NetworkContract &c = contracts_.at(network);
        Ort::MemoryInfo mem = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
        std::vector<Ort::Value> in, out;
        std::vector<const char *> in_names, out_names;
        for (size_t i = 0; i < inputs.size(); ++i) {
            in.push_back(float_view(mem, inputs[i].data, inputs[i].shape));
            in_names.push_back(c.inputs[i].c_str());
        }
        bind_outputs(c, mem, outputs, out, out_names);
        try {
            it->second->Run(run_options_, in_names.data(), in.data(), in.size(), out_names.data(), out.data(), out.size());
        } catch (const Ort::Exception &e) {
            run_failed(network, e);
        }
    }

    std::string describe() const override {
        std::string text = "onnxruntime " + Ort::GetVersionString() + " on " + providers_;
        for (const auto &kv : splits_) text += "; step-invariant prepass for " + kv.first;
        return text;
    }
    void reset_cancel() override {
        std::lock_guard<std::mutex> lock(cancel_mutex_);
        cancelled_ = false;
        run_options_.UnsetTerminate();
    }
    void cancel() override {
        std::lock_guard<std::mutex> lock(cancel_mutex_);
        cancelled_ = true;
        run_options_.SetTerminate();
    }

private:
    const OrtApi *api_ = init_api();  // first: the members below call the API when they are constructed
    std::map<std::string, NetworkContract> contracts_;
    std::map<std::string, std::unique_ptr<Ort::Session>> sessions_;
    // A UNet exported with its step split (sdrt.export.step_split), on CPU: the prepass runs when the fixed inputs
    // (all but the sample and timestep) differ from the last call's, the step graph every call; as the Python backend
    // (runtime/backends/onnx_split.py), with the last set of fixed inputs kept (one generation at a time per context).
    struct StepSplit {
        std::unique_ptr<Ort::Session> prepass, step;
        std::vector<std::string> fixed, carried, step_inputs;  // prepass inputs, prepass outputs, step inputs
        std::vector<size_t> fixed_index;  // each prepass input's position in the contract
        std::vector<long> step_source;  // each step input: its contract position, or -1 - its carried position
        std::vector<std::vector<float>> kept_inputs;
        std::vector<std::vector<int64_t>> kept_shapes;
        std::vector<Ort::Value> carried_values;
        std::mutex mutex;
    };
    std::map<std::string, std::unique_ptr<StepSplit>> splits_;
    Ort::RunOptions run_options_;
    std::mutex cancel_mutex_;
    std::atomic<bool> cancelled_{false};
    std::string providers_ = "CPUExecutionProvider";

    // Session options with the plan's providers appended (TensorRT, CUDA, then CPU); `used` names them.
    static Ort::SessionOptions options(const BackendOptions &opt, const OrtSessionPlan &plan, GraphOptimizationLevel level, std::string &used) {
        Ort::SessionOptions so;
        so.SetGraphOptimizationLevel(level);
        so.SetExecutionMode(ExecutionMode::ORT_SEQUENTIAL);
        so.SetLogSeverityLevel(3);
        if (opt.threads > 0) so.SetIntraOpNumThreads(opt.threads);
        used = "CPUExecutionProvider";
        if (!plan.cuda) return so;
        auto keys_values = [](const std::vector<std::pair<std::string, std::string>> &kv, std::vector<const char *> &k,
                              std::vector<const char *> &v) {
            for (const auto &p : kv) k.push_back(p.first.c_str()), v.push_back(p.second.c_str());
        };
        const OrtApi &api = Ort::GetApi();
        if (plan.tensorrt) {
            std::vector<const char *> k, v;
            keys_values(plan.tensorrt_options, k, v);
            OrtTensorRTProviderOptionsV2 *t = nullptr;
            Ort::ThrowOnError(api.CreateTensorRTProviderOptions(&t));
            Ort::Status st(api.UpdateTensorRTProviderOptions(t, k.data(), v.data(), k.size()));
            if (st.IsOK()) so.AppendExecutionProvider_TensorRT_V2(*t);
            api.ReleaseTensorRTProviderOptions(t);
            if (!st.IsOK()) throw Ort::Exception(st.GetErrorMessage(), st.GetErrorCode());
        }
        std::vector<const char *> k, v;
        keys_values(plan.cuda_options, k, v);
        OrtCUDAProviderOptionsV2 *c = nullptr;
        Ort::ThrowOnError(api.CreateCUDAProviderOptions(&c));
        Ort::Status st(api.UpdateCUDAProviderOptions(c, k.data(), v.data(), k.size()));
        if (st.IsOK()) so.AppendExecutionProvider_CUDA_V2(*c);
        api.ReleaseCUDAProviderOptions(c);
        if (!st.IsOK()) throw Ort::Exception(st.GetErrorMessage(), st.GetErrorCode());
        used = std::string(plan.tensorrt ? "TensorrtExecutionProvider, " : "") + "CUDAExecutionProvider, CPUExecutionProvider";
        return so;
    }

    std::unique_ptr<Ort::Session> load(const std::string &network, const std::string &file, const std::string &digest,
                                       const std::string &dir, const BackendOptions &opt, const OrtSessionPlan &plan, std::string &used,
                                       bool part = false) {
        const bool cuda = plan.cuda;
        try {
            try {
                return load_cached(network, file, digest, dir, opt, plan, used, part);
            } catch (const Ort::Exception &e) {
                if (!cuda || opt.provider != SDRT_BACKEND_AUTO) throw;
                BackendOptions cpu{SDRT_BACKEND_ORT_CPU, opt.threads, opt.device_id};
                auto session = load_cached(network, file, digest, dir, cpu, OrtSessionPlan{}, used, part);
                used = "CPUExecutionProvider (no usable GPU: " + std::string(e.what()).substr(0, 120) + ")";
                return session;
            }
        } catch (const Ort::Exception &e) {
            std::string first = e.what();
            first = first.substr(0, std::min(first.find('\n'), size_t(300)));
            if (cuda && opt.provider != SDRT_BACKEND_AUTO)
                throw Error(SDRT_ERR_BACKEND, "ONNX Runtime could not run " + file + " on its GPU provider: " + first);
            throw model_error("ONNX Runtime could not load " + file + " (" + first + "); the file is damaged or from an "
                              "incompatible export: re-export the model with `sdrt export`");
        }
    }

    // As the Python backend does: the graph optimised once at ORT_ENABLE_ALL is saved in <export>/.ort_cache/ (named
    // cpp-<network>-<key>, apart from the Python runtime's files), keyed by the ONNX file's size and mtime, the whole
    // manifest (every file's sha256, so shared weight files too), the ONNX Runtime version, providers, threads and
    // CPU; later loads skip the optimisers. A damaged cache is rebuilt; an
    // unwritable folder only costs the cache.
    // `part`: one graph of a step split (named <network>.prepass / <network>.step), checked by load_split instead.
    std::unique_ptr<Ort::Session> load_cached(const std::string &network, const std::string &file, const std::string &digest,
                                              const std::string &dir, const BackendOptions &opt, const OrtSessionPlan &plan,
                                              std::string &used, bool part = false) {
        Ort::SessionOptions so = options(opt, plan, GraphOptimizationLevel::ORT_ENABLE_ALL, used);
        struct stat st;
        if (stat(file.c_str(), &st) != 0) throw model_error(file + " is missing; re-export the model with `sdrt export`");
        if (!plan.cache_optimized_model) {  // the TensorRT provider: ORT cannot save its compiled graph
            auto session = std::make_unique<Ort::Session>(env(), file.c_str(), so);
            if (!part) check(*session, network, file);
            return session;
        }
        std::string key = file.substr(file.rfind('/') + 1) + "|" + std::to_string(st.st_size) + "|" + std::to_string(st.st_mtim.tv_sec) +
                          "." + std::to_string(st.st_mtim.tv_nsec) + "|" + Ort::GetVersionString() + "|" + used + "|" +
                          std::to_string(opt.threads) + "|" + cpu_name() + "|" + digest;
        uint64_t h = 1469598103934665603ull;  // FNV-1a
        for (unsigned char ch : key) h = (h ^ ch) * 1099511628211ull;
        char hex[17];
        std::snprintf(hex, sizeof hex, "%016llx", static_cast<unsigned long long>(h));
        const std::string stem = "cpp-" + network + "-" + hex, cache = dir + "/" + stem + ".onnx";
        if (file_exists(cache)) {
            try {
                std::string ignored;
                Ort::SessionOptions cached = options(opt, plan, GraphOptimizationLevel::ORT_DISABLE_ALL, ignored);
                auto session = std::make_unique<Ort::Session>(env(), cache.c_str(), cached);
                if (!part) check(*session, network, cache);
                return session;
            } catch (const std::exception &) {  // stale or damaged: rebuilt below
            }
        }
        std::string tmp;
        if ((is_directory(dir) || mkdir(dir.c_str(), 0755) == 0) && access(dir.c_str(), W_OK) == 0) {
            static std::atomic<unsigned> counter{0};  // two contexts loading at once in one process
            std::string pid = std::to_string(getpid()) + "." + std::to_string(counter++);
            tmp = dir + "/" + stem + "-" + pid + ".onnx.tmp";
            so.SetOptimizedModelFilePath(tmp.c_str());
            so.AddConfigEntry("session.optimized_model_external_initializers_file_name", (stem + "-" + pid + ".data").c_str());
            so.AddConfigEntry("session.optimized_model_external_initializers_min_size_in_bytes", "1024");
        }
        auto session = std::make_unique<Ort::Session>(env(), file.c_str(), so);
        if (!part) check(*session, network, file);
        if (!tmp.empty() && file_exists(tmp)) {
            if (std::rename(tmp.c_str(), cache.c_str()) == 0) prune(dir, "cpp-" + network + "-", stem);
            std::remove(tmp.c_str());
        }
        return session;
    }

    std::unique_ptr<StepSplit> load_split(const std::string &network, const std::pair<std::string, std::string> &files,
                                          const std::string &digest, const std::string &dir, const BackendOptions &opt,
                                          const OrtSessionPlan &plan, std::string &used) {
        auto s = std::make_unique<StepSplit>();
        s->prepass = load(network + ".prepass", files.first, digest, dir, opt, plan, used, true);
        s->step = load(network + ".step", files.second, digest, dir, opt, plan, used, true);
        Ort::AllocatorWithDefaultOptions alloc;
        for (size_t i = 0; i < s->prepass->GetInputCount(); ++i) s->fixed.push_back(s->prepass->GetInputNameAllocated(i, alloc).get());
        for (size_t i = 0; i < s->prepass->GetOutputCount(); ++i) s->carried.push_back(s->prepass->GetOutputNameAllocated(i, alloc).get());
        for (size_t i = 0; i < s->step->GetInputCount(); ++i) s->step_inputs.push_back(s->step->GetInputNameAllocated(i, alloc).get());
        std::vector<std::string> outs;
        for (size_t i = 0; i < s->step->GetOutputCount(); ++i) outs.push_back(s->step->GetOutputNameAllocated(i, alloc).get());
        const NetworkContract &c = contracts_.at(network);
        auto position = [](const std::vector<std::string> &names, const std::string &name) {
            return long(std::find(names.begin(), names.end(), name) - names.begin());
        };
        bool ok = outs == c.outputs;
        for (const auto &name : s->fixed) {
            long i = position(c.inputs, name);
            ok &= i < long(c.inputs.size());
            s->fixed_index.push_back(size_t(i));
        }
        for (const auto &name : s->step_inputs) {
            long i = position(c.inputs, name), k = position(s->carried, name);
            ok &= i < long(c.inputs.size()) || k < long(s->carried.size());
            s->step_source.push_back(i < long(c.inputs.size()) ? i : -1 - k);
        }
        if (!ok)
            throw model_error(files.second + " and " + files.first + " (the " + network + " network's step split) do not match the "
                              "manifest's " + network + " contract: the export is mismatched; re-export it with `sdrt export`");
        return s;
    }

    static size_t element_count(const std::vector<int64_t> &shape) {
        size_t n = 1;
        for (int64_t d : shape) n *= size_t(d);
        return n;
    }
    static Ort::Value float_view(const Ort::MemoryInfo &mem, const float *data, const std::vector<int64_t> &shape) {
        return Ort::Value::CreateTensor<float>(mem, const_cast<float *>(data), element_count(shape), shape.data(), shape.size());
    }
    // The caller's output buffers as ORT values, named in contract order.
    static void bind_outputs(const NetworkContract &c, const Ort::MemoryInfo &mem, const std::vector<TensorOut> &outputs,
                             std::vector<Ort::Value> &out, std::vector<const char *> &names) {
        for (size_t i = 0; i < outputs.size(); ++i) {
            out.push_back(float_view(mem, outputs[i].data, outputs[i].shape));
            names.push_back(c.outputs[i].c_str());
        }
    }
    [[noreturn]] void run_failed(const std::string &network, const Ort::Exception &e) const {
        if (cancelled_) throw Error(SDRT_ERR_CANCELLED, "cancelled by sdrt_request_cancel during the " + network + " network");
        throw Error(SDRT_ERR_BACKEND, "ONNX Runtime failed running the " + network + " network: " + e.what());
    }

    void run_split(const std::string &network, StepSplit &s, const std::vector<TensorIn> &inputs, const std::vector<TensorOut> &outputs) {
        std::lock_guard<std::mutex> lock(s.mutex);
        const NetworkContract &c = contracts_.at(network);
        Ort::MemoryInfo mem = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
        bool same = s.kept_inputs.size() == s.fixed.size();
        for (size_t k = 0; same && k < s.fixed.size(); ++k) {
            const TensorIn &t = inputs[s.fixed_index[k]];
            same = t.shape == s.kept_shapes[k] && std::equal(t.data, t.data + element_count(t.shape), s.kept_inputs[k].begin());
        }
        try {
            if (!same) {
                std::vector<Ort::Value> in;
                std::vector<const char *> in_names, out_names;
                for (size_t k = 0; k < s.fixed.size(); ++k) {
                    const TensorIn &t = inputs[s.fixed_index[k]];
                    in.push_back(float_view(mem, t.data, t.shape));
                    in_names.push_back(s.fixed[k].c_str());
                }
                for (const auto &name : s.carried) out_names.push_back(name.c_str());
                s.kept_inputs.clear(), s.kept_shapes.clear();
                s.carried_values = s.prepass->Run(run_options_, in_names.data(), in.data(), in.size(), out_names.data(), out_names.size());
                for (size_t k = 0; k < s.fixed.size(); ++k) {
                    const TensorIn &t = inputs[s.fixed_index[k]];
                    s.kept_inputs.emplace_back(t.data, t.data + element_count(t.shape));
                    s.kept_shapes.push_back(t.shape);
                }
            }
            // The step graph's inputs: the caller's (as views) and the carried prepass outputs themselves (float, or int64
            // shape values), passed as OrtValue pointers through the C API, which takes them side by side.
            std::vector<Ort::Value> views, out;
            std::vector<const OrtValue *> in;
            std::vector<const char *> in_names, out_names;
            for (size_t j = 0; j < s.step_inputs.size(); ++j) {
                long i = s.step_source[j];
                if (i >= 0) {
                    views.push_back(float_view(mem, inputs[size_t(i)].data, inputs[size_t(i)].shape));
                    in.push_back(views.back());
                } else {
                    in.push_back(s.carried_values[size_t(-1 - i)]);
                }
                in_names.push_back(s.step_inputs[j].c_str());
            }
            bind_outputs(c, mem, outputs, out, out_names);
            std::vector<OrtValue *> out_values(out.begin(), out.end());
            Ort::ThrowOnError(Ort::GetApi().Run(*s.step, run_options_, in_names.data(), in.data(), in.size(), out_names.data(),
                                                out_names.size(), out_values.data()));
        } catch (const Ort::Exception &e) {
            s.kept_inputs.clear();  // a cancelled or failed prepass leaves nothing to reuse
            run_failed(network, e);
        }
    }

    // Removes this network's older cache files (other keys), keeping `stem`'s model and its data file.
    static void prune(const std::string &dir, const std::string &prefix, const std::string &stem) {
        DIR *d = opendir(dir.c_str());
        if (!d) return;
        const std::string data_prefix = stem + "-";
        std::vector<std::string> old;
        while (dirent *e = readdir(d)) {
            std::string n = e->d_name;
            bool ours = n == stem + ".onnx" || (n.rfind(data_prefix, 0) == 0 && n.size() > 5 && n.substr(n.size() - 5) == ".data");
            if (n.rfind(prefix, 0) == 0 && !ours && n.find(".tmp") == std::string::npos) old.push_back(n);
        }
        closedir(d);
        for (const auto &n : old) std::remove((dir + "/" + n).c_str());
    }

    static std::string cpu_name() {
        std::ifstream f("/proc/cpuinfo");
        std::string line;
        while (std::getline(f, line))
            if (line.rfind("model name", 0) == 0) return line.substr(line.find(':') + 1);
        return "unknown";
    }

    // The ONNX file must take and give the manifest contract's tensors, in its order.
    void check(Ort::Session &s, const std::string &network, const std::string &file) const {
        Ort::AllocatorWithDefaultOptions alloc;
        const NetworkContract &want = contracts_.at(network);
        std::vector<std::string> ins, outs;
        bool all_float = true;
        for (size_t i = 0; i < s.GetInputCount(); ++i) {
            ins.push_back(s.GetInputNameAllocated(i, alloc).get());
            all_float &= s.GetInputTypeInfo(i).GetTensorTypeAndShapeInfo().GetElementType() == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
        }
        for (size_t i = 0; i < s.GetOutputCount(); ++i) {
            outs.push_back(s.GetOutputNameAllocated(i, alloc).get());
            all_float &= s.GetOutputTypeInfo(i).GetTensorTypeAndShapeInfo().GetElementType() == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
        }
        if (ins != want.inputs || outs != want.outputs || !all_float) {
            auto join = [](const std::vector<std::string> &v) {
                std::string s;
                for (const auto &x : v) s += (s.empty() ? "" : ", ") + x;
                return "[" + s + "]";
            };
            throw model_error(file + " takes " + join(ins) + " and gives " + join(outs) + " but the " + network + " contract says " +
                              join(want.inputs) + " -> " + join(want.outputs) + " (float32): the export is mismatched; re-export "
                              "it with `sdrt export`");
        }
    }
};

}  // namespace

OrtSessionPlan plan_ort_session(const BackendOptions &opt, bool tensorrt, bool cuda, const std::string &network,
                                const NetworkContract &contract, const ModelFacts &facts, const ShapeLimits &limits,
                                const std::string &trt_cache_dir) {
    OrtSessionPlan plan;
    plan.cuda = cuda || tensorrt;
    plan.tensorrt = tensorrt;
    const std::string dev = std::to_string(opt.device_id);
    if (plan.cuda) plan.cuda_options = {{"device_id", dev}};
    if (!tensorrt) return plan;
    plan.cache_optimized_model = false;
    const int b = std::max(1, limits.max_batch), rank = std::max(0, limits.max_lora_rank);
    plan.tensorrt_options = {
        {"device_id", dev},
        {"trt_fp16_enable", "1"},
        {"trt_engine_cache_enable", "1"},
        {"trt_engine_cache_path", trt_cache_dir},
        {"trt_timing_cache_enable", "1"},
        {"trt_timing_cache_path", trt_cache_dir},
        {"trt_profile_min_shapes", profile_shapes(network, contract, facts, 1, 1, limits.min_size, 0)},
        {"trt_profile_opt_shapes", profile_shapes(network, contract, facts, 1, 2, limits.opt_size, std::min(16, rank))},
        {"trt_profile_max_shapes", profile_shapes(network, contract, facts, b, 2 * b, limits.max_size, rank)},
    };
    return plan;
}

std::unique_ptr<Backend> make_onnx_backend(const ExportFolder &model, const BackendOptions &options) {
    return std::unique_ptr<Backend>(new OnnxBackend(model, options));
}

}  // namespace sdrt
