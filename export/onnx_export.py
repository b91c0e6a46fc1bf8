"""Export a diffusers-format Stable Diffusion folder to a self-contained sdrt ONNX export.

    report = export_model("models/sd15", "exports/sd15-onnx", fp16=True)
    print(report.summary())

Each network is exported from its contract module (sdrt.backends.torch_modules), so the ONNX graph has the
contract's input/output names, float32 I/O and a dynamic batch and image size. The folder holds one ONNX file per
network (with external data beside it when over 2 GB), the tokenizer, the scheduler config, the token-embedding
table and manifest.json, written last. Everything is written into a hidden folder beside OUT and renamed at the
end: an interrupted or failed export never leaves a folder that loads.

Exporter: torch.onnx's TorchScript exporter (dynamo=False) by default, the dynamo exporter on request. Both
match PyTorch to ~2e-6 relative on the tiny models, also at other sizes and batches, and ORT runs their graphs at
the same speed; the TorchScript one exported the tiny model in 9 s against 100-117 s for dynamo on this 2-core
machine, and SD 1.5's UNet in 42 s against 124 s (ENVIRONMENT.md). Switch the default when torch drops it.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from pathlib import Path

import numpy as np

from sdrt import __version__
from sdrt.contracts import UNET, ShapeLimits, build_contracts
from sdrt.families import family_spec
from sdrt.errors import InputError, ModelError
from sdrt.model.manifest import GRAPH_REVISION, GRAPH_REWRITES, MANIFEST_NAME, Manifest, read_manifest
from sdrt.model.facts import ModelFacts, read_json, read_model_facts
from sdrt.memory import model_architecture
from sdrt.outputs import chmod_default
from sdrt.export.attention import fused_self_attention
from sdrt.export.geglu import split_geglu
from sdrt.export.rewrites import graph_rewrites
from sdrt.export.step_split import write_step_split
from sdrt.export.tactics import CONV_TACTIC_MODES, TacticPicker, cpu_name
from sdrt.export.onnx_network import (
    check_dims,
    compare_with_torch,
    example_args,
    export_dims,
    export_network,
    finish_network,
    network_bytes,
)

EXPORTERS = ("torchscript", "dynamo")
DEFAULT_OPSET = {"torchscript": 17, "dynamo": 18}  # dynamo at opset 17 produced an invalid model (ENVIRONMENT.md)
# Worst max|onnx - torch| / max|torch| the check accepts per output, by precision.
CHECK_TOLERANCE = {"fp32": 1e-3, "fp16": 5e-2}


@dataclasses.dataclass
class NetworkReport:
    name: str
    file: str
    precision: str
    seconds: float  # export, conversion and save
    bytes: int  # the ONNX file and its external data
    errors: dict = dataclasses.field(default_factory=dict)  # output -> {"max_abs": , "max_ref": , "rel": }
    check_dims: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class ExportReport:
    out_dir: Path
    exporter: str
    opset: int
    networks: dict[str, NetworkReport]
    seconds: float

    def summary(self) -> str:
        lines = [f"exported to {self.out_dir} ({self.exporter} exporter, opset {self.opset}) in {self.seconds:.1f} s"]
        for r in self.networks.values():
            errs = ", ".join(f"{k} {v['rel']:.1e} rel ({v['max_abs']:.1e} abs)" for k, v in r.errors.items())
            lines.append(
                f"  {r.name:<13} {r.precision}  {r.bytes / 1e6:9.1f} MB  {r.seconds:6.1f} s"
                + (f"  vs PyTorch: {errs}" if errs else "")
            )
        return "\n".join(lines)


def export_model(
    model,
    out_dir,
    fp16: bool = False,
    opset: int | None = None,
    limits: ShapeLimits | None = None,
    check: bool = True,
    keep_fp32_ops=(),
    progress: bool = True,
    exporter: str = "torchscript",
    force: bool = False,
    share_weights: bool = False,
    subpixel_upsample: bool = True,
    winograd: bool = False,
    loras=(),
    allow_pickle: bool = False,
    min_size: int | None = None,
    opt_size: int | None = None,
    max_size: int | None = None,
    max_batch: int = 4,
    lora_slots: str = "none",
    no_winograd=(),
    conv_tactics: str = "rule",
    tactic_threads: int | None = None,
    tactic_cache_dir=None,
    winograd_kept=None,
    cpu_transformers=(),
) -> ExportReport:
    """Export `model` (a diffusers-format SD 1.x/2.x/XL folder, or an original-layout single-file checkpoint) to the
    sdrt export folder `out_dir`.

    limits: the sizes and batch the export serves; None takes min/opt/max_size and max_batch, each defaulting to
    the model's own (`default_limits`). lora_slots: "attention" or "all" exports the UNet and text encoder with
    run-time LoRA inputs on those layers (sdrt.contracts.LoraSlot; sdrt.backends.torch_modules.SLOT_SETS), so any
    LoRA can be switched per call without re-exporting; "none" (default) exports plain graphs. loras: [(file, scale)] fused into the UNet and text encoder first
    (sdrt.export.lora); a single file is converted first (sdrt.export.single_file; a pickle .ckpt only with
    allow_pickle, since unpickling can run code). The manifest records the source and the LoRAs, written once.
    fp16: store weights and compute in fp16; the I/O, the UNet's timestep path, SD 2.1's attention scores
    (upcast_attention) and the op types in keep_fp32_ops stay float32 (sdrt.export.fp16). check: run each
    network in ONNX Runtime and PyTorch on random inputs at a size and batch other than the export's, and fail
    when they differ by more than CHECK_TOLERANCE. force: replace an existing export.
    share_weights: OUT also holds the diffusers folder, and each ONNX graph sits in its component's folder reading
    its weights from the component's safetensors (sdrt.export.share_weights): both backends, one copy of weights.
    subpixel_upsample: export each "nearest 2x upsample + 3x3 conv" as four 2x2 convs of the low-resolution
    input (sdrt.export.subpixel: the same result with 16/36 of the multiply-adds); the parity check still
    compares with stock PyTorch.
    winograd: export wide 3x3 convolutions as Winograd F(4x4, 3x3) or F(2x2, 3x3), each chosen for its input's
    size at limits.opt_size (sdrt.export.winograd): faster on ONNX Runtime's CPU provider at any size, fastest at
    the opt size; fp32 only, more memory, and not for TensorRT (`sdrt build` refuses such exports). no_winograd:
    networks left without it (an int8 export quantises those: sdrt.export.int8_export); winograd_kept: {network:
    int8 scheme} for such a network, Winograd all the same for the layers that scheme keeps fp32.
    conv_tactics: with winograd, "rule" (default: deterministic) picks each conv's form by choose_tile's rule;
    "measure" times every form of each conv and upsampler shape at the opt size in ONNX Runtime with
    tactic_threads threads (default: one per physical core) and exports the fastest (sdrt.export.tactics; timings
    cached in tactic_cache_dir, default ~/.cache/sdrt/conv-tactics, one file per CPU, ORT version and threads).
    cpu_transformers: networks whose transformer blocks take ONNX Runtime CPU forms: self-attention on enough
    tokens at the opt size as ORT's com.microsoft MultiHeadAttention (sdrt.export.attention) and GEGLU as two
    MatMuls (sdrt.export.geglu); ORT only (the int8 export's UNet); counted in extras["cpu_transformers"]. A
    `winograd` export (a CPU one) splits its UNet's GEGLUs too: exact, and no Slice copies out the halves.
    """
    options = dict(fp16=fp16, opset=opset, limits=limits, check=check, keep_fp32_ops=keep_fp32_ops, progress=progress,
                   exporter=exporter, force=force, share_weights=share_weights, subpixel_upsample=subpixel_upsample,
                   winograd=winograd, min_size=min_size, opt_size=opt_size, max_size=max_size, max_batch=max_batch,
                   lora_slots=lora_slots, no_winograd=tuple(no_winograd), conv_tactics=conv_tactics,
                   tactic_threads=tactic_threads, tactic_cache_dir=tactic_cache_dir, winograd_kept=dict(winograd_kept or {}),
                   cpu_transformers=tuple(cpu_transformers))
    model, out_dir = Path(model).expanduser(), Path(out_dir).expanduser()
    if not loras and not model.is_file():
        return _export_folder(model, out_dir, source=model, lora_records=[], **options)
    from sdrt.export.lora import prepared_model

    with prepared_model(model, loras, allow_pickle=allow_pickle, workdir=out_dir.parent) as (folder, records):
        return _export_folder(folder, out_dir, source=model, lora_records=records, **options)


def default_limits(facts: ModelFacts, min_size=None, opt_size=None, max_size=None, max_batch: int = 4) -> ShapeLimits:
    """An export's shape range: from 64 px (or the size step) through the model's own size to 1024 px by default."""
    step = facts.size_step
    min_size = min_size or max(step, 64 // step * step)
    opt_size = opt_size or max(min_size, facts.default_size)
    max_size = max_size or max(opt_size, 1024 // step * step)
    return ShapeLimits(min_size=min_size, opt_size=opt_size, max_size=max_size, max_batch=max_batch)


def _export_folder(
    model_dir: Path, out_dir: Path, fp16, opset, limits, check, keep_fp32_ops, progress, exporter, force, share_weights,
    subpixel_upsample, winograd, min_size, opt_size, max_size, max_batch, source: Path, lora_records: list[dict],
    lora_slots: str = "none", no_winograd=(), conv_tactics: str = "rule", tactic_threads=None, tactic_cache_dir=None,
    winograd_kept=None, cpu_transformers=(),
) -> ExportReport:  # fmt: skip
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    model_dir, out_dir = Path(model_dir).expanduser(), Path(out_dir).expanduser()
    if exporter not in EXPORTERS:
        raise InputError(f"exporter {exporter!r} is not one of {', '.join(EXPORTERS)}")
    opset = opset or DEFAULT_OPSET[exporter]
    if share_weights and fp16:
        raise InputError("share_weights needs an fp32 export: the ONNX graphs read the checkpoint's float32 weights")
    if winograd and fp16:
        raise InputError("winograd is for fp32 exports run by ONNX Runtime on a CPU; drop --winograd or --fp16")
    if conv_tactics not in CONV_TACTIC_MODES:
        raise InputError(f"conv_tactics {conv_tactics!r} is not one of {', '.join(CONV_TACTIC_MODES)}")
    if conv_tactics == "measure" and not winograd:
        raise InputError("conv_tactics 'measure' picks among Winograd and sub-pixel forms; add --winograd")
    if conv_tactics != "measure" and (tactic_threads is not None or tactic_cache_dir is not None):
        raise InputError("tactic_threads and tactic_cache_dir go with conv_tactics 'measure'; add --conv-tactics measure")
    if tactic_threads is not None and tactic_threads < 1:
        raise InputError(f"tactic_threads {tactic_threads} must be at least 1 (the threads the export will run with)")
    if keep_fp32_ops and not fp16:
        raise InputError(f"keep_fp32_ops {list(keep_fp32_ops)} applies to fp16 exports only; add --fp16 or drop it")
    if not 14 <= opset <= 23:
        raise InputError(f"opset {opset} is outside 14-23; use {DEFAULT_OPSET[exporter]}")
    facts = read_model_facts(model_dir)
    spec = family_spec(facts.family)
    if share_weights and spec.networks != family_spec("sd1").networks:
        raise InputError(f"share_weights is for SD 1.x/2.x exports; export this {spec.title} model without it")
    limits = limits or default_limits(facts, min_size, opt_size, max_size, max_batch)
    check_limits(limits, facts)
    check_out_dir(model_dir, out_dir, force)
    contracts = build_contracts(facts)
    # SD 2.1 sets this: its attention scores overflow fp16, so diffusers computes them in fp32.
    upcast_attention = bool(read_json(model_dir / "unet" / "config.json").get("upcast_attention")) and fp16
    modules = load_modules(model_dir, facts)
    slot_counts = add_lora_slots(modules, contracts, lora_slots)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out_dir)
    tmp = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    reports: dict[str, NetworkReport] = {}
    rewrites: dict[str, dict[str, int]] = {key: {} for key in GRAPH_REWRITES}
    dims = export_dims(limits, facts)
    opt_dims = limits.dims(facts, "opt")
    opt_scale = opt_dims["image_height"] / dims["image_height"]  # winograd's tiles suit the opt size
    picker = tactic_picker(conv_tactics, tactic_threads, tactic_cache_dir)
    tactic_records = {}
    cpu_forms = {}  # network -> {"fused_attentions": n, "split_geglus": n}
    try:
        if share_weights:
            copy_diffusers_folder(model_dir, tmp)
        bar = tqdm(family_spec(facts.family).networks, desc="export", unit="network", disable=not progress)
        for name in bar:
            bar.set_postfix_str(name)
            t0 = time.perf_counter()
            rel = f"{name}/model.onnx" if not share_weights else f".staging/{name}/model.onnx"
            args = example_args(contracts[name], dims)
            only = None
            if winograd and name in (winograd_kept or {}):  # an int8 network: Winograd for its fp32 layers only
                from sdrt.export.int8 import kept_modules

                only = kept_modules(modules[name], winograd_kept[name], "/" + name + "/")
            rewrite = winograd and (name not in no_winograd or only is not None)
            tactic_batch = opt_dims["unet_batch" if name == UNET else "batch"]  # the UNet's opt batch: one image, guided
            with (graph_rewrites(modules[name], args, opt_scale, subpixel_upsample, rewrite, picker if rewrite else None,
                                 tactic_batch, only) as counts,
                  fused_self_attention(modules[name], args, opt_scale, name in cpu_transformers) as attentions,
                  split_geglu(modules[name], name in cpu_transformers or (winograd and name == UNET)) as geglus):
                export_network(modules[name], contracts[name], tmp / rel, args, opset, exporter, constant_folding=not share_weights)
            if picker is not None and picker.records:
                tactic_records[name], picker.records = picker.records, {}
            for key in GRAPH_REWRITES:
                rewrites[key][name] = counts[key]
            if attentions or geglus:
                cpu_forms[name] = {"fused_attentions": attentions, "split_geglus": geglus}
            # A VAE that overflows in fp16 (SDXL's: force_upcast) stays fp32 in an fp16 export, as diffusers runs it.
            net_fp16 = fp16 and not (facts.force_upcast and name.startswith("vae_"))
            finish_network(tmp / rel, contracts[name], net_fp16, keep_fp32_ops, upcast_attention and name == UNET)
            if share_weights:
                rel = share_network_weights(tmp, rel, name)
            net_precision = "fp16" if net_fp16 else "fp32"
            report = NetworkReport(name, rel, net_precision, time.perf_counter() - t0, network_bytes(tmp / rel))
            if check:
                report.check_dims = check_dims(limits, facts)
                report.errors = compare_with_torch(tmp / rel, modules[name], contracts[name], report.check_dims)
                for output, err in report.errors.items():
                    if not err["rel"] <= CHECK_TOLERANCE[net_precision]:
                        hint = " (keep more ops in fp32 with --keep-fp32-op, or export fp32)" if fp16 else ""
                        raise ModelError(
                            f"the exported {name} differs from PyTorch on {output!r} by {err['rel']:.2e} of its range "
                            f"(tolerance {CHECK_TOLERANCE[net_precision]:.0e}){hint}; nothing was written"
                        )
            reports[name] = report
        bar.close()
        del modules
        shutil.rmtree(tmp / ".staging", ignore_errors=True)
        splits = {UNET: write_step_split(tmp / reports[UNET].file)} if UNET in reports else {}
        text_encoders = copy_runtime_files(model_dir, tmp, token_table=not share_weights)
        manifest = Manifest(
            facts=facts,
            contracts=contracts,
            networks={n: {"file": r.file, "precision": r.precision, "opset": opset, "exporter": exporter,
                          **({"step_split": splits[n]} if splits.get(n) else {})} for n, r in reports.items()},
            files={},
            limits=limits.to_dict(),
            versions=library_versions(opset, exporter),
            tokenizer=text_encoders[0]["tokenizer"],
            token_embeddings=SHARED_FILES["text_encoder"][1] if share_weights else text_encoders[0]["token_embeddings"],
            extras={
                # SDXL: every text encoder's tokenizer and token table ({network: {tokenizer, token_embeddings}}).
                **({"text_encoders": {t["network"]: t for t in text_encoders}} if len(spec.text_encoders) > 1
                   or spec.text_encoders[0][0] != "text_encoder" else {}),
                "shared_weights": share_weights,
                "source": str(source.resolve()),
                "loras": lora_records,
                "lora_slots": {"set": lora_slots, "layers": slot_counts},
                "keep_fp32_ops": list(keep_fp32_ops),
                "upcast_attention": upcast_attention,
                # The UNet config's own flag, whatever the precision: `sdrt build --fp16` converts fp32 exports with it.
                "unet_upcast_attention": bool(read_json(model_dir / "unet" / "config.json").get("upcast_attention")),
                **rewrites,
                **({"cpu_transformers": cpu_forms} if cpu_forms else {}),
                "conv_tactics": {"mode": conv_tactics, **({"threads": picker.threads, "cpu": cpu_name(), "picks": tactic_records}
                                                          if picker is not None else {})},
                "graph_revision": GRAPH_REVISION,
                "parity": {n: {"dims": r.check_dims, "errors": r.errors} for n, r in reports.items() if r.errors},
                "architecture": model_architecture(model_dir, None).to_dict(),  # what sdrt.memory estimates from
            },
        )
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        for p in files:  # files made through mkstemp (safetensors' writer, ORT's caches) are 0600
            chmod_default(p)
        manifest.record_files(tmp, [str(p.relative_to(tmp)) for p in files])
        manifest.write(tmp)
        read_manifest(tmp)  # what the runtime will do: refuse now rather than later
        replace_folder(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportReport(out_dir, exporter, opset, reports, time.perf_counter() - t_start)


def tactic_picker(mode: str, threads: int | None, cache_dir):
    """A TacticPicker for conv_tactics "measure", else None (the rule)."""
    if mode != "measure":
        return None
    from sdrt.bench.env import physical_cores

    return TacticPicker(threads or physical_cores(), Path(cache_dir).expanduser() if cache_dir else None)


# --- checks before anything is written ------------------------------------------------------------------------


def add_lora_slots(modules: dict, contracts: dict, which: str) -> dict[str, int]:
    """Give the UNet and text encoder LoRA slot inputs (`which`: a SLOT_SETS name): wraps their modules and extends
    their contracts in place; returns {network: slot count}."""
    from sdrt.backends.torch_modules import SLOT_SETS, WithLoraSlots, lora_slot_layers, slot_root
    from sdrt.contracts import TEXT_ENCODER, TEXT_ENCODER_2

    if which not in SLOT_SETS:
        raise InputError(f"lora_slots {which!r} is not one of {', '.join(SLOT_SETS)}")
    counts = {}
    for name in (TEXT_ENCODER, TEXT_ENCODER_2, UNET):  # SDXL: both text encoders (its refiner: the second only)
        if which == "none" or name not in modules:
            continue
        root = slot_root(modules[name])
        slots = lora_slot_layers(root, which)
        n_inputs = len(contracts[name].inputs)
        contracts[name] = contracts[name].with_lora_slots(slots)
        modules[name] = WithLoraSlots(modules[name], root, slots, n_inputs)
        counts[name] = len(slots)
    return counts


def check_limits(limits: ShapeLimits, facts: ModelFacts) -> None:
    step = facts.size_step
    if not 0 < limits.min_size <= limits.opt_size <= limits.max_size:
        raise InputError(f"sizes must satisfy 0 < min {limits.min_size} <= opt {limits.opt_size} <= max {limits.max_size}")
    for which in ("min_size", "opt_size", "max_size"):
        value = getattr(limits, which)
        if value % step:
            raise InputError(f"{which.replace('_', ' ')} {value} is not a multiple of {step} for this model; use {max(step, value // step * step)}")
    if limits.max_batch < 1:
        raise InputError(f"max batch {limits.max_batch} must be at least 1")


def check_out_dir(model_dir: Path, out_dir: Path, force: bool) -> None:
    if out_dir.resolve() == model_dir.resolve() or model_dir.resolve() in out_dir.resolve().parents:
        raise InputError(f"output folder {out_dir} is inside the model folder {model_dir}; pick a folder outside it")
    if not out_dir.exists():
        return
    if not force:
        raise InputError(f"{out_dir} already exists; pick another folder, or pass --force to replace the export there")
    if out_dir.is_file() or (any(out_dir.iterdir()) and not (out_dir / MANIFEST_NAME).exists()):
        raise InputError(f"{out_dir} exists and is not an sdrt export; --force replaces exports only, pick another folder")


def load_modules(model_dir: Path, facts: ModelFacts) -> dict:
    from sdrt.backends.torch_modules import load_contract_modules

    try:
        return load_contract_modules(model_dir, facts)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise ModelError(f"could not load the networks of {model_dir} ({type(err).__name__}: {err}); is the folder complete?") from err


# --- one network ----------------------------------------------------------------------------------------------
# --- the rest of the folder -----------------------------------------------------------------------------------


# network -> (component folder, the checkpoint file its graph reads, with share_weights)
SHARED_FILES = {
    "text_encoder": ("text_encoder", "text_encoder/model.safetensors"),
    "unet": ("unet", "unet/diffusion_pytorch_model.safetensors"),
    "vae_encoder": ("vae", "vae/diffusion_pytorch_model.safetensors"),
    "vae_decoder": ("vae", "vae/diffusion_pytorch_model.safetensors"),
}


def copy_diffusers_folder(model_dir: Path, folder: Path) -> None:
    """The diffusers weights and configs the shared graphs read (fp32 safetensors only: their bytes are shared)."""
    for rel in SHARED_FILES.values():
        if not (model_dir / rel[1]).exists():
            raise ModelError(f"share_weights needs {model_dir / rel[1]} (fp32 safetensors); convert the model or export without it")
    shutil.copy2(model_dir / "model_index.json", folder / "model_index.json")
    for component in ("text_encoder", "unet", "vae"):
        (folder / component).mkdir()
        for name in ("config.json", "model.safetensors", "diffusion_pytorch_model.safetensors"):
            if (model_dir / component / name).exists():
                shutil.copy2(model_dir / component / name, folder / component / name)


def share_network_weights(folder: Path, staged_rel: str, network: str) -> str:
    """Move a staged graph into its component folder and point its initializers at the component's safetensors."""
    from sdrt.export.share_weights import link_to_safetensors

    component, weights = SHARED_FILES[network]
    final = folder / component / ("model.onnx" if network in ("text_encoder", "unet") else network.split("_")[1] + ".onnx")
    shutil.move(str(folder / staged_rel), str(final))
    link_to_safetensors(final, folder / weights)
    return str(final.relative_to(folder))


def copy_runtime_files(model_dir: Path, folder: Path, token_table: bool = True) -> list[dict]:
    """Tokenizers, scheduler config and the token-embedding tables: what the runtime needs besides the networks.
    Returns {network, tokenizer, token_embeddings} (paths relative to `folder`) per text encoder."""
    from safetensors.numpy import save_file

    from sdrt.model.source import open_model

    (folder / "scheduler").mkdir()
    shutil.copy2(model_dir / "scheduler" / "scheduler_config.json", folder / "scheduler" / "scheduler_config.json")
    source = open_model(model_dir)
    written = []
    for k, (network, tokenizer, table_file) in enumerate(source.text_encoders()):
        shutil.copytree(tokenizer, folder / tokenizer.name)
        table = f"token_embeddings{'' if k == 0 else f'_{k + 1}'}.safetensors"
        written.append({"network": network, "tokenizer": tokenizer.name, "token_embeddings": table})
        if token_table:  # else the runtime reads the table from the shared text-encoder checkpoint
            data = np.ascontiguousarray(source.load_token_embeddings(table_file), dtype=np.float32)
            save_file({"token_embedding": data}, str(folder / table))
    return written


def library_versions(opset: int, exporter: str) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {"sdrt": __version__, "opset": opset, "exporter": exporter}
    for package in ("torch", "onnx", "onnxruntime", "diffusers", "transformers"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


def remove_stale_partials(out_dir: Path) -> None:
    """Remove what killed exports (SIGKILL, power loss) left in OUT's folder: `.NAME.partial-PID` and `.NAME.old-PID`
    of dead PIDs, for any NAME (an export to another name in the same folder cleans up too)."""
    for folder in out_dir.parent.glob(".*.*-*"):
        kind, _, pid = folder.name.rpartition(".")[2].rpartition("-")
        if folder.is_dir() and kind in ("partial", "old") and pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def replace_folder(tmp: Path, out_dir: Path) -> None:
    """Move the finished export into place; an existing export (--force) is removed only after that."""
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        out_dir.rename(old)
    tmp.rename(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
