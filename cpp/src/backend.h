// The ONNX Runtime backend: one session per network of an export, run on caller-owned float32 buffers.
//
// Execution providers: CPU always; CUDA and TensorRT through ONNX Runtime's own providers when the loaded
// ONNX Runtime library has them (onnxruntime-gpu). Native TensorRT engines (the Python tensorrt backend) are not
// part of the C++ runtime: sdrt_init reports that with SDRT_ERR_UNSUPPORTED.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "model.h"

namespace sdrt {

struct BackendOptions {
    int provider = 0;  // sdrt_backend
    int threads = 0;   // intra-op threads; 0: ONNX Runtime's default
    int device_id = 0;
};

struct TensorIn {
    const float *data;
    std::vector<int64_t> shape;
};
struct TensorOut {
    float *data;
    std::vector<int64_t> shape;
};

class Backend {
public:
    virtual ~Backend() = default;
    virtual bool has(const std::string &network) const = 0;
    // Runs `network` with inputs and outputs in contract order; outputs are written into the given buffers.
    virtual void run(const std::string &network, const std::vector<TensorIn> &inputs, const std::vector<TensorOut> &outputs) = 0;
    virtual std::string describe() const = 0;
    virtual void reset_cancel() = 0;
    virtual void cancel() = 0;  // any thread: makes a run in progress fail soon
};

std::unique_ptr<Backend> make_onnx_backend(const ExportFolder &model, const BackendOptions &options);

// The shapes an export serves (manifest "limits"; runtime/contracts.py's ShapeLimits).
struct ShapeLimits {
    int min_size = 256, opt_size = 512, max_size = 1024, max_batch = 4;
    int max_lora_rank = 128;  // LoRA slots: the largest summed rank of the LoRAs active at once (profiles: 0 / 16 / this)
};

// How one network's ONNX Runtime session is made, decided without ONNX Runtime (tests need no GPU):
// the execution providers' options and whether the optimised graph is cached. The TensorRT provider gets what the
// Python runtime gives it (runtime/backends/onnx_providers.py: tensorrt_ep_options): per-network min/opt/max
// profile shapes, fp16, an engine and a timing cache; and no optimised-model file, which ONNX Runtime refuses to
// save for a graph with TensorRT-compiled nodes (its engine cache does that job).
struct OrtSessionPlan {
    bool tensorrt = false, cuda = false;
    bool cache_optimized_model = true;
    std::vector<std::pair<std::string, std::string>> tensorrt_options, cuda_options;
};
// The profile shapes name the contract's input tensors (from the manifest), by position.
OrtSessionPlan plan_ort_session(const BackendOptions &options, bool tensorrt, bool cuda, const std::string &network,
                                const NetworkContract &contract, const ModelFacts &facts, const ShapeLimits &limits,
                                const std::string &trt_cache_dir);

}  // namespace sdrt
