"""Build TensorRT engines from an sdrt ONNX export: one engine, with one optimisation profile, per network.

    report = build_engines("exports/sd15-onnx", "exports/sd15-trt", sizes="512x512,768x768", max_batch=2)
    print(report.summary())        # then: sdrt generate "a fox" -m exports/sd15-trt

Profiles come from the contracts (ShapeLimits.profile): batch from 1 (guidance <= 1 runs a batch of one) to
max_batch, the UNet from 1 to 2 x max_batch (guidance runs [uncond, cond] as one batch), sizes from min to max.
Precision: every network is built strongly typed, TensorRT following the ONNX file's types. TensorRT 11 removed
weak typing (BuilderFlag.FP16/INT8/FP8/BF16, precision constraints, calibrators) and 10.12 on deprecates it, so an
fp16 engine comes from an fp16 graph: an fp16 export builds as it is (the ops it kept in fp32 stay fp32); an fp32
export with fp16=True is converted first by sdrt's own fp16 conversion (sdrt.export.fp16, the same as
`sdrt export --fp16`: I/O, the UNet's timestep path and SD 2.x's attention scores stay fp32), and the conversion
is recorded in the engine's flags, hence its cache key and the manifest. int8/fp8 engines would need explicit
Q/DQ graphs (not made by sdrt). The build uses TensorRT's own API (Builder, OnnxParser, one optimisation profile,
a timing cache keyed by GPU and TensorRT version, loaded and saved across builds), on TensorRT 10 and 11.

The output folder is a self-contained export: the ONNX export's files (hard links where the filesystem allows,
else copies), `engines/<network>-<key>.plan` with a sidecar `<network>-<key>.json` holding the key's fields,
and manifest.json with extras['engines']. Running `sdrt build` again reuses every engine whose key still
matches and rebuilds the rest, saying why. Everything is written into a hidden folder beside OUT and renamed at
the end: a failed build leaves nothing, and an earlier build at OUT stays as it was.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

from sdrt import __version__
from sdrt.export.onnx_export import replace_folder  # the same atomic move as exports
from sdrt.backends.tensorrt_machine import (
    ENGINE_FORMAT,
    MachineInfo,
    describe_mismatch,
    engine_key,
    engine_key_fields,
    machine_info,
    network_onnx_files,
    read_sidecar,
    require_tensorrt,
)
from sdrt.contracts import ShapeLimits
from sdrt.errors import BackendError, InputError, ModelError
from sdrt.model.manifest import MANIFEST_NAME, Manifest, read_manifest, sha256_of
from sdrt.export.tensorrt_shapes import network_profile, resolve_shapes

ENGINES_DIR = "engines"


@dataclasses.dataclass
class EnginePlan:
    """One network's engine: what it is built from and with, its key, and what the build does with it."""

    network: str
    onnx: str  # the ONNX file, relative to the export
    profile: dict  # input -> (min, opt, max) shapes
    flags: dict
    fields: dict  # the cache key's fields
    key: str
    action: str  # "build" or "reuse"; after the build "built" or "reused"
    reason: str  # why it is built
    seconds: float = 0.0
    bytes: int = 0

    @property
    def file(self) -> str:
        return f"{ENGINES_DIR}/{self.network}-{self.key}.plan"

    @property
    def sidecar(self) -> str:
        return f"{ENGINES_DIR}/{self.network}-{self.key}.json"


@dataclasses.dataclass
class BuildReport:
    onnx_dir: Path
    out_dir: Path
    machine: MachineInfo
    limits: ShapeLimits
    static: tuple[int, int] | None
    timing_cache: Path
    plans: dict[str, EnginePlan]
    dry_run: bool
    seconds: float = 0.0

    def summary(self) -> str:
        lim = self.limits
        size = f"{self.static[0]}x{self.static[1]} (static)" if self.static else f"{lim.min_size}..{lim.max_size} px (opt {lim.opt_size})"
        head = "dry run, nothing built" if self.dry_run else f"{self.seconds:.1f} s"
        lines = [
            f"TensorRT engines: {self.onnx_dir} -> {self.out_dir} ({head})",
            f"machine       {self.machine.describe()}",
            f"sizes         {size}, batch 1..{lim.max_batch} (UNet 1..{2 * lim.max_batch})",
            f"timing cache  {self.timing_cache}" + ("" if self.timing_cache.exists() else " (new)"),
        ]
        for p in self.plans.values():
            flags = ", ".join(f"{k}={v}" for k, v in p.flags.items())
            done = f"  {p.bytes / 1e6:.1f} MB in {p.seconds:.1f} s" if p.action == "built" else ""
            verb = {"build": "would build", "reuse": "would reuse"}.get(p.action, p.action) if self.dry_run else p.action
            lines.append(f"  {p.network:<13} key {p.key}  {verb} ({p.reason}){done}")
            lines.append(f"    flags       {flags}")
            for name, (lo, opt, hi) in p.profile.items():
                lines.append(f"    {name:<22} min {tuple(lo)}  opt {tuple(opt)}  max {tuple(hi)}")
        return "\n".join(lines)


def build_engines(
    onnx_dir,
    out_dir,
    fp16: bool = True,
    limits: ShapeLimits | None = None,
    sizes=None,
    static=None,
    max_batch: int | None = None,
    timing_cache=None,
    dry_run: bool = False,
    progress: bool = True,
    machine: MachineInfo | None = None,
    engine_builder=None,
    fp16_converter=None,
    quantize: str | None = None,
    calibration_prompts=None,
    quantizer=None,
) -> BuildReport:
    """Build (or reuse) one TensorRT engine per network of the ONNX export `onnx_dir` into `out_dir`.

    Shapes: `limits`, or `sizes` ([(W, H), ...] or "512x512,768x768": min and max over all sides, opt the first
    size), or `static` ((W, H) or "512x768": that size only); default: the export's own limits. max_batch
    overrides the batch of any of them. fp16: fp16 engines (an fp16 export always gives fp16 engines).
    timing_cache: file to load and save TensorRT's tactic timings (default: one per GPU and TensorRT version under
    ~/.cache/sdrt/tensorrt). dry_run: compute and report profiles, flags and keys; build and write nothing
    (works without TensorRT). machine, engine_builder: what the keys describe and what turns
    (onnx path, profile, flags, timing cache path) into engine bytes (default: this machine, TensorRT's API).
    fp16_converter: (fp32 ONNX path, fp16 ONNX path to write, upcast_attention) for fp16 engines from an fp32
    export (default: sdrt.export.fp16.convert_file).
    quantize: "int8" or "fp8": the UNet gets Model Optimizer's Q/DQ nodes first (sdrt.export.tensorrt_quant),
    calibrated on its inputs recorded while the export samples `calibration_prompts` on the CPU; the rest fp16.
    quantizer: Model Optimizer's quantize, or a fake with its signature (tests).
    """
    t_start = time.perf_counter()
    if not dry_run and engine_builder is None:
        require_tensorrt()  # before anything is read or written
    if quantize and not dry_run and quantizer is None:
        from sdrt.export.tensorrt_quant import require_modelopt

        require_modelopt()
    onnx_dir, out_dir = Path(onnx_dir).expanduser(), Path(out_dir).expanduser()
    source = read_manifest(onnx_dir)
    winograd = source.rewrite_counts()["winograd_convs"]
    if winograd:
        raise InputError(
            f"{onnx_dir} was exported with --winograd ({winograd} convolutions rewritten for ONNX Runtime on a CPU); "
            "TensorRT picks its own convolution kernels: export again without --winograd and build from that"
        )
    from sdrt.export.tensorrt_quant import QUANTIZED, check_mode

    check_mode(quantize, source.networks.get(QUANTIZED, {}).get("precision", "fp32"))
    limits, static = resolve_shapes(source, limits, sizes, static, max_batch)
    check_out_dir(onnx_dir, out_dir)
    machine = machine or machine_info()
    timing_cache = Path(timing_cache).expanduser() if timing_cache else default_timing_cache(machine)
    old = previous_build(out_dir)
    plans = {}
    for network in [n for n in source.family_section()["networks"] if n in source.networks]:
        profile = network_profile(source.contracts[network], source.facts, limits, static)
        # A VAE that overflows in fp16 (SDXL's: force_upcast) gets an fp32 engine in an fp16 build.
        net_fp16 = fp16 and not (source.facts.force_upcast and network.startswith("vae_"))
        flags = build_flags(network, source.networks[network].get("precision", "fp32"), net_fp16, source.extras,
                            quantize if network == QUANTIZED else None)
        fields = engine_key_fields(network, network_onnx_files(source, network), profile, flags, machine)
        key = engine_key(fields)
        action, reason = reuse_or_build(out_dir, old, network, key, fields)
        plans[network] = EnginePlan(network, source.networks[network]["file"], profile, flags, fields, key, action, reason)
    report = BuildReport(onnx_dir, out_dir, machine, limits, static, timing_cache, plans, dry_run)
    if dry_run:
        return report
    converter = fp16_converter or _convert_fp16
    if quantize:
        converter = _QuantConverter(converter, onnx_dir, source, limits, calibration_prompts, quantizer)
    write_build(source, onnx_dir, out_dir, report, engine_builder or build_with_tensorrt, progress, converter)
    report.seconds = time.perf_counter() - t_start
    return report


FP16_CONVERSION = "sdrt.export.fp16/1"  # bump when convert_to_fp16's output changes: it is in every key
MODELOPT_CONVERSION = "modelopt.onnx.quantization/1"  # sdrt.export.tensorrt_quant's call; bump when it changes


def build_flags(network: str, precision: str, fp16: bool, extras: dict | None = None, quantize: str | None = None) -> dict:
    """A network's build: always strongly typed; fp16 from an fp16 graph, converted first for an fp32 export;
    quantize ("int8"/"fp8"): Model Optimizer's Q/DQ nodes (and fp16 for the rest) written first."""
    if quantize:
        return {"precision": f"{quantize}+fp16", "strongly_typed": True, "converted": f"{MODELOPT_CONVERSION}:{quantize}", "tf32": False}
    if precision == "fp16":
        if not fp16:
            raise InputError(
                f"the {network} ONNX file is fp16, so its engine is fp16 too; for fp32 engines build from an fp32 "
                "export (`sdrt export` without --fp16), or drop --no-fp16"
            )
        return {"precision": "fp16", "strongly_typed": True, "converted": None, "tf32": False}
    if not fp16:
        return {"precision": "fp32", "strongly_typed": True, "converted": None, "tf32": False}
    upcast = bool((extras or {}).get("unet_upcast_attention")) and network == "unet"
    return {"precision": "fp16", "strongly_typed": True, "converted": FP16_CONVERSION + ("+upcast" if upcast else ""), "tf32": False}


# --- the cache ---------------------------------------------------------------------------------------------------


def default_timing_cache(machine: MachineInfo) -> Path:
    """One timing cache per GPU model and TensorRT version (TensorRT refuses a foreign one anyway)."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sdrt" / "tensorrt"
    slug = engine_key({"gpu": machine.gpu, "cc": machine.compute_capability, "trt": machine.tensorrt})[:12]
    return base / f"timing-{slug}.cache"


def previous_build(out_dir: Path) -> Manifest | None:
    """The manifest of an earlier build at out_dir (its engines may be reused); None when there is none."""
    if not (out_dir / MANIFEST_NAME).exists():
        return None
    try:
        manifest = read_manifest(out_dir)
    except ModelError:
        return None  # damaged: everything is rebuilt
    return manifest if manifest.extras.get("engines") else None


def reuse_or_build(out_dir: Path, old: Manifest | None, network: str, key: str, fields: dict) -> tuple[str, str]:
    entry = (old.extras["engines"].get(network) if old else None) or {}
    if not entry:
        return "build", "no engine yet"
    try:
        old_fields = read_sidecar(out_dir, entry)
    except ModelError as err:
        return "build", f"the old engine is unusable: {err}"
    if entry.get("key") != key:
        return "build", describe_mismatch(old_fields, fields) or "its key changed"
    file, info = out_dir / entry["file"], old.files.get(entry["file"], {})
    if not file.exists() or file.stat().st_size != info.get("size"):
        return "build", "the old engine file is missing or truncated"
    return "reuse", "its key matches"


def check_out_dir(onnx_dir: Path, out_dir: Path) -> None:
    src, dst = onnx_dir.resolve(), out_dir.resolve()
    if dst == src or src in dst.parents or dst in src.parents:
        raise InputError(f"output folder {out_dir} overlaps the ONNX export {onnx_dir}; pick a folder beside it, e.g. {onnx_dir}-trt")
    if not out_dir.exists():
        return
    if out_dir.is_file() or (any(out_dir.iterdir()) and not (out_dir / MANIFEST_NAME).exists()):
        raise InputError(f"{out_dir} exists and is not an sdrt export; pick another folder")
    if (out_dir / MANIFEST_NAME).exists() and previous_build(out_dir) is None:
        try:
            is_export = bool(read_manifest(out_dir).networks)
        except ModelError:
            is_export = False
        if is_export:
            raise InputError(f"{out_dir} is an ONNX export without engines; build into another folder, e.g. {out_dir}-trt")


# --- building and writing ----------------------------------------------------------------------------------------


def _convert_fp16(src: Path, dst: Path, upcast_attention: bool) -> None:
    from sdrt.export.fp16 import convert_file

    convert_file(src, dst, upcast_attention=upcast_attention)


def build_with_tensorrt(onnx_path: Path, profile: dict, flags: dict, timing_cache: Path):
    """One serialised engine (IHostMemory) through TensorRT's API, on TensorRT 10 and 11 alike: a strongly typed
    network (the flag where it still exists; TensorRT 11 networks are always strongly typed), no precision
    builder flags (removed in 11), TF32 cleared where asked, the timing cache read and updated."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    if not builder:
        raise BackendError("TensorRT could not create a builder (no GPU, or the driver is too old: see `sdrt info`)")
    network_flags = 0
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if flags.get("strongly_typed", True) and strongly_typed is not None:
        network_flags |= 1 << int(strongly_typed)
    network = builder.create_network(network_flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # external data is read relative to the file
        errors = [parser.get_error(i) for i in range(parser.num_errors)]
        errors = "; ".join(str(e.desc() if hasattr(e, "desc") else e) for e in errors) or "no error reported"
        raise BackendError(f"TensorRT could not parse {onnx_path}: {errors[:500]}")
    config = builder.create_builder_config()
    trt_profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile.items():
        trt_profile.set_shape(name, tuple(lo), tuple(opt), tuple(hi))
    config.add_optimization_profile(trt_profile)
    tf32 = getattr(getattr(trt, "BuilderFlag", None), "TF32", None)
    if tf32 is not None and not flags.get("tf32", False):
        config.clear_flag(tf32)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.exists() else b"")
    config.set_timing_cache(cache, ignore_mismatch=True)  # a foreign cache is ignored, not an error
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise BackendError(f"TensorRT built no engine from {onnx_path} (see its log above)")
    timing_cache.write_bytes(memoryview(config.get_timing_cache().serialize()))
    return engine


def write_build(source: Manifest, onnx_dir: Path, out_dir: Path, report: BuildReport, engine_builder, progress: bool, converter=_convert_fp16) -> None:
    """Link the export, build or reuse each engine, write the manifest, then rename the folder into place."""
    from tqdm.auto import tqdm

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    from sdrt.export.onnx_export import remove_stale_partials

    remove_stale_partials(out_dir)  # what killed runs left in this folder
    tmp = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    work_cache = tmp / ".timing.cache"
    try:
        tmp.mkdir()
        for rel in export_files(source):  # the ONNX export itself: the folder also runs on ONNX Runtime
            link_or_copy(onnx_dir / rel, tmp / rel)
        (tmp / ENGINES_DIR).mkdir()
        if report.timing_cache.exists():
            shutil.copy2(report.timing_cache, work_cache)
        bar = tqdm(report.plans.values(), desc="tensorrt", unit="engine", disable=not progress)
        for plan in bar:
            bar.set_postfix_str(plan.network)
            if plan.action == "reuse":
                link_or_copy(out_dir / plan.file, tmp / plan.file)
                plan.action = "reused"
            else:
                build_one(source, onnx_dir, tmp, plan, work_cache, engine_builder, converter)
                plan.action = "built"
            plan.bytes = (tmp / plan.file).stat().st_size
            write_json(tmp / plan.sidecar, {"format": ENGINE_FORMAT, "key": plan.key, "key_fields": plan.fields,
                                             "built_by": f"sdrt {__version__}", "seconds": round(plan.seconds, 2)})  # fmt: skip
        bar.close()
        manifest = build_manifest(source, onnx_dir, tmp, report)
        manifest.write(tmp)
        read_manifest(tmp)  # what the runtime will do: refuse now rather than later
        if work_cache.exists() and any(p.action == "built" for p in report.plans.values()):
            report.timing_cache.parent.mkdir(parents=True, exist_ok=True)
            part = report.timing_cache.with_name(report.timing_cache.name + f".{os.getpid()}.tmp")
            shutil.move(str(work_cache), part)
            part.replace(report.timing_cache)
        work_cache.unlink(missing_ok=True)
        replace_folder(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def build_one(source: Manifest, onnx_dir: Path, tmp: Path, plan: EnginePlan, work_cache: Path, engine_builder, converter=_convert_fp16) -> None:
    for rel, sha in plan.fields["onnx_sha256"].items():  # the key promises these bytes: check them now
        if sha256_of(onnx_dir / rel) != sha:
            raise ModelError(f"{onnx_dir / rel} changed since the export was written (sha256 differs); re-export it with `sdrt export`")
    t0 = time.perf_counter()
    onnx_path = onnx_dir / plan.onnx
    converted = None
    if plan.flags.get("converted"):  # an fp16 engine from an fp32 export: build from an fp16 graph
        converted = tmp / ".fp16" / plan.network / Path(plan.onnx).name
        converted.parent.mkdir(parents=True, exist_ok=True)
        try:
            if isinstance(converter, _QuantConverter) and plan.flags["converted"].startswith(MODELOPT_CONVERSION):
                converter.quantize(onnx_path, converted, plan.flags["converted"].rsplit(":", 1)[1])
            else:
                converter(onnx_path, converted, plan.flags["converted"].endswith("+upcast"))
        except (BackendError, ModelError, InputError):
            raise
        except Exception as err:
            raise BackendError(
                f"could not convert {onnx_path} to fp16 for its engine ({_first(err)}); export with `sdrt export --fp16` "
                "and build from that, or build fp32 engines with --no-fp16"
            ) from err
        onnx_path = converted
    try:
        engine = engine_builder(onnx_path, plan.profile, plan.flags, work_cache)
    except (BackendError, ModelError, InputError):
        raise
    except Exception as err:  # TensorRT raises its own errors
        raise BackendError(f"TensorRT could not build the {plan.network} engine from {onnx_dir / plan.onnx} ({_first(err)}); nothing was written") from err
    finally:
        if converted is not None:
            shutil.rmtree(converted.parent.parent, ignore_errors=True)  # the engine is what stays
    if engine is None or memoryview(engine).nbytes == 0:
        raise BackendError(f"TensorRT built no {plan.network} engine (see its log above); nothing was written")
    with open(tmp / plan.file, "wb") as f:
        f.write(memoryview(engine))
    plan.seconds = time.perf_counter() - t0


def build_manifest(source: Manifest, onnx_dir: Path, tmp: Path, report: BuildReport) -> Manifest:
    """The export's manifest plus the engines: their entries in extras['engines'] and their files' hashes."""
    limits = report.limits.to_dict() | ({"static": list(report.static)} if report.static else {})
    engines = {
        p.network: {"file": p.file, "sidecar": p.sidecar, "key": p.key, "flags": p.flags,
                    "profile": {n: [list(s) for s in shapes] for n, shapes in p.profile.items()}}  # fmt: skip
        for p in report.plans.values()
    }
    manifest = Manifest(
        facts=source.facts,
        contracts=source.contracts,
        networks=source.networks,
        files=export_files(source),  # the linked export files are the export's bytes: its hashes hold
        limits=limits,
        versions={**source.versions, "tensorrt": report.machine.tensorrt, "sdrt_build": __version__},
        tokenizer=source.tokenizer,
        scheduler=source.scheduler,
        token_embeddings=source.token_embeddings,
        extras={**source.extras, "onnx_export": str(onnx_dir.resolve()), "engines": engines},
    )
    manifest.record_files(tmp, [rel for p in report.plans.values() for rel in (p.file, p.sidecar)])
    return manifest


def export_files(source: Manifest) -> dict:
    """The export's own files (a folder built by `sdrt build` can be built from again: its engines are left out)."""
    return {rel: info for rel, info in source.files.items() if not rel.startswith(ENGINES_DIR + "/")}


def _first(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__


def link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links not allowed
        shutil.copy2(src, dst)


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2))




class _QuantConverter:
    """The fp16 converter, plus Model Optimizer's Q/DQ pass for the quantised network (its calibration recorded once,
    when first needed: a rebuild that reuses the UNet engine samples nothing)."""

    def __init__(self, fp16_converter, onnx_dir: Path, source: Manifest, limits: ShapeLimits, prompts, quantizer):
        self.fp16_converter, self.onnx_dir, self.source, self.limits = fp16_converter, onnx_dir, source, limits
        self.prompts, self.quantizer = prompts, quantizer

    def __call__(self, src, dst, upcast):
        return self.fp16_converter(src, dst, upcast)

    def quantize(self, src: Path, dst: Path, mode: str) -> None:
        from sdrt.export.int8_quality import default_prompts
        from sdrt.export.tensorrt_quant import quantize_onnx, record_calibration

        prompts = list(self.prompts) if self.prompts else default_prompts(False)
        step = self.source.facts.size_step
        size = min(self.limits.opt_size, max(step, 256 // step * step))  # calibration runs on the CPU: keep it small
        quantize_onnx(src, dst, mode, record_calibration(self.onnx_dir, prompts, size), self.quantizer)
