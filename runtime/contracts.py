"""One I/O contract per network: the only place that says what each network takes and returns.

The ONNX exporter, the TensorRT engine builder, every backend and the C++ host read these (the manifest
stores them as JSON). A dimension is either a fixed int or a symbolic name; `ShapeLimits` turns the
symbols into min/opt/max values for dynamic-shape exports and engine profiles.
"""

from __future__ import annotations

import dataclasses

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from sdrt.model.facts import ModelFacts

TEXT_ENCODER = "text_encoder"
TEXT_ENCODER_2 = "text_encoder_2"
UNET = "unet"
VAE_ENCODER = "vae_encoder"
VAE_DECODER = "vae_decoder"
NETWORKS = (TEXT_ENCODER, UNET, VAE_ENCODER, VAE_DECODER)
SDXL_NETWORKS = (TEXT_ENCODER, TEXT_ENCODER_2, UNET, VAE_ENCODER, VAE_DECODER)
SDXL_REFINER_NETWORKS = (TEXT_ENCODER_2, UNET, VAE_ENCODER, VAE_DECODER)


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name; "float32" everywhere (an fp16 export changes what it stores, not its I/O)
    shape: tuple  # ints and symbolic names such as "batch", "latent_height"

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, data: dict) -> "TensorSpec":
        return cls(data["name"], data["dtype"], tuple(data["shape"]))


@dataclasses.dataclass(frozen=True)
class LoraSlot:
    """One layer that takes run-time LoRA factors: y = layer(x) + up(down(x)).

    Linear: inputs `lora_down/<layer>` [r, in] and `lora_up/<layer>` [out, r]; Conv2d: [r, in, kh, kw] (the layer's
    stride and padding) and [out, r, 1, 1]. Exports made before 2026-12-05 name them `lora_down:<layer>` (`sep`
    ":", read from their manifests): ONNX Runtime's TensorRT provider cannot name those in its profile shapes (it
    splits "name:dims" at the first colon), so new exports use "/". r is the input's own symbol `lora_rank:<layer>`, 0 (empty tensors) when
    no LoRA adapts the layer; several LoRAs are concatenated along r with their scales folded into `up`.
    `upsample`: the layer is an Upsample2D's conv, applied to the 2x nearest-upsampled input.
    """

    layer: str  # module path in the component (UNet2DConditionModel / the CLIP text model's core)
    weight: tuple  # the layer's weight shape: (out, in) or (out, in, kh, kw)
    stride: int = 1
    padding: int = 0
    upsample: bool = False
    sep: str = "/"  # between "lora_down"/"lora_up" and the layer in the input names (":" in older exports)

    @property
    def conv(self) -> bool:
        return len(self.weight) == 4

    @property
    def rank_symbol(self) -> str:
        return f"lora_rank:{self.layer}"

    def specs(self) -> tuple[TensorSpec, TensorSpec]:
        r, out, inp = self.rank_symbol, self.weight[0], self.weight[1]
        if self.conv:
            kh, kw = self.weight[2:]
            return (TensorSpec(f"lora_down{self.sep}{self.layer}", "float32", (r, inp, kh, kw)),
                    TensorSpec(f"lora_up{self.sep}{self.layer}", "float32", (out, r, 1, 1)))
        return (TensorSpec(f"lora_down{self.sep}{self.layer}", "float32", (r, inp)),
                TensorSpec(f"lora_up{self.sep}{self.layer}", "float32", (out, r)))

    def empty(self) -> dict[str, np.ndarray]:
        """The feeds of an unused slot: rank 0."""
        return {spec.name: np.zeros(tuple(0 if d == self.rank_symbol else d for d in spec.shape), np.float32)
                for spec in self.specs()}

    def to_dict(self) -> dict:
        return {"layer": self.layer, "weight": list(self.weight), "stride": self.stride, "padding": self.padding,
                "upsample": self.upsample, "sep": self.sep}

    @classmethod
    def from_dict(cls, data: dict) -> "LoraSlot":
        return cls(data["layer"], tuple(data["weight"]), data.get("stride", 1), data.get("padding", 0),
                   data.get("upsample", False), data.get("sep", ":"))  # no "sep": an export from before it


LORA_RANK = "lora_rank"  # the ShapeLimits symbol every slot's rank resolves to


@dataclasses.dataclass(frozen=True)
class NetworkContract:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    doc: str
    lora_slots: tuple[LoraSlot, ...] = ()  # layers taking run-time LoRA factors; their inputs follow the others

    def with_lora_slots(self, slots) -> "NetworkContract":
        """This contract with LoRA slot inputs (two per slot, after the network's own inputs)."""
        slots = tuple(slots)
        extra = tuple(spec for slot in slots for spec in slot.specs())
        return dataclasses.replace(self, inputs=self.inputs + extra, lora_slots=slots)

    @property
    def plain_inputs(self) -> tuple[TensorSpec, ...]:
        """The inputs that are not LoRA slots."""
        return self.inputs[: len(self.inputs) - 2 * len(self.lora_slots)]

    def empty_lora_feeds(self) -> dict[str, np.ndarray]:
        return {name: value for slot in self.lora_slots for name, value in slot.empty().items()}

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """{tensor: {axis: symbol}} for every symbolic axis, the form torch.onnx.export takes."""
        axes = {}
        for spec in self.inputs + self.outputs:
            named = {i: d for i, d in enumerate(spec.shape) if isinstance(d, str)}
            if named:
                axes[spec.name] = named
        return axes

    def resolve(self, spec: TensorSpec, dims: dict[str, int]) -> tuple[int, ...]:
        return tuple(d if isinstance(d, int) else dims[d] if d in dims or not d.startswith(LORA_RANK) else dims[LORA_RANK]
                     for d in spec.shape)

    def sample_inputs(self, dims: dict[str, int], seed: int = 0) -> dict[str, np.ndarray]:
        """Random inputs of the contract's shapes at `dims`, for exports and parity checks."""
        rng = np.random.default_rng(seed)
        feeds = {}
        for spec in self.inputs:
            shape = self.resolve(spec, dims)
            if spec.name == "timestep":
                feeds[spec.name] = rng.uniform(0, 999, size=shape).astype(spec.dtype)
            elif spec.name.startswith("lora_"):  # small LoRA factors: a plausible delta, not one that swamps W
                feeds[spec.name] = (0.05 * rng.standard_normal(shape)).astype(spec.dtype)
            else:
                feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        return feeds

    def check_feeds(self, feeds: dict[str, np.ndarray]) -> None:
        """Catch a wrong name, rank or fixed dimension before it becomes an error inside a backend."""
        for spec in self.inputs:
            if spec.name not in feeds:
                raise KeyError(f"{self.name} needs input {spec.name!r}; got {sorted(feeds)}")
            shape = tuple(feeds[spec.name].shape)
            if len(shape) != len(spec.shape) or any(
                isinstance(want, int) and want != got for want, got in zip(spec.shape, shape)
            ):
                raise ValueError(f"{self.name} input {spec.name!r} has shape {shape}; the contract says {spec.shape}")

    def to_dict(self) -> dict:
        data = {
            "name": self.name,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "doc": self.doc,
        }
        if self.lora_slots:
            data["lora_slots"] = [s.to_dict() for s in self.lora_slots]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "NetworkContract":
        return cls(
            data["name"],
            tuple(TensorSpec.from_dict(t) for t in data["inputs"]),
            tuple(TensorSpec.from_dict(t) for t in data["outputs"]),
            data.get("doc", ""),
            tuple(LoraSlot.from_dict(s) for s in data.get("lora_slots", ())),
        )


def build_contracts(facts: ModelFacts) -> dict[str, NetworkContract]:
    """The contracts of every network of this model's family (sdrt.families)."""
    from sdrt.families import family_spec

    return family_spec(facts.family).contracts(facts)


def sd_contracts(facts: ModelFacts) -> dict[str, NetworkContract]:
    """SD 1.x/2.x: text encoder, UNet with text cross-attention, VAE encoder and decoder."""
    c, seq, hidden = facts.latent_channels, facts.text_seq_len, facts.text_hidden_size
    f32 = "float32"
    # An LCM-distilled UNet (time_cond_proj_dim) also takes the guidance scale's embedding, one row per item, and
    # runs without the [uncond, cond] batch (sdrt.generation.guidance_scale_embedding).
    w_cond = (TensorSpec("timestep_cond", f32, ("unet_batch", facts.time_cond_proj_dim)),) if facts.time_cond_proj_dim else ()
    return {
        TEXT_ENCODER: NetworkContract(
            TEXT_ENCODER,
            inputs=(TensorSpec("inputs_embeds", f32, ("batch", seq, hidden)),),
            outputs=(TensorSpec("last_hidden_state", f32, ("batch", seq, hidden)),),
            doc="Token embeddings (looked up by the runtime, so textual-inversion rows need no re-export) -> "
            "position embeddings added, causal CLIP encoder, final layer norm -> last hidden state.",
        ),
        UNET: NetworkContract(
            UNET,
            inputs=(
                TensorSpec("sample", f32, ("unet_batch", facts.unet_input_channels, "latent_height", "latent_width")),
                TensorSpec("timestep", f32, ("unet_batch",)),
                TensorSpec("encoder_hidden_states", f32, ("unet_batch", seq, facts.cross_attention_dim)),
                *w_cond,
            ),
            outputs=(TensorSpec("out_sample", f32, ("unet_batch", c, "latent_height", "latent_width")),),
            doc="Scaled latents, a float timestep per item (fractional allowed), text states -> the model's "
            "prediction (epsilon or v, per prediction_type). Guidance runs [uncond, cond] as one batch, except in "
            "LCM-distilled UNets, which take the guidance scale's embedding as timestep_cond. An "
            "inpainting UNet's sample is [latents, mask, masked-image latents] on the channel axis (its config's "
            "in_channels); its output has the latent channels.",
        ),
        VAE_ENCODER: NetworkContract(
            VAE_ENCODER,
            inputs=(TensorSpec("image", f32, ("batch", 3, "image_height", "image_width")),),
            outputs=(
                TensorSpec("mean", f32, ("batch", c, "latent_height", "latent_width")),
                TensorSpec("logvar", f32, ("batch", c, "latent_height", "latent_width")),
            ),
            doc="Image in [-1, 1] -> the posterior's mean and log-variance, unscaled; the runtime samples and "
            "multiplies by scaling_factor (sampling stays in the runtime for seed parity with diffusers).",
        ),
        VAE_DECODER: NetworkContract(
            VAE_DECODER,
            inputs=(TensorSpec("latent", f32, ("batch", c, "latent_height", "latent_width")),),
            outputs=(TensorSpec("image", f32, ("batch", 3, "image_height", "image_width")),),
            doc="Scaled latents, as the UNet sees them (divided by scaling_factor inside) -> image in about [-1, 1].",
        ),
    }


def sdxl_contracts(facts: ModelFacts) -> dict[str, NetworkContract]:
    """SDXL base and refiner: one or two CLIP encoders giving penultimate hidden states (concatenated by the runtime
    into the UNet's encoder_hidden_states), the second also its pooled, projected output; a UNet that takes
    `text_embeds` and `time_ids` (its "text_time" added embedding); the VAE as for SD."""
    sd = sd_contracts(facts)
    seq, f32 = facts.text_seq_len, "float32"
    contracts = {}
    if facts.text_hidden_size:  # the base's CLIP ViT-L (the refiner has none)
        hidden = facts.text_hidden_size
        contracts[TEXT_ENCODER] = NetworkContract(
            TEXT_ENCODER,
            inputs=(TensorSpec("inputs_embeds", f32, ("batch", seq, hidden)),),
            outputs=(TensorSpec("hidden_states", f32, ("batch", seq, hidden)),),
            doc="Token embeddings -> the penultimate layer's hidden states (no final layer norm), as SDXL uses them.",
        )
    hidden2 = facts.text_hidden_size_2
    contracts[TEXT_ENCODER_2] = NetworkContract(
        TEXT_ENCODER_2,
        inputs=(
            TensorSpec("inputs_embeds", f32, ("batch", seq, hidden2)),
            TensorSpec("pool_weights", f32, ("batch", seq)),
        ),
        outputs=(
            TensorSpec("hidden_states", f32, ("batch", seq, hidden2)),
            TensorSpec("text_embeds", f32, ("batch", facts.pooled_dim)),
        ),
        doc="Token embeddings, and a one-hot row marking the token CLIP pools (its end-of-text token) -> the "
        "penultimate layer's hidden states, and the pooled final state through the text projection.",
    )
    plain = tuple(spec for spec in sd[UNET].inputs if spec.name != "timestep_cond")
    w_cond = tuple(spec for spec in sd[UNET].inputs if spec.name == "timestep_cond")  # an LCM-distilled UNet's, last
    contracts[UNET] = NetworkContract(
        UNET,
        inputs=plain + (
            TensorSpec("text_embeds", f32, ("unet_batch", facts.pooled_dim)),
            TensorSpec("time_ids", f32, ("unet_batch", facts.time_ids_dim)),
        ) + w_cond,
        outputs=sd[UNET].outputs,
        doc=sd[UNET].doc + " SDXL: the pooled text embedding and the micro-conditioning time ids (original size, "
        "crop corner, target size or aesthetic score) go through the UNet's added time embedding.",
    )
    contracts[VAE_ENCODER], contracts[VAE_DECODER] = sd[VAE_ENCODER], sd[VAE_DECODER]
    return contracts


@dataclasses.dataclass(frozen=True)
class ShapeLimits:
    """The range of sizes and batches an export or engine must serve; min/opt/max per symbolic axis."""

    min_size: int = 64
    opt_size: int = 512
    max_size: int = 1024
    max_batch: int = 4  # images per call; the UNet sees twice this with guidance
    max_lora_rank: int = 128  # LoRA slots: the largest summed rank of the LoRAs active at once (engine profiles)

    def dims(self, facts: ModelFacts, which: str) -> dict[str, int]:
        """Concrete values of every symbol at `which` in ("min", "opt", "max")."""
        size = {"min": self.min_size, "opt": self.opt_size, "max": self.max_size}[which]
        size = max(facts.size_step, size // facts.size_step * facts.size_step)
        batch = {"min": 1, "opt": 1, "max": self.max_batch}[which]
        unet_batch = {"min": 1, "opt": 2, "max": 2 * self.max_batch}[which]
        return {
            "batch": batch,
            "unet_batch": unet_batch,
            "image_height": size,
            "image_width": size,
            "latent_height": size // facts.vae_scale_factor,
            "latent_width": size // facts.vae_scale_factor,
            LORA_RANK: {"min": 0, "opt": 16, "max": self.max_lora_rank}[which],
        }

    def profile(self, contract: NetworkContract, facts: ModelFacts) -> dict[str, tuple[tuple, tuple, tuple]]:
        """{input: (min_shape, opt_shape, max_shape)}: one TensorRT optimisation profile."""
        lo, opt, hi = (self.dims(facts, w) for w in ("min", "opt", "max"))
        return {s.name: (contract.resolve(s, lo), contract.resolve(s, opt), contract.resolve(s, hi)) for s in contract.inputs}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ShapeLimits":
        """The limits a manifest saved (to_dict); keys this version does not know are left out."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
