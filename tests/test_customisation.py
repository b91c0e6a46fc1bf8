"""Textual inversion, single-file checkpoints and LoRA, against diffusers on tiny random-weight models.

Whole pipelines are compared on final latents at guidance 2.0: max|diff| <= 1e-5 * max|ref|, on PyTorch and ONNX
Runtime alike. Single files are written from a diffusers model with the inverse of the original -> diffusers
renaming (below), converted back by sdrt, and must give the same configs, weights and latents. LoRAs fused by sdrt
(which reads and fuses the files itself) are compared with diffusers' load_lora_weights + fuse_lora, and with
W + scale * alpha/rank * up @ down written out here for every layer."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import sdrt
from sdrt.cli import main as cli_main
from sdrt.errors import BackendError, InputError, ModelError
from sdrt.model.manifest import read_manifest, sha256_of

BOUND = 1e-5  # measured here: <= 3.4e-7 on PyTorch and ONNX Runtime
RUN = dict(num_inference_steps=4, guidance_scale=2.0, height=64, width=64)


def assert_close(got, expected, bound, what):
    err = np.abs(got - expected).max() / np.abs(expected).max()
    assert err <= bound, f"{what}: max relative diff {err:.2e} > {bound:.0e}"


def reference_latents(ref, prompt, seed=5, negative_prompt=None):
    with torch.no_grad():
        return ref(prompt, negative_prompt=negative_prompt, generator=torch.Generator("cpu").manual_seed(seed),
                   output_type="latent", **RUN).images.numpy()


def our_latents(pipe, prompt, seed=5, negative_prompt=None):
    return pipe(prompt, negative_prompt=negative_prompt, seed=seed, output_type="latent", progress=False, **RUN).images


def diffusers_pipe(folder):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --- textual inversion ------------------------------------------------------------------------------------------

HIDDEN = 32  # the tiny models' text width


@pytest.fixture(scope="module")
def embeddings(tmp_path_factory):
    """One file per format: (path, token sdrt should use, token to pass diffusers, vectors)."""
    folder = tmp_path_factory.mktemp("embeddings")
    g = torch.Generator().manual_seed(3)
    vec = lambda n: torch.randn(n, HIDDEN, generator=g) * 0.5  # noqa: E731
    files = {}
    v = vec(1)[0]  # diffusers: a single vector saved 1-D
    save_file({"<dsafe>": v}, str(folder / "learned_embeds.safetensors"))
    files["diffusers-safetensors"] = (folder / "learned_embeds.safetensors", "<dsafe>", None, v[None])
    v = vec(3)
    torch.save({"<dbin>": v}, folder / "multi.bin")
    files["diffusers-bin-3vec"] = (folder / "multi.bin", "<dbin>", None, v)
    v = vec(2)
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": v}, "name": "<a1111pt>", "step": 500,
                "sd_checkpoint": "abc", "sd_checkpoint_name": "tiny"}, folder / "a1111.pt")
    files["a1111-pt-2vec"] = (folder / "a1111.pt", "<a1111pt>", None, v)
    v = vec(2).bfloat16()  # bfloat16, which safetensors' numpy API cannot read
    save_file({"emb_params": v}, str(folder / "stylish.safetensors"))
    # A1111 names the token after the file; diffusers would call it "emb_params", so it is given the file's name.
    files["a1111-safetensors-bf16"] = (folder / "stylish.safetensors", "stylish", "stylish", v.float())
    return files


@pytest.fixture(scope="module")
def ti_pipes(tiny_sd1, onnx_sd1):
    ref = diffusers_pipe(tiny_sd1)
    return ref, {"torch": sdrt.Pipeline.from_pretrained(tiny_sd1, backend="torch"),
                 "onnx": sdrt.Pipeline.from_pretrained(onnx_sd1, backend="onnx")}


@pytest.mark.parametrize("fmt", ["diffusers-safetensors", "diffusers-bin-3vec", "a1111-pt-2vec", "a1111-safetensors-bf16"])
def test_embedding_equals_diffusers_on_each_backend(ti_pipes, embeddings, fmt):
    ref, ours = ti_pipes
    path, token, ref_token, vectors = embeddings[fmt]
    prompt = f"a photo of {token} on a table"
    ref.load_textual_inversion(str(path), token=ref_token)
    try:
        expected = reference_latents(ref, prompt, negative_prompt=f"blurry {token}")
    finally:
        ref.unload_textual_inversion()
    for backend, pipe in ours.items():
        tokens = pipe.load_textual_inversion(path)
        try:
            assert tokens == [token] + [f"{token}_{i}" for i in range(1, len(vectors))]
            assert np.array_equal(pipe.token_table[-len(vectors):], vectors.numpy())
            got = our_latents(pipe, prompt, negative_prompt=f"blurry {token}")
        finally:
            pipe.unload_textual_inversion()
        assert_close(got, expected, BOUND, f"{fmt} on {backend}")


def test_several_at_once_then_unload_restores(ti_pipes, embeddings):
    ref, ours = ti_pipes
    pipe = ours["torch"]
    table, vocab = pipe.token_table.copy(), pipe.tokenizer.vocab_size
    baseline = pipe.encode_prompts(["a cat"])
    (p1, t1, _, _), (p2, t2, _, _) = embeddings["diffusers-bin-3vec"], embeddings["a1111-pt-2vec"]
    prompt = f"{t2} and {t1}, {t1} again"
    ref.load_textual_inversion([str(p1), str(p2)])
    try:
        expected = reference_latents(ref, prompt)
    finally:
        ref.unload_textual_inversion()
    pipe.load_textual_inversion(p1)
    pipe.load_textual_inversion(p2, token="<renamed>")  # a token of one's own choosing
    pipe.load_textual_inversion(p2)
    try:
        assert_close(our_latents(pipe, prompt), expected, BOUND, "two embeddings")
        pipe.unload_textual_inversion(t1)  # the rows after it move down; the others still work
        assert set(pipe.textual_inversions) == {"<renamed>", t2}
        assert pipe.token_table.shape[0] == vocab + 4
        assert pipe.tokenizer.token_to_id(t1) is None and pipe.tokenizer.token_to_id(f"{t1}_2") is None
        row = pipe.token_table[pipe.tokenizer.token_to_id(f"{t2}_1")]
        assert np.array_equal(row, embeddings["a1111-pt-2vec"][3][1].numpy())
        with pytest.raises(InputError, match="no textual inversion"):
            pipe.unload_textual_inversion(t1)
    finally:
        pipe.unload_textual_inversion()
    assert pipe.textual_inversions == {} and pipe.tokenizer.vocab_size == vocab
    assert np.array_equal(pipe.token_table, table)
    assert np.array_equal(pipe.encode_prompts(["a cat"]), baseline)


def test_bad_embeddings_get_clear_errors(ti_pipes, embeddings, tmp_path, monkeypatch):
    pipe = ti_pipes[1]["torch"]
    table = pipe.token_table.copy()
    save_file({"<wide>": torch.zeros(1, 1024)}, str(tmp_path / "sd2.safetensors"))
    with pytest.raises(ModelError, match=r"sd2\.safetensors.*1024 wide.*takes 32.*SD 2\.x"):
        pipe.load_textual_inversion(tmp_path / "sd2.safetensors")
    save_file({"cat": torch.zeros(1, HIDDEN)}, str(tmp_path / "cat.safetensors"))
    with pytest.raises(InputError, match=r"cat\.safetensors: token 'cat' is already in the vocabulary.*token="):
        pipe.load_textual_inversion(tmp_path / "cat.safetensors")
    pipe.load_textual_inversion(embeddings["diffusers-bin-3vec"][0])
    with pytest.raises(InputError, match="already in the vocabulary"):  # loading the same one twice
        pipe.load_textual_inversion(embeddings["diffusers-bin-3vec"][0])
    pipe.unload_textual_inversion()
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(ModelError, match=r"junk\.safetensors is not a readable \.safetensors"):
        pipe.load_textual_inversion(tmp_path / "junk.safetensors")
    (tmp_path / "junk.txt").write_text("hello")
    with pytest.raises(ModelError, match=r"its content is unrecognised \(neither safetensors nor a torch pickle\)"):
        pipe.load_textual_inversion(tmp_path / "junk.txt")
    with pytest.raises(ModelError, match="does not exist"):
        pipe.load_textual_inversion(tmp_path / "missing.safetensors")
    save_file({"clip_l": torch.zeros(2, 768), "clip_g": torch.zeros(2, 1280)}, str(tmp_path / "xl.safetensors"))
    with pytest.raises(ModelError, match="SDXL embedding"):
        pipe.load_textual_inversion(tmp_path / "xl.safetensors")
    torch.save({"<evil>": torch.zeros(1, HIDDEN), "extra": InputError("an object")}, tmp_path / "objects.pt")
    with pytest.raises(ModelError, match=r"objects\.pt could not be read.*weights_only=True.*\.safetensors"):
        pipe.load_textual_inversion(tmp_path / "objects.pt")
    torch.save(torch.zeros(1, HIDDEN), tmp_path / "bare.pt")
    with pytest.raises(InputError, match="bare tensor"):
        pipe.load_textual_inversion(tmp_path / "bare.pt")
    from sdrt.backends import base

    monkeypatch.setattr(base, "module_available", lambda name: name != "torch")  # a machine without torch
    with pytest.raises(ModelError, match=r"multi\.bin is a pickle file.*only torch can read: convert .* to \.safetensors"):
        pipe.load_textual_inversion(embeddings["diffusers-bin-3vec"][0])
    monkeypatch.undo()
    assert pipe.textual_inversions == {} and np.array_equal(pipe.token_table, table)


# --- single-file checkpoints -----------------------------------------------------------------------------------------
# The inverse of diffusers' original -> diffusers renaming, written from the layout of the original repository
# (UNet input_blocks/middle_block/output_blocks, VAE encoder.down/decoder.up, CLIP or OpenCLIP text encoder).

RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"), ("conv2", "out_layers.3"),
          ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]


def unet_to_original(sd, config):
    n, per = len(config["block_out_channels"]), config["layers_per_block"] + 1
    up_attn = ["CrossAttn" in t for t in config["up_block_types"]]
    prefixes = [("time_embedding.linear_1.", "time_embed.0."), ("time_embedding.linear_2.", "time_embed.2."),
                ("conv_in.", "input_blocks.0.0."), ("conv_norm_out.", "out.0."), ("conv_out.", "out.2."),
                ("mid_block.attentions.0.", "middle_block.1."), ("mid_block.resnets.0.", "middle_block.0."),
                ("mid_block.resnets.1.", "middle_block.2.")]
    for i in range(n):
        for j in range(per - 1):
            prefixes += [(f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{per * i + j + 1}.0."),
                         (f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{per * i + j + 1}.1.")]
        for j in range(per):
            prefixes += [(f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{per * i + j}.0."),
                         (f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{per * i + j}.1.")]
        if i < n - 1:
            prefixes += [(f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{per * (i + 1)}.0.op."),
                         (f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{per * i + per - 1}.{2 if up_attn[i] else 1}.")]
    out = {}
    for key, value in sd.items():
        new = next(old + key[len(hf):] for hf, old in prefixes if key.startswith(hf))
        if ".resnets." in key:
            for hf, old in RESNET:
                new = new.replace(f".{hf}.", f".{old}.")
        out["model.diffusion_model." + new] = value
    return out


def vae_to_original(sd, config):
    n = len(config["block_out_channels"])
    prefixes = [("encoder.conv_norm_out.", "encoder.norm_out."), ("decoder.conv_norm_out.", "decoder.norm_out.")]
    for side in ("encoder", "decoder"):
        prefixes += [(f"{side}.mid_block.resnets.{j}.", f"{side}.mid.block_{j + 1}.") for j in range(2)]
        prefixes += [(f"{side}.mid_block.attentions.0.", f"{side}.mid.attn_1.")]
    for i in range(n):
        prefixes += [(f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block."),
                     (f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample."),
                     (f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{n - 1 - i}.block."),
                     (f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{n - 1 - i}.upsample.")]
    attn = {"group_norm.": "norm.", "to_q.": "q.", "to_k.": "k.", "to_v.": "v.", "to_out.0.": "proj_out."}
    out = {}
    for key, value in sd.items():
        new = next((old + key[len(hf):] for hf, old in prefixes if key.startswith(hf)), key)
        if ".mid.attn_1." in new:
            head, _, tail = new.partition(".mid.attn_1.")
            tail = next((tail.replace(a, b, 1) for a, b in attn.items() if tail.startswith(a)), tail)
            new = f"{head}.mid.attn_1.{tail}"
            value = value[:, :, None, None] if value.ndim == 2 else value  # LDM's attention is 1x1 convolutions
        out["first_stage_model." + new.replace("conv_shortcut", "nin_shortcut")] = value
    return out


def text_to_original(sd, family, generator):
    if family == "sd1":
        return {"cond_stage_model.transformer.text_model." + k: v for k, v in sd.items()}
    p = "cond_stage_model.model."
    names = {"embeddings.token_embedding.weight": "token_embedding.weight", "embeddings.position_embedding.weight":
             "positional_embedding", "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
    out = {p + names[k]: v for k, v in sd.items() if k in names}
    layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers."))
    for i in range(layers + 1):  # one more block than diffusers keeps: SD 2.x reads the penultimate layer
        src = {k[len(f"encoder.layers.{i}."):]: v for k, v in sd.items() if k.startswith(f"encoder.layers.{i}.")}
        if i == layers:
            src = {k: torch.randn(v.shape, generator=generator) for k, v in
                   {k[len("encoder.layers.0."):]: v for k, v in sd.items() if k.startswith("encoder.layers.0.")}.items()}
        r = f"{p}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[r + f"attn.in_proj_{kind}"] = torch.cat([src[f"self_attn.{q}_proj.{kind}"] for q in "qkv"])
            out[r + f"attn.out_proj.{kind}"] = src[f"self_attn.out_proj.{kind}"]
            out[r + f"ln_1.{kind}"], out[r + f"ln_2.{kind}"] = src[f"layer_norm1.{kind}"], src[f"layer_norm2.{kind}"]
            out[r + f"mlp.c_fc.{kind}"], out[r + f"mlp.c_proj.{kind}"] = src[f"mlp.fc1.{kind}"], src[f"mlp.fc2.{kind}"]
    out[p + "text_projection"] = torch.randn(sd["embeddings.token_embedding.weight"].shape[1], 16, generator=generator)
    return out


def build_ldm_tiny(folder, family, inpainting=False):
    """A tiny model of the original architecture's conventions: 32 norm groups, 64-wide text heads, SD 1.x's 8 UNet
    heads or SD 2.x's 64-wide ones, so that a single file of it says everything about it, as a real one does."""
    from diffusers import (AutoencoderKL, DDIMScheduler, PNDMScheduler, StableDiffusionInpaintPipeline,
                           StableDiffusionPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from sdrt.export.clip_vocab import write_clip_tokenizer
    from sdrt.export.tiny import SD15_SCHEDULER, SD21_SCHEDULER

    sd2 = family == "sd2"
    torch.manual_seed(1)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=9 if inpainting else 4, block_out_channels=(64, 64, 128) if sd2 else (32, 32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64,
        attention_head_dim=[1, 1, 2] if sd2 else 8, use_linear_projection=sd2, upcast_attention=sd2, norm_num_groups=32)
    vae = AutoencoderKL(block_out_channels=(32, 32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=1,
                        norm_num_groups=32, sample_size=64)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=64, intermediate_size=128, num_attention_heads=1, num_hidden_layers=2,
                                        hidden_act="gelu" if sd2 else "quick_gelu", vocab_size=49408, projection_dim=64,
                                        bos_token_id=49406, eos_token_id=49407, pad_token_id=0 if sd2 else 49407))
    with torch.no_grad():  # random weights with some scale, so that every tensor matters in the comparisons
        for p in list(unet.parameters()) + list(vae.parameters()):
            p.add_(torch.randn_like(p) * 0.02)
    tok_dir = write_clip_tokenizer(folder / "tokenizer", pad_token="!" if sd2 else "<|endoftext|>")
    tok = CLIPTokenizer.from_pretrained(tok_dir)
    scheduler = (DDIMScheduler if sd2 else PNDMScheduler).from_config(SD21_SCHEDULER if sd2 else SD15_SCHEDULER)
    (StableDiffusionInpaintPipeline if inpainting else StableDiffusionPipeline)(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=scheduler, safety_checker=None,
                            feature_extractor=None, requires_safety_checker=False).save_pretrained(folder)
    g = torch.Generator().manual_seed(2)
    state = {**unet_to_original(unet.state_dict(), unet.config), **vae_to_original(vae.state_dict(), vae.config),
             **text_to_original(text.state_dict(), family, g)}
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder.with_suffix(".safetensors")))
    return folder, folder.with_suffix(".safetensors")


@pytest.fixture(scope="module")
def ldm_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("ldm")
    return {family: build_ldm_tiny(root / f"tiny-{family}", family) for family in ("sd1", "sd2")}


def component_state(folder, name):
    from safetensors.torch import load_file

    files = list((folder / name).glob("*.safetensors"))
    assert len(files) == 1, files
    # CLIP keys with or without `text_model.` load alike (sdrt writes the prefix: transformers 4.x needs it).
    return {k.removeprefix("text_model."): v for k, v in load_file(str(files[0])).items()}


ARCH_KEYS = {
    "unet": ["block_out_channels", "layers_per_block", "down_block_types", "up_block_types", "cross_attention_dim",
             "attention_head_dim", "use_linear_projection", "transformer_layers_per_block", "norm_num_groups",
             "in_channels", "out_channels", "sample_size", "upcast_attention"],
    "vae": ["block_out_channels", "layers_per_block", "latent_channels", "norm_num_groups", "scaling_factor"],
    "text_encoder": ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "hidden_act",
                     "vocab_size", "max_position_embeddings"],
}


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_single_file_converts_to_the_original(ldm_models, family, tmp_path):
    original, single = ldm_models[family]
    pipe = sdrt.Pipeline.from_single_file(single, cache_dir=tmp_path, image_size=64)
    converted = pipe.source.path
    assert converted.parent.parent == tmp_path
    for name, keys in ARCH_KEYS.items():
        want, got = (json.loads((f / name / "config.json").read_text()) for f in (original, converted))
        assert {k: want[k] for k in keys} == {k: got[k] for k in keys}, name
        a, b = component_state(original, name), component_state(converted, name)
        assert set(a) == set(b), name
        assert all(torch.equal(a[k], b[k]) for k in a), name
    sched = json.loads((converted / "scheduler" / "scheduler_config.json").read_text())
    assert sched["prediction_type"] == ("v_prediction" if family == "sd2" else "epsilon")
    assert pipe.facts == sdrt.Pipeline.from_pretrained(original, backend="torch").facts
    expected = our_latents(sdrt.Pipeline.from_pretrained(original, backend="torch"), "a red cat")
    assert np.array_equal(our_latents(pipe, "a red cat"), expected)
    # Converted once: a second load reuses the cache folder.
    stamp = (converted / "model_index.json").stat().st_mtime_ns
    again = sdrt.Pipeline.from_single_file(single, cache_dir=tmp_path, image_size=64)
    assert again.source.path == converted and (converted / "model_index.json").stat().st_mtime_ns == stamp


def test_single_files_refused_by_name(tmp_path):
    from sdrt.export.single_file import convert_single_file

    conv = torch.zeros(8, 4, 3, 3)
    cases = {
        "depth": ({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 5, 3, 3),
                   "cond_stage_model.transformer.text_model.x": torch.zeros(1)}, "depth-to-image"),
        "sd3": ({"model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias": torch.zeros(1)}, "SD3"),
        "lora": ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(1, 1)},
                 "a LoRA, not a model"),
        "vae": ({"encoder.down.0.block.0.conv1.weight": conv}, "a VAE alone"),
        "lcm": ({"model.diffusion_model.input_blocks.0.0.weight": conv,
                 "model.diffusion_model.time_embed.cond_proj.weight": torch.zeros(1)}, "an LCM"),
    }
    for name, (state, what) in cases.items():
        save_file(state, str(tmp_path / f"{name}.safetensors"))
        with pytest.raises(ModelError, match=f"{name}.safetensors is .*{what}"):
            convert_single_file(tmp_path / f"{name}.safetensors", tmp_path / f"out-{name}")
    torch.save({"state_dict": {"model.diffusion_model.input_blocks.0.0.weight": conv}}, tmp_path / "model.ckpt")
    with pytest.raises(ModelError, match=r"model\.ckpt is a pickle checkpoint.*--allow-pickle"):
        convert_single_file(tmp_path / "model.ckpt", tmp_path / "out-ckpt")
    with pytest.raises(ModelError, match="no VAE"):  # with the flag it is read (and then found incomplete)
        convert_single_file(tmp_path / "model.ckpt", tmp_path / "out-ckpt", allow_pickle=True)
    assert not any(p.name.startswith("out-") for p in tmp_path.iterdir())


# --- LoRA -------------------------------------------------------------------------------------------------------------

UNET_TARGETS = ("attn1.to_q", "attn1.to_k", "attn2.to_v", "attn1.to_out.0", "proj_in", "ff.net.2", "resnets.0.conv1")
TEXT_TARGETS = ("self_attn.q_proj", "self_attn.out_proj", "mlp.fc1")


def layer_shapes(folder, component) -> dict:
    """{module name: weight shape} of a component's Linear/Conv layers, from its weights file."""
    from safetensors import safe_open

    with safe_open(str(next((folder / component).glob("*.safetensors"))), "np") as f:
        shapes = {k[: -len(".weight")]: tuple(f.get_slice(k).get_shape()) for k in f.keys() if k.endswith(".weight")}
    return {k.removeprefix("text_model."): v for k, v in shapes.items() if len(v) in (2, 4)}


def make_lora(folder, layout, rank=4, seed=0, mixed_alphas=False):
    """A random LoRA for the UNet and text encoder at `folder`: kohya (an alpha per layer: one for all, or mixed as
    LoCon's conv_alpha makes them) or diffusers/PEFT layout (alphas in the adapter metadata, one of them by pattern).
    Returns (file, {(component, module): (down, up, alpha)})."""
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for component, targets in (("unet", UNET_TARGETS), ("text_encoder", TEXT_TARGETS)):
        for name, shape in layer_shapes(folder, component).items():
            if name.endswith(targets):
                down = torch.randn(rank, *shape[1:], generator=g) * 0.2
                up = torch.randn(shape[0], rank, *([1, 1] if len(shape) == 4 else []), generator=g) * 0.2
                alpha = 8.0 if mixed_alphas and len(layers) % 3 == 0 else 2.0
                layers[component, name] = (down, up, alpha if layout == "kohya" else 2.0)
    state, metadata = {}, None
    if layout == "kohya":
        for (component, name), (down, up, alpha) in layers.items():
            key = ("lora_unet_" if component == "unet" else "lora_te_text_model_") + name.replace(".", "_")
            state.update({key + ".lora_down.weight": down, key + ".lora_up.weight": up,
                          key + ".alpha": torch.tensor(alpha)})
    else:
        odd = next(name for (c, name) in layers if c == "unet" and name.endswith("proj_in"))
        layers["unet", odd] = layers["unet", odd][:2] + (6.0,)
        meta = {}
        for component in ("unet", "text_encoder"):
            names = [n for c, n in layers if c == component]
            meta.update({f"{component}.r": rank, f"{component}.lora_alpha": 2.0, f"{component}.target_modules": names,
                         f"{component}.alpha_pattern": {odd: 6.0} if component == "unet" else {}})
        metadata = {"lora_adapter_metadata": json.dumps(meta), "format": "pt"}
        for (component, name), (down, up, _) in layers.items():
            key = "unet." + name if component == "unet" else "text_encoder.text_model." + name
            state.update({key + ".lora_A.weight": down, key + ".lora_B.weight": up})
    path = folder.parent / f"{folder.name}-{layout}-{seed}{'-mixed' if mixed_alphas else ''}-lora.safetensors"
    save_file(state, str(path), metadata=metadata)
    return path, layers


@pytest.mark.parametrize("layout", ["kohya", "diffusers"])
def test_lora_fused_equals_diffusers(tiny_sd1, layout):
    pytest.importorskip("peft", reason="diffusers' load_lora_weights needs peft")
    path, _ = make_lora(tiny_sd1, layout)
    scale = 0.7
    ref = diffusers_pipe(tiny_sd1)
    ref.load_lora_weights(str(path))
    ref.fuse_lora(lora_scale=scale)
    ref.unload_lora_weights()
    expected = reference_latents(ref, "a photo of a cat")

    ours = sdrt.Pipeline.from_pretrained(tiny_sd1, backend="torch")
    ours.load_lora(path, scale)
    assert ours.loras == [{"file": path.name, "sha256": sha256_of(path), "scale": scale}]
    assert_close(our_latents(ours, "a photo of a cat"), expected, BOUND, f"{layout} LoRA")


def test_lora_per_layer_alphas_and_two_loras_by_hand(tiny_sd1):
    """W + sum over LoRAs of scale * alpha/rank * up @ down, written out, for every layer of two kohya LoRAs whose
    alphas differ per layer. (diffusers 0.42 cannot be the reference here: its alpha_pattern keys for kohya files
    do not match the module names, so it scales every layer by the most common alpha.)"""
    first, layers1 = make_lora(tiny_sd1, "kohya", seed=1, mixed_alphas=True)
    second, layers2 = make_lora(tiny_sd1, "kohya", seed=2, mixed_alphas=True)
    pipe = sdrt.Pipeline.from_pretrained(tiny_sd1, backend="torch")
    models = {"unet": pipe.backend.modules["unet"].unet, "text_encoder": pipe.backend.modules["text_encoder"]}
    before = {c: {k: v.clone() for k, v in m.state_dict().items()} for c, m in models.items()}
    pipe.load_lora(first, 0.7)
    pipe.load_lora(second, -0.4)
    assert [r["scale"] for r in pipe.loras] == [0.7, -0.4]
    assert any(alpha == 8.0 for _, _, alpha in layers1.values())
    for key in layers1:
        component, name = key
        w = before[component][name + ".weight"]
        want = w.clone()
        for scale, (down, up, alpha) in ((0.7, layers1[key]), (-0.4, layers2[key])):
            want += scale * alpha / down.shape[0] * (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
        got = models[component].state_dict()[name + ".weight"]
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), name


def test_lora_layouts_give_the_same_deltas(tiny_sd1):
    """diffusers' older key layouts (attention processors, <module>.lora.down/up, lora_linear_layer) read as the same
    layers as kohya's; layers written without an alpha scale by 1 (alpha = rank)."""
    from sdrt.adapters.lora import lora_deltas, read_lora

    path, layers = make_lora(tiny_sd1, "kohya", seed=4)
    state, no_alpha = {}, set()
    for (component, name), (down, up, alpha) in layers.items():
        if component == "unet" and ".attn" in name:
            block, proj = (name[: -len(".to_out.0")], "to_out") if name.endswith("to_out.0") else name.rsplit(".", 1)
            key = f"unet.{block}.processor.{proj}_lora"
            no_alpha.add(name)
        elif component == "unet":
            key = f"unet.{name}.lora"
            state[f"unet.{name}.alpha"] = torch.tensor(alpha)
        else:
            key = f"text_encoder.text_model.{name}.lora_linear_layer"
            no_alpha.add(name)
        state.update({key + ".down.weight": down, key + ".up.weight": up})
    old = tiny_sd1.parent / "old-layout-lora.safetensors"
    save_file(state, str(old))
    targets = {c: layer_shapes(tiny_sd1, c) for c in ("unet", "text_encoder")}
    new, old_deltas = lora_deltas(read_lora(path), targets, 1.0), lora_deltas(read_lora(old), targets, 1.0)
    assert {c: set(d) for c, d in new.items()} == {c: set(d) for c, d in old_deltas.items()}
    for (component, name), (down, up, alpha) in layers.items():
        ratio = alpha / down.shape[0] if name in no_alpha else 1.0
        np.testing.assert_allclose(old_deltas[component][name] * ratio, new[component][name], rtol=1e-5, atol=1e-7)


def test_lora_mismatch_and_unsupported_errors(tiny_sd1, tmp_path, onnx_sd1):
    pipe = sdrt.Pipeline.from_pretrained(tiny_sd1, backend="torch")
    before = {k: v.clone() for k, v in pipe.backend.modules["unet"].unet.state_dict().items()}
    cases = {
        "wrong-shape": ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 48, 1, 1),
                         "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 4, 1, 1)},
                        "does not match this model: layer down_blocks.0.attentions.0.proj_in"),
        "missing-layer": ({"lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32),
                           "lora_unet_down_blocks_7_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 4)},
                          "does not match this model: 1 of its 1 unet layers"),
        "sdxl": ({"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 32)}, "an SDXL LoRA"),  # on SD 1.x
        "loha": ({"lora_unet_x.hada_w1_a": torch.zeros(4, 32)}, "LoHa layer .* it needs"),  # LoHa/LoKr read since issue 18
        "tucker": ({"lora_unet_x.hada_t1": torch.zeros(4, 4, 3, 3)}, "Tucker"),
    }
    for name, (state, message) in cases.items():
        save_file(state, str(tmp_path / f"{name}.safetensors"))
        with pytest.raises(ModelError, match=message):
            pipe.load_lora(tmp_path / f"{name}.safetensors")
    after = pipe.backend.modules["unet"].unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and pipe.loras == []
    onnx = sdrt.Pipeline.from_pretrained(onnx_sd1, backend="onnx")
    with pytest.raises(BackendError, match="--lora"):
        onnx.load_lora(tmp_path / "sdxl.safetensors")


def test_cli_export_single_file_with_lora_and_generate(ldm_models, tmp_path, monkeypatch):
    """`sdrt export FILE.safetensors OUT --lora L:0.5` equals the PyTorch backend with the same LoRA fused at load;
    `sdrt generate -m FILE --lora L:0.5` runs."""
    from conftest import TEST_LIMITS

    original, single = ldm_models["sd1"]
    lora, _ = make_lora(original, "kohya", seed=7)
    out = tmp_path / "export"
    lim = TEST_LIMITS
    sizes = ["--min-size", lim.min_size, "--opt-size", lim.opt_size, "--max-size", lim.max_size, "--max-batch", lim.max_batch]
    assert cli_main(["export", str(single), str(out), "--lora", f"{lora}:0.5", "-q", "--no-check", *map(str, sizes)]) == 0
    manifest = read_manifest(out)
    assert manifest.extras["loras"] == [{"file": lora.name, "sha256": sha256_of(lora), "scale": 0.5}]
    assert manifest.extras["source"] == str(single.resolve())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".sdrt-prepare")]  # the prepared folder is gone
    exported = our_latents(sdrt.Pipeline.from_pretrained(out, backend="onnx"), "a red cat")
    torch_pipe = sdrt.Pipeline.from_pretrained(original, backend="torch")
    torch_pipe.load_lora(lora, 0.5)
    assert_close(exported, our_latents(torch_pipe, "a red cat"), BOUND, "export with LoRA vs PyTorch + LoRA")

    png = tmp_path / "out.png"
    monkeypatch.setenv("SDRT_CACHE", str(tmp_path / "cache"))
    assert cli_main(["generate", "a cat", "-m", str(single), "--lora", f"{lora}:0.5", "--steps", "2", "-W", "64",
                     "-H", "64", "-o", str(png), "-q", "--seed", "1"]) == 0
    assert png.exists() and any((tmp_path / "cache" / "single_file").iterdir())
