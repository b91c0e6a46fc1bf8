"""`sdrt export --int8`: an fp32 export, calibrated and quantised, with its quality measured against the fp32 one.

    report = export_int8("models/sd15", "exports/sd15-int8", calibration_prompts=["a fox", ...])

Which networks: `networks` (`--int8-networks`), default DEFAULT_NETWORKS: the UNet (by the chosen scheme) and the VAE
decoder and encoder (static convs, sdrt.export.int8.network_scheme), the ones that keep the quality bar on the
built-in model (benchmarks/results/int8-schemes.md, "Other networks"); the text encoder (dynamic int8 MatMuls) on
request only: with the UNet's int8 it took the built-in model's 20-step PSNR under 30 dB (26.4) for ~0.06 s of a
~5 s SD 1.5 image.

Steps: export fp32 into a hidden folder beside OUT (the networks that get quantised without Winograd rewrites, which
would turn their convs into transforms int8 cannot follow, but for the UNet's layers its scheme keeps fp32:
sdrt.export.int8.kept_modules; the UNet's transformer blocks in ORT's CPU forms, CPU_TRANSFORMERS); record the inputs of the networks a static scheme
calibrates while that export samples the calibration prompts (sdrt.export.int8_quality.record_feeds: the UNet's at
every step, the decoder's latents, the decoded images for the encoder); quantise (sdrt.export.int8) into a second
hidden folder; sample the quality prompts with both and compare (PSNR; the VAE decoder's alone on the calibration
latents, the encoder's by a round trip through the fp32 decoder on the decoded images, when they are quantised; on
the built-in model the oracle's digit and colour accuracy too); write the report into the manifest (extras["int8"]["quality"]) and as int8_quality.json; rename into place. The fp32
folder is removed at the end, whatever happens.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from sdrt.errors import InputError
from sdrt.info import int8_quality_lines

DEFAULT_NETWORKS = ("unet", "vae_decoder", "vae_encoder")  # those that keep the quality bar (module docstring)
INT8_NETWORKS = ("unet", "text_encoder", "text_encoder_2", "vae_decoder", "vae_encoder")  # what --int8-networks takes
CALIBRATION_STEPS = 8  # steps per calibration prompt (PNDM: one more UNet call): ranges over the whole trajectory
CALIBRATION_SAMPLES = 32  # UNet calls kept, spread over all prompts and steps (merged sdrt.export.int8.CALIBRATION_CHUNK at a time)
QUALITY_STEPS = 20
# The UNet's transformer blocks in ONNX Runtime CPU forms (self-attention as ORT's fused MultiHeadAttention where the
# tokens are many, GEGLU as two MatMuls: sdrt.export.attention, sdrt.export.geglu): only ORT's CPU provider runs an
# int8 export; measured faster on the SD 1.5-shape UNet call (benchmarks/results/int8-unet-profile.md).
CPU_TRANSFORMERS = ("unet",)


def export_int8(model, out_dir, scheme: str | None = None, calibration_prompts=None, quality: bool = True,
                quality_prompts: int = 4, threads: int | None = None, force: bool = False, progress: bool = True,
                winograd: bool = False, networks=None, **export_options):
    """Export `model` with `networks` (default DEFAULT_NETWORKS) quantised to int8: the UNet by `scheme` (default
    sdrt.export.int8.DEFAULT_SCHEME), the others by sdrt.export.int8.network_scheme.

    calibration_prompts: prompts sampled by the fp32 export to calibrate activation ranges (default: a built-in
    spread; for the built-in model, digit prompts). quality: compare with fp32 on `quality_prompts` of them at the
    export's min size, QUALITY_STEPS steps, guidance 7.5, seed 0 (and, for the built-in model, the oracle's 50 prompts).
    Other options go to export_model for the fp32 export. Returns (ExportReport of the fp32 export, int8 record).
    """
    from sdrt.export.int8 import DEFAULT_SCHEME, SCHEMES, STATIC_SCHEMES, network_scheme, quantize_export
    from sdrt.export.int8_quality import decode_psnr, default_prompts, encode_psnr, quality_report, record_feeds
    from sdrt.export.onnx_export import check_out_dir, export_model, replace_folder
    from sdrt.model.manifest import read_manifest

    scheme = scheme or DEFAULT_SCHEME
    if scheme not in SCHEMES:
        raise InputError(f"int8 scheme {scheme!r} is not one of {', '.join(SCHEMES)}")
    if export_options.get("fp16"):
        raise InputError("--int8 starts from an fp32 export; drop --fp16")
    if export_options.get("share_weights"):
        raise InputError("--int8 stores its own int8 weights; drop --share-weights")
    explicit, networks = networks is not None, check_networks(networks)
    if quality_prompts < 1:
        raise InputError(f"quality prompts {quality_prompts} must be at least 1")
    model, out_dir = Path(model).expanduser(), Path(out_dir).expanduser()
    check_out_dir(model, out_dir, force)
    networks = _check_family_networks(model, networks, explicit)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    fp32 = out_dir.parent / f".{out_dir.name}.fp32-{os.getpid()}"
    tmp = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    t0 = time.perf_counter()
    try:
        # The fp32 export and the calibration sampling each run in a child process: their memory (torch's model,
        # ONNX Runtime's sessions) goes back before ORT's quantiser loads the UNet again (SD 1.5 in one process: >16 GB).
        report = in_child(export_model, model, fp32, progress=progress, force=True, winograd=winograd,
                          no_winograd=networks, winograd_kept={"unet": scheme} if "unet" in networks else {},
                          cpu_transformers=CPU_TRANSFORMERS, **export_options)
        manifest = read_manifest(fp32)
        networks = _present(networks, manifest.networks, explicit, f"this {manifest.facts.family} model")
        is_digits = _is_builtin(manifest)
        prompts = list(calibration_prompts) if calibration_prompts else default_prompts(is_digits)
        limits = manifest.limits
        calib_size = min(limits["opt_size"], max(limits["min_size"], 256 // manifest.facts.size_step * manifest.facts.size_step))
        t1 = time.perf_counter()
        static = [n for n in networks if network_scheme(n, scheme)[0] in STATIC_SCHEMES]
        feeds = in_child(record_feeds, fp32, prompts, calib_size, CALIBRATION_STEPS, 7.5, static,
                         {"unet": CALIBRATION_SAMPLES}, threads=threads) if static else {}
        calibration = {"prompts": len(prompts), "size": calib_size, "steps": CALIBRATION_STEPS,
                       "unet_calls": len(feeds.get("unet", [])), "calls": {n: len(f) for n, f in feeds.items()},
                       "seconds": time.perf_counter() - t1}
        shutil.rmtree(tmp, ignore_errors=True)
        t2 = time.perf_counter()
        # Quantising and the quality report run in children too: ORT's quantiser holds the fp32 UNet and its int8
        # copy, the report an fp32 and an int8 pipeline one after the other, and none of that need stay in this process.
        stats = in_child(quantize_export, fp32, tmp, scheme, networks, feeds,
                         **{k: export_options[k] for k in ("conv_tactics", "tactic_threads", "tactic_cache_dir")
                            if k in export_options})
        record = {"scheme": scheme, "networks": stats, "calibration": calibration,
                  "quantize_seconds": time.perf_counter() - t2}
        if quality:
            record["quality"] = in_child(quality_report, fp32, tmp, prompts[:quality_prompts], limits["min_size"],
                                         QUALITY_STEPS, 7.5, is_digits, threads)
            if "vae_decoder" in networks:
                record["quality"]["decode_psnr_db"] = in_child(decode_psnr, fp32, tmp, feeds["vae_decoder"], threads)
            if "vae_encoder" in networks:
                record["quality"]["encode_psnr_db"] = in_child(encode_psnr, fp32, tmp, feeds["vae_encoder"], threads)
        manifest = read_manifest(tmp)
        manifest.extras["int8"].update(record)
        (tmp / "int8_quality.json").write_text(json.dumps(record, indent=1))
        manifest.record_files(tmp, ["int8_quality.json"])
        manifest.write(tmp)
        read_manifest(tmp)
        replace_folder(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(fp32, ignore_errors=True)
    record["seconds"] = time.perf_counter() - t0
    return report, record


def check_networks(networks) -> tuple[str, ...]:
    """The networks to quantise, from a list or a comma-separated string (None: DEFAULT_NETWORKS); one-line error."""
    if networks is None:
        return DEFAULT_NETWORKS
    names = [n.strip() for n in (networks.split(",") if isinstance(networks, str) else networks) if n.strip()]
    bad = [n for n in names if n not in INT8_NETWORKS]
    if bad or not names:
        raise InputError(f"--int8-networks {','.join(bad) or repr(networks)}: pick one or more of {','.join(INT8_NETWORKS)} "
                         f"(comma-separated; default {','.join(DEFAULT_NETWORKS)})")
    return tuple(dict.fromkeys(names))


def _check_family_networks(model: Path, networks: tuple, explicit: bool) -> tuple:
    """`networks` as a diffusers folder's family has them: every one asked for `explicit`ly must be there, the defaults
    it lacks are dropped (checked again on the fp32 export, for single files)."""
    if not (model / "model_index.json").is_file():
        return networks
    from sdrt.families import family_spec
    from sdrt.model.facts import read_model_facts

    return _present(networks, family_spec(read_model_facts(model).family).networks, explicit, "this model")


def _present(networks: tuple, have, explicit: bool, what: str) -> tuple:
    """`networks` less those not in `have`; when they were named `explicit`ly, a missing one is a one-line error."""
    missing = [n for n in networks if n not in have]
    if missing and explicit:
        raise InputError(f"--int8-networks {','.join(missing)}: {what} has no such network; pick from "
                         f"{', '.join(n for n in INT8_NETWORKS if n in have)}")
    return tuple(n for n in networks if n in have)


def in_child(fn, *args, **kwargs):
    """fn(*args, **kwargs) in a fresh (spawned) process; its result or exception comes back, its memory does not."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args, **kwargs).result()


def _is_builtin(manifest) -> bool:
    from sdrt.builtin import builtin_model_dir

    source = manifest.extras.get("source")
    try:
        return source is not None and Path(source).resolve() == builtin_model_dir().resolve()
    except Exception:
        return False


def summary(out_dir, record: dict) -> str:
    """Lines for the CLI: what was quantised and what it cost."""
    lines = [f"int8 ({record['scheme']}) export at {out_dir} in {record.get('seconds', 0):.1f} s"]
    for name, st in record["networks"].items():
        ops = ", ".join(f"{k} {v}" for k, v in sorted(st["quantized"].items()))
        forms = st.get("conv_forms") or {}
        convs = (f"; int8 convs: {forms['gemm']} as GEMM, {forms['qlinearconv']} as QLinearConv ({forms['by']})"
                 if forms.get("gemm") or forms.get("qlinearconv") else "")
        lines.append(f"  {name} ({st['scheme']}): {st['bytes_before'] / 1e6:.1f} -> {st['bytes_after'] / 1e6:.1f} MB; "
                     f"{len(st['kept_fp32'])} Conv/MatMul kept fp32; {ops}{convs}")
    lines += ["  " + line for line in int8_quality_lines(record.get("quality"))]
    return "\n".join(lines)
