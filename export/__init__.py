"""sdrt.export: torch -> ONNX -> TensorRT, and the model builders the tests and the digits model use.

Everything here may import torch, diffusers and transformers; the runtime (`sdrt`) never imports this package.
"""
