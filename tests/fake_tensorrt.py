"""Fake `tensorrt` modules with TensorRT 10.x's and 11.x's Python API surfaces, for CPU tests.

The surfaces follow the real bindings' names (tensorrt.Builder, INetworkDefinition, IBuilderConfig, OnnxParser,
Runtime, ICudaEngine, IExecutionContext, the enums). 11.x lacks what NVIDIA's "Migrating from TensorRT 10.x to
11.x" lists as removed: BuilderFlag.FP16/INT8/FP8/BF16 and the precision-constraint flags, Builder.
platform_has_fast_fp16, ICudaEngine.device_memory_size, INT8 calibrators and IAlgorithmSelector; and its
networks are always strongly typed (this fake has no NetworkDefinitionCreationFlag.STRONGLY_TYPED, the stricter
case for code that must work either way).

Engines are JSON: {"inputs": {name: [min, opt, max]}, "outputs": [names], "memory": bytes}. An execution
context runs a "kernel" on host memory by address (CPU torch tensors' data_ptr()): every output is
`first_input * 2 + batch`, where the batch comes from the context's *current* shape state, read when the kernel
runs (sizes and addresses are fixed at enqueue), as a kernel reading shape data a context keeps would. `capture()` records kernels instead of running them
(a CUDA graph); `replay()` runs them again: a graph replayed after its context ran another shape is then wrong.
"""

from __future__ import annotations

import ctypes
import enum
import json
import types

import numpy as np


class _Flags:
    def __init__(self, names):
        for i, name in enumerate(names):
            setattr(self, name, i)


class _Capture:
    active: list | None = None


def capture():
    """Start recording kernels (like torch.cuda.graph); returns the list that `replay` runs."""
    _Capture.active = []
    return _Capture.active


def end_capture():
    graph, _Capture.active = _Capture.active, None
    return graph


def replay(graph):
    for kernel in graph:
        kernel()


def _view(ptr: int, count: int) -> np.ndarray:
    return np.ctypeslib.as_array((ctypes.c_float * count).from_address(ptr))


def make(version: str, fail_context: bool = False, refuse_address: bool = False):
    """A fake `tensorrt` module of `version` ("10.13.0" or "11.4.0")."""
    major = int(version.split(".")[0])
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.calls = []  # what the code under test asked for: ("set_flag", name), ("create_network", flags), ...

    class Logger:
        VERBOSE, INFO, WARNING, ERROR = 0, 1, 2, 3

        def __init__(self, level=2):
            self.level = level

    class TensorIOMode(enum.Enum):
        NONE, INPUT, OUTPUT = 0, 1, 2

    class DataType(enum.Enum):
        FLOAT, HALF, INT8, INT32, BOOL = range(5)

    class ExecutionContextAllocationStrategy(enum.Enum):
        STATIC, ON_PROFILE_CHANGE, USER_MANAGED = range(3)

    flag_names = ["TF32", "REFIT", "SPARSE_WEIGHTS", "DIRECT_IO", "WEIGHT_STREAMING"]
    if major < 11:
        flag_names += ["FP16", "INT8", "BF16", "FP8", "OBEY_PRECISION_CONSTRAINTS", "PREFER_PRECISION_CONSTRAINTS"]
    trt.BuilderFlag = _Flags(flag_names)
    trt.NetworkDefinitionCreationFlag = _Flags(["EXPLICIT_BATCH", "STRONGLY_TYPED"] if major < 11 else ["PREFER_JIT_PYTHON_PLUGINS"])

    class Network:
        def __init__(self, flags):
            self.flags, self.inputs, self.outputs = flags, {}, []

    class OnnxParser:
        def __init__(self, network, logger):
            self.network, self.num_errors = network, 0

        def parse_from_file(self, path):
            trt.calls.append(("parse", str(path)))
            return True

        def get_error(self, i):
            return "no error"

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, min, opt, max):
            self.shapes[name] = [list(min), list(opt), list(max)]

    class TimingCache:
        def __init__(self, data):
            self.data = bytes(data)

        def serialize(self):
            return self.data + b"t"

    class Config:
        def __init__(self):
            self.profiles, self.flags, self.cache = [], set(), None

        def set_flag(self, flag):
            trt.calls.append(("set_flag", flag))
            self.flags.add(flag)

        def clear_flag(self, flag):
            trt.calls.append(("clear_flag", flag))
            self.flags.discard(flag)

        def add_optimization_profile(self, profile):
            self.profiles.append(profile)
            return len(self.profiles) - 1

        def create_timing_cache(self, data):
            return TimingCache(data)

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache = cache
            return True

        def get_timing_cache(self):
            return self.cache

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags=0):
            trt.calls.append(("create_network", flags))
            return Network(flags)

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            profile = config.profiles[0].shapes
            return json.dumps({"inputs": profile, "outputs": ["out"], "memory": 1 << 16, "flags": network.flags}).encode()

    if major < 11:
        Builder.platform_has_fast_fp16 = True

    class Context:
        def __init__(self, engine):
            self.engine, self.shapes, self.addresses, self.device_memory = engine, {}, {}, None

        def set_input_shape(self, name, shape):
            lo, _, hi = self.engine.spec["inputs"][name]
            ok = len(shape) == len(lo) and all(a <= s <= b for s, a, b in zip(shape, lo, hi))
            if ok:
                self.shapes[name] = tuple(shape)
            return ok

        def set_tensor_address(self, name, ptr):
            if refuse_address:
                return False
            self.addresses[name] = int(ptr)
            return True

        def set_device_memory(self, ptr, size):
            self.device_memory = (ptr, size)

        def get_tensor_shape(self, name):
            return self.shapes[self.engine.inputs[0]]

        def execute_async_v3(self, stream):
            first, outputs = self.engine.inputs[0], list(self.engine.outputs)
            addresses = dict(self.addresses)  # kernel arguments: baked in when enqueued (captured)
            count = int(np.prod(self.shapes[first]))
            context = self

            def kernel():
                batch = context.shapes[first][0]  # state the context keeps: read when the kernel runs
                x = _view(addresses[first], count)
                for out in outputs:
                    _view(addresses[out], count)[:] = x * 2 + batch

            trt.calls.append(("execute", tuple(self.shapes[first])))
            if _Capture.active is not None:
                _Capture.active.append(kernel)
            else:
                kernel()
            return True

    class Engine:
        def __init__(self, spec):
            self.spec = spec
            self.inputs, self.outputs = list(spec["inputs"]), list(spec["outputs"])
            self.num_io_tensors = len(self.inputs) + len(self.outputs)
            self.device_memory_size_v2 = spec.get("memory", 0)
            if major < 11:
                self.device_memory_size = spec.get("memory", 0)
            self.contexts = []

        def get_tensor_name(self, i):
            return (self.inputs + self.outputs)[i]

        def get_tensor_mode(self, name):
            return TensorIOMode.INPUT if name in self.inputs else TensorIOMode.OUTPUT

        def get_tensor_dtype(self, name):
            return DataType.FLOAT

        def get_tensor_profile_shape(self, name, profile):
            return [tuple(s) for s in self.spec["inputs"][name]]

        def create_execution_context(self, strategy=ExecutionContextAllocationStrategy.STATIC):
            trt.calls.append(("create_execution_context", strategy.name))
            if fail_context:
                return None  # what TensorRT does when it cannot allocate the context's memory
            context = Context(self)
            self.contexts.append(context)
            return context

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            try:
                return Engine(json.loads(bytes(data)))
            except ValueError:
                return None

    for name, value in dict(locals()).items():
        if name in ("Logger", "TensorIOMode", "DataType", "ExecutionContextAllocationStrategy", "OnnxParser", "Builder", "Runtime"):
            setattr(trt, name, value)
    if major < 11:
        trt.IInt8EntropyCalibrator2 = type("IInt8EntropyCalibrator2", (), {})
        trt.IAlgorithmSelector = type("IAlgorithmSelector", (), {})
    return trt
