"""sdrt: an optimised inference runtime for Stable Diffusion.

The light runtime imports only numpy, onnxruntime, tokenizers, pillow, safetensors and tqdm;
torch, diffusers and transformers load lazily, inside the PyTorch backend and the exporter.
"""

__version__ = "0.1.0"

from sdrt.errors import BackendError, InputError, ModelError, SdrtError  # noqa: E402

__all__ = ["Pipeline", "PipelineOutput", "SdrtError", "ModelError", "InputError", "BackendError", "__version__"]


def __getattr__(name):
    # Pipeline pulls in the tokenizer and schedulers; keep `import sdrt` itself cheap.
    if name in ("Pipeline", "PipelineOutput"):
        from sdrt import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'sdrt' has no attribute {name!r}")
