"""`sdrt info`: what a model folder holds, and which backends can run it on this machine."""

from __future__ import annotations

from pathlib import Path

from sdrt.backends.base import available_backends
from sdrt.families import family_spec
from sdrt.model.source import open_model


def _size(path: Path) -> str:
    total = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size
    return f"{total / 1e6:.1f} MB"


def describe_model(model: str | Path | None, verify: bool = False) -> tuple[str, bool]:
    """A readable report, and False when --verify found damaged files."""
    if model is None:
        from sdrt.builtin import builtin_model_dir

        model = builtin_model_dir()
    source = open_model(model)
    f = source.facts
    sched = source.scheduler_config
    lines = [
        f"model        {source.path}",
        f"kind         {'sdrt export' if source.manifest else 'diffusers folder'}" + (" + diffusers weights" if source.manifest and source.is_diffusers else ""),
        f"family       {f.family}: {family_spec(f.family).title}  (prediction: {f.prediction_type})",
        f"scheduler    {sched.get('_class_name', '?')}  ({sched.get('beta_schedule', '?')}, {sched.get('num_train_timesteps', '?')} train steps)",
        f"latents      {f.latent_channels} channels, VAE /{f.vae_scale_factor}, scaling factor {f.scaling_factor}"
        + (f", per-channel mean {list(f.latents_mean)} and std {list(f.latents_std)}" if f.latents_mean else ""),
        "inpainting   " + (f"dedicated inpainting UNet ({f.unet_input_channels} input channels: latents, mask, masked image); "
                             "needs --image and --mask" if f.inpainting_unet else "by masking the latents each step (--image, --mask)"),
        f"size         default {f.default_size}x{f.default_size}; height and width must be multiples of {f.size_step}",
        f"text         {f.text_seq_len} tokens x {f.text_hidden_size or f.text_hidden_size_2}, vocabulary {f.vocab_size}",
    ]
    if f.time_ids_dim:  # SDXL
        widths = " + ".join(str(w) for w in (f.text_hidden_size, f.text_hidden_size_2) if w)
        lines.insert(-1, f"sdxl         text states {widths} channels, pooled {f.pooled_dim}, {f.time_ids_dim} time ids"
                     + (" (aesthetic score)" if f.requires_aesthetics_score else "")
                     + (", empty negative = zeros" if f.force_zeros_for_empty_prompt else "")
                     + (", VAE kept fp32 (force_upcast)" if f.force_upcast else ""))
    lines.append("components")
    if source.manifest:
        for name, net in source.manifest.networks.items():
            files = [p for p in (source.path / net["file"]).parent.glob(Path(net["file"]).name + "*")]  # + .data
            size = sum(p.stat().st_size for p in files) / 1e6
            split = net.get("step_split")
            lines.append(f"  {name:<14} {net['file']}  ({net.get('precision', 'fp32')}, {size:.1f} MB)"
                         + (f"; step split: {split['prepass']} once per generation, {split['step']} per step"
                            f" ({split['carried']} tensors carried)" if split else ""))
        lines += _int8_lines(source.manifest.extras.get("int8"))
    else:
        for name in family_spec(f.family).components:
            lines.append(f"  {name:<14} {_size(source.path / name)}")
    ok = True
    if verify:
        if source.manifest is None:
            lines.append("verify       nothing to verify: a diffusers folder has no manifest")
        else:
            bad = source.manifest.verify(source.path)
            ok = not bad
            lines.append("verify       all files match the manifest" if ok else f"verify       DAMAGED: {', '.join(bad)}; re-export")
    lines.append("backends here")
    runnable = {"torch": source.is_diffusers, "onnx": source.manifest is not None, "tensorrt": bool(source.manifest and source.manifest.extras.get("engines"))}
    for name, why in available_backends().items():
        mark = "yes" if runnable.get(name) and not why.startswith(("not installed", "refused")) else "no "
        lines.append(f"  {mark} {name:<9} {why}" + ("" if runnable.get(name) else "  (this folder has nothing for it)"))
    from sdrt.backends.tensorrt_machine import nvidia_driver_version

    driver = nvidia_driver_version()
    lines.append(f"gpu driver   {'NVIDIA ' + driver if driver else 'none loaded (no NVIDIA GPU, or its driver is not loaded)'}")
    lines.append(f"default      {source.default_backend()}")
    return "\n".join(lines), ok


def _int8_lines(record: dict | None) -> list[str]:
    """What `sdrt export --int8` did and measured (extras["int8"]), in two or three lines."""
    if not record:
        return []
    nets = ", ".join(f"{n} ({st.get('scheme', record.get('scheme'))}{_conv_forms(st)}{_weight_bits(st)})"
                     for n, st in record.get("networks", {}).items())
    lines = [f"int8         {nets} (onnxruntime {record.get('onnxruntime', '?')})"]
    return lines + ["  " + line for line in int8_quality_lines(record.get("quality"))]


def _weight_bits(stats: dict) -> str:
    """"; 7-bit weights" for an export made for CPUs whose int8 kernels saturate (sdrt.cpu.int8_weight_bits)."""
    return f"; {stats['weight_bits']}-bit weights" if stats.get("weight_bits", 8) != 8 else ""


def _conv_forms(stats: dict) -> str:
    """"; convs: 24 int8 GEMM, 18 QLinearConv" (sdrt.export.int8_conv_gemm's picks), or "" when none were made."""
    forms = stats.get("conv_forms") or {}
    parts = [f"{forms[k]} {label}" for k, label in (("gemm", "int8 GEMM"), ("qlinearconv", "QLinearConv")) if forms.get(k)]
    return "; convs: " + ", ".join(parts) if parts else ""


def int8_quality_lines(q: dict | None) -> list[str]:
    """An int8 export's measured quality (its record's "quality"): for `sdrt info` and `sdrt export --int8` alike."""
    if not q:
        return []
    worst = f" (worst image {q['psnr_min_db']:.1f})" if "psnr_min_db" in q else ""
    lines = [f"quality    PSNR {q['psnr_db']:.1f} dB{worst} vs the fp32 export ({q['prompts']} prompts, {q['size']} px, "
             f"{q['steps']} steps, seed {q['seed']})"]
    if "decode_psnr_db" in q:
        lines.append(f"vae decode PSNR {q['decode_psnr_db']:.1f} dB alone (the same latents through fp32 and int8)")
    if "encode_psnr_db" in q:
        lines.append(f"vae encode PSNR {q['encode_psnr_db']:.1f} dB alone (round trip through the fp32 decoder)")
    o = q.get("oracle")
    if o:
        lines.append(f"oracle     digit {o['int8']['digit']:.0%} / colour {o['int8']['colour']:.0%} "
                     f"(fp32 {o['fp32']['digit']:.0%} / {o['fp32']['colour']:.0%}; 50 prompts, guidance 7.5, 20 steps; "
                     f"PSNR {o['psnr_db']:.1f} dB)")
    return lines
