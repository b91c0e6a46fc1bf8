"""Opening a model folder: a diffusers-format checkpoint, an sdrt export, or a folder that is both.

A `ModelSource` gives the pipeline what it owns itself (facts, contracts, tokenizer folder, scheduler
config, the token-embedding table) and creates the backend that runs the networks.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from sdrt.backends.base import Backend, module_available
from sdrt.contracts import NetworkContract, build_contracts
from sdrt.errors import BackendError, ModelError, torch_install_hint
from sdrt.model.manifest import MANIFEST_NAME, Manifest, read_manifest
from sdrt.model.facts import ModelFacts, read_json, read_model_facts

BACKENDS = ("auto", "onnx", "torch", "tensorrt")
# Where checkpoints keep the token table, newest layout first.
TOKEN_TABLE_KEYS = ("token_embedding", "embeddings.token_embedding.weight", "text_model.embeddings.token_embedding.weight")


@dataclasses.dataclass
class ModelSource:
    path: Path
    facts: ModelFacts
    contracts: dict[str, NetworkContract]
    manifest: Manifest | None  # set for sdrt exports
    is_diffusers: bool  # holds diffusers-format weights the PyTorch backend can load

    @property
    def tokenizer_dir(self) -> Path:
        return self.path / (self.manifest.tokenizer if self.manifest else "tokenizer")

    @property
    def scheduler_config(self) -> dict:
        rel = self.manifest.scheduler if self.manifest else "scheduler/scheduler_config.json"
        return read_json(self.path / rel)

    def text_encoders(self) -> list[tuple[str, Path, Path]]:
        """(network, tokenizer folder, token-table file) per text encoder of the family, in concatenation order."""
        from sdrt.families import family_spec

        saved = self.manifest.extras.get("text_encoders", {}) if self.manifest else {}
        found = []
        for k, (network, tokenizer, folder) in enumerate(family_spec(self.facts.family).text_encoders):
            if network in saved:
                found.append((network, self.path / saved[network]["tokenizer"], self.path / saved[network]["token_embeddings"]))
            elif self.manifest:  # an SD 1.x/2.x export: the manifest's tokenizer and table
                found.append((network, self.tokenizer_dir, self.token_table_file()))
            else:
                found.append((network, self.path / tokenizer, self._weights_file(folder)))
        return found

    def _weights_file(self, folder: str) -> Path:
        for name in ("model.safetensors", "model.fp16.safetensors"):
            if (self.path / folder / name).exists():
                return self.path / folder / name
        return self.path / folder / "pytorch_model.bin"

    def token_table_file(self, folder: str = "text_encoder") -> Path:
        if self.manifest:
            return self.path / self.manifest.token_embeddings
        return self._weights_file(folder)

    def load_token_embeddings(self, path: Path | None = None) -> np.ndarray:
        """The checkpoint's token-embedding table [vocab, hidden] as float32 (the runtime does the lookup); `path`: the
        table of another text encoder (SDXL's second, from text_encoders())."""
        path = path or self.text_encoders()[0][2]
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="numpy") as f:
                for key in TOKEN_TABLE_KEYS:
                    if key in f.keys():
                        return np.ascontiguousarray(f.get_tensor(key), dtype=np.float32)
            raise ModelError(f"{path} holds no token-embedding table (looked for {', '.join(TOKEN_TABLE_KEYS)})")
        if not path.exists():
            raise ModelError(f"{path.parent} has no text-encoder weights (model.safetensors); the model folder is incomplete")
        if not module_available("torch"):
            raise ModelError(f"{path} is a pickle file, which needs torch to read; convert it to .safetensors or {torch_install_hint()}")
        import torch

        state = torch.load(path, map_location="cpu", weights_only=True)
        for key in TOKEN_TABLE_KEYS:
            if key in state:
                return state[key].float().numpy()
        raise ModelError(f"{path} holds no token-embedding table")

    def default_backend(self) -> str:
        if self.manifest is not None:
            if self.manifest.extras.get("engines"):
                from sdrt.backends.tensorrt_machine import tensorrt_status

                if tensorrt_status()[0]:  # a PyPI stub or a machine without a GPU must not pick TensorRT
                    return "tensorrt"
            return "onnx"
        return "torch"

    def create_backend(self, name: str = "auto", **options) -> Backend:
        """Create the backend `name` for this model; 'auto' picks the fastest one the folder and machine allow."""
        if name not in BACKENDS:
            raise ModelError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
        if name == "auto":
            name = self.default_backend()
        from sdrt.inputs import check_backend_options

        check_backend_options(name, options)
        if name == "torch":
            if not self.is_diffusers:
                raise ModelError(
                    f"{self.path} is an ONNX export without diffusers weights; run it with --backend onnx, or point "
                    "--model at the original diffusers folder for the PyTorch backend"
                )
            if not (module_available("torch") and module_available("diffusers") and module_available("transformers")):
                raise BackendError(
                    f"the PyTorch backend needs torch, diffusers and transformers: {torch_install_hint()}; or export "
                    f"the model once with `sdrt export {self.path} OUT` and run OUT on ONNX Runtime"
                )
            from sdrt.backends.torch_backend import TorchBackend

            return TorchBackend(self.path, self.facts, self.contracts, **options)
        if self.manifest is None:
            raise ModelError(
                f"{self.path} is a diffusers folder, not an sdrt export; the {name} backend runs exports: "
                f"`sdrt export {self.path} OUT`, then `--model OUT`"
            )
        if name == "onnx":
            from sdrt.backends.onnx_backend import OnnxBackend

            return OnnxBackend(self.path, self.manifest, **options)
        from sdrt.backends.tensorrt_backend import TensorRTBackend

        return TensorRTBackend(self.path, self.manifest, **options)


def open_model(path: str | Path) -> ModelSource:
    """Open a model folder (diffusers format or sdrt export) and read what the runtime needs from it."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelError(f"model folder {path} does not exist; pass a diffusers-format folder or an sdrt export")
    if path.is_file():
        raise ModelError(
            f"{path} is a file; sdrt loads model folders. For an original-layout checkpoint use "
            "Pipeline.from_single_file, or `sdrt export` it to a folder first"
        )
    is_diffusers = (path / "unet" / "config.json").exists()
    if (path / MANIFEST_NAME).exists():
        manifest = read_manifest(path)
        return ModelSource(path, manifest.facts, manifest.contracts, manifest, is_diffusers)
    facts = read_model_facts(path)
    return ModelSource(path, facts, build_contracts(facts), None, True)
