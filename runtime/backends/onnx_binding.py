"""IO binding for the ONNX backend: numpy arrays in, numpy arrays out, with as few copies as ORT allows.

- CPU: each input is bound where it lies and each output is written straight into a fresh numpy array the
  caller owns (no copy in or out).
- CUDA: inputs are bound as CPU memory (bind_cpu_input): ORT copies them to the device on its own stream as
  part of the run, ordered before the kernels that read them. (A plain host-to-device memcpy into a device
  buffer, as before, is not ordered with ORT's stream, and Run(IOBinding) does not synchronise inputs.)
  Output buffers are allocated on the device once per shape and reused; each is copied back after the run,
  which the numpy interface requires.
- Batch parallelism for small CPU networks: a batch of 2 or more (the UNet's is 2 with guidance) runs in
  `parallel` parts at once, one single-threaded run each (ORT sessions take concurrent runs), every part
  writing its rows of the output arrays: both cores busy where splitting each op across them did not pay.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnxruntime as ort


def run_cpu(session, contract, arrays, dims, outputs=None) -> dict[str, np.ndarray]:
    """One CPU run; outputs: arrays to write into (else new ones, or ORT's where a shape is unpredictable)."""
    binding = session.io_binding()
    outputs = dict(outputs or {})
    for name, array in arrays.items():
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array))
    for spec in contract.outputs:
        if spec.name not in outputs and all(isinstance(d, int) or d in dims for d in spec.shape):
            outputs[spec.name] = np.empty(contract.resolve(spec, dims), dtype=np.float32)
        if spec.name in outputs:
            binding.bind_ortvalue_output(spec.name, ort.OrtValue.ortvalue_from_numpy(outputs[spec.name]))
        else:
            binding.bind_output(spec.name, "cpu")
    session.run_with_iobinding(binding)
    if len(outputs) < len(contract.outputs):  # shapes we could not predict: ORT allocated them
        for spec, value in zip(contract.outputs, binding.get_outputs()):
            outputs.setdefault(spec.name, value.numpy())
    return outputs


class CudaBinding:
    """Runs sessions on the CUDA provider from host arrays; owns the reused device output buffers."""

    def __init__(self, device_id: int = 0):
        self.device_id = device_id
        self.buffers: dict[tuple, ort.OrtValue] = {}

    def buffer(self, network: str, name: str, shape) -> ort.OrtValue:
        key = (network, name, tuple(shape))
        if key not in self.buffers:
            self.buffers[key] = ort.OrtValue.ortvalue_from_shape_and_type(list(shape), np.float32, "cuda", self.device_id)
        return self.buffers[key]

    def run(self, network, session, contract, arrays, dims) -> dict[str, np.ndarray]:
        binding = session.io_binding()
        for name, array in arrays.items():
            binding.bind_cpu_input(name, array)  # copied on ORT's stream, within the run
        for spec in contract.outputs:
            if all(isinstance(d, int) or d in dims for d in spec.shape):
                binding.bind_ortvalue_output(spec.name, self.buffer(network, spec.name, contract.resolve(spec, dims)))
            else:
                binding.bind_output(spec.name, "cuda", self.device_id)
        session.run_with_iobinding(binding)  # returns once the run (and its stream) is done
        return {spec.name: value.numpy() for spec, value in zip(contract.outputs, binding.get_outputs())}


class BatchSplitter:
    """Splits a small network's batch across threads; `symbols[network]` is its batch axis' symbol."""

    def __init__(self, parallel: int, symbols: dict[str, str]):
        self.parallel, self.symbols = parallel, symbols
        self.pool: ThreadPoolExecutor | None = None

    def parts(self, network: str, dims: dict[str, int]) -> list[slice]:
        """How a batch-parallel network's batch splits across the worker threads (one part: not split)."""
        symbol = self.symbols.get(network)
        if symbol is None:
            return [slice(None)]
        size = dims[symbol]
        bounds = np.linspace(0, size, min(self.parallel, size) + 1).round().astype(int)
        return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]

    def run(self, network, contract, arrays, dims, parts, session_for) -> dict[str, np.ndarray]:
        """Run the batch in parts at once, one single-threaded run per worker, each writing its rows of the outputs."""
        symbol = self.symbols[network]
        outputs = {spec.name: np.empty(contract.resolve(spec, dims), dtype=np.float32) for spec in contract.outputs}
        jobs = []
        for part in parts:
            part_dims = {**dims, symbol: part.stop - part.start}
            session = session_for(network, part_dims)  # here, not in the workers: it updates the LRU cache
            jobs.append((session, contract, {n: a[part] for n, a in arrays.items()}, part_dims, {n: o[part] for n, o in outputs.items()}))
        if self.pool is None:
            self.pool = ThreadPoolExecutor(max_workers=self.parallel - 1, thread_name_prefix="sdrt-onnx")
        pending = [self.pool.submit(run_cpu, *job) for job in jobs[1:]]
        run_cpu(*jobs[0])
        for future in pending:
            future.result()
        return outputs
