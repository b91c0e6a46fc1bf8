"""Which layers the static int8 scheme should keep fp32: a greedy mixed-precision search over layer groups.

    python benchmarks/int8_keep_search.py benchmarks/results/int8-sensitivity-layers.json MODEL/unet --size 256

Input: the guided-call error of each layer quantised alone on the built-in model (int8_sensitivity.py --parts
one-layer), which add up in quadrature (int8-sensitivity.md), and the multiply-adds of each Conv/Linear of a target
UNet (MODEL/unet/config.json, e.g. SD 1.5's; counted by forward hooks on the meta device, no weights needed). Layers
are grouped by (side, resolution level, role), the only terms that name the same layer in both models; groups are
kept fp32 in order of error^2 saved per multiply-add of the target until the remaining error is under --budget.
Prints each step: the group, its error, its share of the target's multiply-adds, the error left, the fp32 share.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import re
from pathlib import Path

ROLES = ("/conv_shortcut/", "/proj_out/", "/proj_in/", "/ff/net.2/", "/ff/net.0/", "/to_out.0/", "/attn2/to_k/",
         "/attn2/to_v/", "/attn2/to_q/", "/attn1/to_q/", "/attn1/to_k/", "/attn1/to_v/", "/conv1/", "/conv2/", "samplers.")


def module_macs(unet_dir: Path, size: int) -> dict:
    """{ONNX-style scope name: multiply-adds} of every Conv2d/Linear in one batch-2 forward at `size` pixels."""
    import torch
    from diffusers import UNet2DConditionModel

    config = UNet2DConditionModel.load_config(unet_dir)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    macs = {}

    def hook(name):
        def record(module, inputs, output):
            per_output = module.weight[0].numel() if isinstance(module, torch.nn.Conv2d) else module.in_features
            macs["/unet/" + re.sub(r"\.(?!\d)", "/", name) + "/"] = output.numel() * per_output

        return record

    for name, module in unet.named_modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            module.register_forward_hook(hook(name))
    latent = size // 8  # the SD-family VAEs' scale factor; only the target's shares matter here
    with torch.no_grad():
        unet(torch.zeros(2, config["in_channels"], latent, latent, device="meta"), torch.zeros(2, device="meta"),
             torch.zeros(2, 77, config["cross_attention_dim"], device="meta"))
    return macs


def group(name: str, levels: dict) -> tuple:
    side, level = levels.get(name, ("mid", None))
    return side, level, next((r for r in ROLES if r in name), "other")


def read_times(path: Path) -> dict:
    """{group: seconds saved by int8} from a JSON {"side|level|role": [fp32 s, int8 s]} (per-node profiles of the
    target's fp32 and all-int8 UNet calls, summed per group), as shares of their total."""
    raw = json.loads(Path(path).read_text())
    saved = {}
    for key, (fp32, int8) in raw.items():
        side, level, role = key.split("|")
        saved[(side, None if level == "None" else int(level), role)] = max(fp32 - int8, 0.0)
    total = sum(saved.values())
    return {g: v / total for g, v in saved.items()}


def search(errors: dict, macs: dict, budget: float, times: dict | None = None) -> list:
    """Greedy: groups kept fp32 in order of error^2 saved per unit of cost (the target's multiply-adds, or with
    `times` the seconds int8 saves on the target) until the error left is under `budget`."""
    from sdrt.export.int8 import resolution_levels

    err2 = collections.defaultdict(float)
    for name, e in errors.items():
        err2[group(name, resolution_levels(list(errors)))] += e * e
    cost = collections.defaultdict(float)
    total = sum(macs.values())
    levels = resolution_levels(list(macs))
    for name, m in macs.items():
        cost[group(name, levels)] += m / total
    if times is not None:
        macs_share, cost = dict(cost), collections.defaultdict(float, times)
    left, fp32, steps = sum(err2.values()), 0.0, []
    for g in sorted(err2, key=lambda g: -err2[g] / max(cost.get(g, 0.0), 1e-4)):
        if left <= budget ** 2:
            break
        left -= err2[g]
        fp32 += cost.get(g, 0.0)
        steps.append({"group": g, "error": math.sqrt(err2[g]), "macs": cost.get(g, 0.0),
                      "error_left": math.sqrt(max(left, 0.0)), "fp32_macs": fp32})
        if times is not None:
            steps[-1]["mac_share"] = macs_share.get(g, 0.0)
    return steps


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("errors", help="JSON {node name: guided-call error with that layer alone int8}")
    p.add_argument("unet", help="the target UNet's folder (its config.json)")
    p.add_argument("--size", type=int, default=256, help="image side in pixels for the multiply-adds (default: %(default)s)")
    p.add_argument("--budget", type=float, default=0.06, help="guided-call error to stay under (default: %(default)s)")
    p.add_argument("--times", default=None, help="JSON {'side|level|role': [fp32 s, int8 s]} measured on the target: "
                   "rank groups by the time int8 saves instead of by multiply-adds")
    args = p.parse_args(argv)
    errors = json.loads(Path(args.errors).read_text())
    print(f"all int8: error {math.sqrt(sum(e * e for e in errors.values())):.3f}")
    times = read_times(Path(args.times)) if args.times else None
    what = "of int8's time saving" if times else "of the MACs"
    for s in search(errors, module_macs(Path(args.unet), args.size), args.budget, times):
        side, level, role = s["group"]
        print(f"keep {side} level {level} {role}: error {s['error']:.3f}, {s['macs']:.2%} {what} -> "
              f"error left {s['error_left']:.3f}, fp32 {s['fp32_macs']:.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
