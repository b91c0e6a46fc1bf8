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

}  // namespace sdrt
