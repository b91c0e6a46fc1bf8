"""Export the SD 1.5-shape random UNet twice for benchmarks/lora_slots.py: plain (today's CPU export: Winograd) and
with LoRA slots ("all": attention + LoCon layers, kept ungated: the benchmark makes the gated variants from it), each
in its own process (3.4 GB of weights each).

    python benchmarks/lora_slots_export.py OUT_DIR {plain,attention,all}
"""

import sys
import time
from pathlib import Path


def sd15_unet():
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, act_fn="silu", flip_sin_to_cos=True, freq_shift=0,
    ).eval()  # fmt: skip


def main(out: Path, which: str) -> None:
    import json

    from sdrt.backends.torch_modules import UNetContract, WithLoraSlots, lora_slot_layers
    from sdrt.contracts import ShapeLimits, UNET, sd_contracts
    from sdrt.export.onnx_network import export_network, finish_network
    from sdrt.export.rewrites import graph_rewrites

    t0 = time.perf_counter()
    unet = sd15_unet()
    contract = sd_contracts(type("F", (), dict(latent_channels=4, text_seq_len=77, text_hidden_size=768,
                                                  cross_attention_dim=768, unet_input_channels=4,
                                                  time_cond_proj_dim=None))())[UNET]
    module = UNetContract(unet)
    if which != "plain":
        slots = lora_slot_layers(unet, which)
        n = len(contract.inputs)
        contract = contract.with_lora_slots(slots)
        module = WithLoraSlots(module, unet, slots, n)
    dims = {"unet_batch": 2, "latent_height": 32, "latent_width": 32, "lora_rank": 4}
    import torch

    args = tuple(torch.from_numpy(v) for v in contract.sample_inputs(dims).values())
    path = out / which / "unet" / "model.onnx"
    with graph_rewrites(module, args, 1.0, True, True) as counts:
        export_network(module, contract, path, args, 17, "torchscript")
    finish_network(path, contract, False, ())
    if which != "plain":  # the slots as traced: benchmarks/lora_slots.py derives the gated variants from them
        import onnx

        from sdrt.export.lora_gates import ungate_slots

        graph = onnx.load(str(path), load_external_data=False)
        ungate_slots(graph)
        onnx.save_model(graph, str(path))
    (out / which / "contract.json").write_text(json.dumps(contract.to_dict()))
    print(f"{which}: exported in {time.perf_counter() - t0:.0f} s, rewrites {counts}, {len(contract.lora_slots)} slots")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
