"""The int8 UNet call on the SD 1.5 shape (issue 22): where its time goes, and paired A/B of graph variants.

    # per op type / per node, one session, ORT's profiler (3 calls after a warm-up)
    flock /work/heavy.lock python benchmarks/int8_unet_ab.py profile EXPORT/unet/model.onnx --out OUT.json
    # paired A/B: one session per graph, turns alternated A, B, A, B, ...; medians
    flock /work/heavy.lock python benchmarks/int8_unet_ab.py ab A.onnx B.onnx --calls 6 --block 4 --out OUT.json
    # the same through the runtime (sdrt.Pipeline, 4 steps at 256 px): UNet call = loop / 5
    flock /work/heavy.lock python benchmarks/int8_unet_ab.py pipeline EXPORT_A EXPORT_B --calls 6 --out OUT.json
    # B graphs for the A/B: self-attentions fused into an existing export's UNet; GroupNorm affine as BatchNormalization
    python benchmarks/int8_unet_ab.py fuse A.onnx --heads 8 --scopes "down_blocks\.0/|up_blocks\.3/" --out B.onnx

EXPORT: an int8 export of `sdrt.bench.models.build_sd15_random` (as `sdrt bench --sd15-random` makes it:
`sdrt export MODEL OUT --winograd --conv-tactics measure --int8`). Inputs: the UNet contract's sample inputs at
256 px (32x32 latents), batch 2 (one guided image), 77 tokens; ONNX Runtime's CPU provider at full graph
optimisation (the runtime's level), `--threads` intra-op threads. Random weights: speed only.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import time
from pathlib import Path

import numpy as np


def feeds_for(onnx_file: Path, size: int = 256, batch: int = 2) -> dict:
    """The UNet contract's sample inputs at `size` px, `batch`, from the export folder above `onnx_file`'s (or, for
    a variant graph beside the export, `--export`)."""
    from sdrt.contracts import ShapeLimits
    from sdrt.model.manifest import read_manifest

    folder = next(p for p in Path(onnx_file).resolve().parents if (p / "manifest.json").exists())
    manifest = read_manifest(folder)
    dims = ShapeLimits(min_size=size, opt_size=size, max_size=size, max_batch=batch).dims(manifest.facts, "opt")
    dims["batch"] = batch
    return manifest.contracts["unet"].sample_inputs(dims)


def session(onnx_file: Path, threads: int, profile_prefix: str | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return ort.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])


def category(op: str, name: str) -> str:
    """A coarse role for a profiled node, by op type and the scope the exporter gave it."""
    if op in ("MultiHeadAttention", "Attention", "Softmax"):
        return "attention core (scores, softmax, AV)" if op != "Softmax" else "attention softmax"
    if op == "MatMul" and re.search(r"/attn\d/", name) and not re.search(r"/to_(q|k|v|out)", name):
        return "attention score/AV MatMul (fp32)"
    if op in ("MatMul", "FusedMatMul", "Gemm"):
        return "fp32 MatMul/Gemm (kept)"
    if op in ("MatMulIntegerToFloat", "DynamicQuantizeMatMul", "MatMulInteger", "QLinearMatMul"):
        return "int8 MatMul"
    if op == "QLinearConv":
        return "int8 Conv"
    if op in ("Conv", "FusedConv", "NchwcConv"):
        return "fp32 Conv (kept, Winograd transforms included)"
    if op in ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"):
        return "Q/DQ"
    if op in ("Transpose", "ReorderInput", "ReorderOutput", "Reshape", "DepthToSpace", "Slice", "Concat", "Split"):
        return "layout (Transpose/Reorder/Reshape/Slice/Concat)"
    if op in ("GroupNormalization", "InstanceNormalization", "BatchNormalization", "LayerNormalization",
              "SkipLayerNormalization", "ReduceMean", "Sqrt", "Div", "Pow", "Sub"):
        return "norms (GroupNorm/LayerNorm parts)"
    return "elementwise (Add/Mul/Sigmoid/Gelu/Erf/...)"


def profile(onnx_file: Path, threads: int, calls: int, prefix: str) -> dict:
    """Per op type, per category and the 40 slowest nodes, seconds per call (ORT's profiler, `calls` after a warm-up)."""
    s = session(onnx_file, threads, prefix)
    feeds = feeds_for(onnx_file)
    s.run(None, feeds)
    walls = []
    for _ in range(calls):
        t0 = time.perf_counter()
        s.run(None, feeds)
        walls.append(time.perf_counter() - t0)
    trace_file = Path(s.end_profiling())
    trace = json.loads(trace_file.read_text())
    trace_file.unlink()
    kernels = [e for e in trace if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    per = 1e6 * (calls + 1)
    by_op, n_op, by_cat, by_node = (collections.Counter() for _ in range(4))
    for e in kernels:
        op, name = e.get("args", {}).get("op_name", "?"), e["name"][: -len("_kernel_time")]
        by_op[op] += e["dur"] / per
        n_op[op] += 1 / (calls + 1)
        by_cat[category(op, name)] += e["dur"] / per
        by_node[(op, name)] += e["dur"] / per
    return {"file": str(onnx_file), "threads": threads, "calls": calls, "wall_s": walls,
            "kernel_s_per_call": sum(by_op.values()), "by_op_s": dict(by_op.most_common()),
            "nodes_by_op": {k: round(v) for k, v in n_op.items()}, "by_category_s": dict(by_cat.most_common()),
            "nodes_s": [[op, name, t] for (op, name), t in by_node.most_common()]}


def ab(files: list[Path], threads: int, calls: int, gap: float = 0.3, block: int = 1) -> dict:
    """One session per graph, all loaded; rounds alternate the graphs (A, B, A, B, ...; the order reversed every
    other round) after one warm-up each; each turn is `block` back-to-back calls, of which the first is not counted
    when block > 1 (it meets the previous session's pool threads still spinning: the runtime has one UNet session,
    its calls back to back), turns `gap` seconds apart. `calls` rounds; per-graph seconds and medians, and each
    one's median ratio to A (per round)."""
    sessions = [session(f, threads) for f in files]
    feeds = feeds_for(files[0])
    outs = [s.run(None, feeds)[0] for s in sessions]
    times = [[] for _ in files]
    for i in range(calls):
        order = range(len(files)) if i % 2 == 0 else reversed(range(len(files)))
        for k in order:
            time.sleep(gap)
            turn = []
            for _ in range(block):
                t0 = time.perf_counter()
                sessions[k].run(None, feeds)
                turn.append(time.perf_counter() - t0)
            times[k].append(float(np.median(turn[1:] if block > 1 else turn)))
    ref = outs[0]
    return {"files": [str(f) for f in files], "threads": threads, "rounds": calls, "block": block, "gap_s": gap,
            "seconds": times,
            "median_s": [float(np.median(t)) for t in times],
            "median_ratio_to_first": [float(np.median(np.array(t) / np.array(times[0]))) for t in times],
            "max_abs_diff_to_first": [float(np.max(np.abs(o - ref))) for o in outs],
            "ref_max_abs": float(np.max(np.abs(ref)))}


def pipeline_ab(folders: list[Path], threads: int, rounds: int, size: int = 256, steps: int = 4) -> dict:
    """The UNet call through the runtime: sdrt.Pipeline on each export (all loaded), `steps` steps of the export's
    scheduler (SD 1.5's PNDM: steps + 1 guided UNet calls), guidance 7.5, `size` px, one image; rounds alternate the
    order, 0.5 s apart; UNet call = loop seconds / calls. Also the largest pixel difference from the first export."""
    import sdrt

    pipes = [sdrt.Pipeline.from_pretrained(f, backend="onnx", threads=threads) for f in folders]

    def run(p):
        return p(["a photo of a fox in the snow"], num_inference_steps=steps, guidance_scale=7.5, seed=0, height=size,
                 width=size, output_type="np", progress=False)

    images = [run(p).images for p in pipes]  # warm-up
    calls = steps + 1
    per_call = [[] for _ in pipes]
    for r in range(rounds):
        for k in range(len(pipes)) if r % 2 == 0 else reversed(range(len(pipes))):
            time.sleep(0.5)
            per_call[k].append(run(pipes[k]).timings["loop"] / calls)
    return {"exports": [str(f) for f in folders], "threads": threads, "unet_call_s": per_call,
            "median_s": [float(np.median(t)) for t in per_call],
            "ratio_to_first": [float(np.median(t) / np.median(per_call[0])) for t in per_call],
            "max_abs_diff_uint8": [int(np.abs(i.astype(np.int16) - images[0]).max()) for i in images]}


def fuse_attention_graph(src: Path, dst: Path, heads: int, scopes: str = "") -> int:
    """`src` with each self-attention core (the nodes between to_q/to_k/to_v and to_out.0, in scopes matching the
    regex `scopes`) replaced by one com.microsoft MultiHeadAttention on the projections' outputs: what the export
    emits with sdrt.export.attention, made from an existing (int8) graph so that A and B share every weight and
    range. Returns how many were fused; `dst`'s weights stay in `src`'s data file (written beside it)."""
    import onnx
    from onnx import helper

    model = onnx.load(str(src), load_external_data=False)
    graph = model.graph
    by_name = {n.name: n for n in graph.node}
    producer = {o: n for n in graph.node for o in n.output}
    fused = 0
    for name, node in list(by_name.items()):
        m = re.match(r"(.*/attn1/)to_out\.0/MatMul$", name)
        if not m or not re.search(scopes, m.group(1)):
            continue
        scope = m.group(1)
        x = node.input[0]
        while producer[x].op_type in ("DequantizeLinear", "QuantizeLinear"):  # the int8 input's Q/DQ pair
            x = producer[x].input[0]
        qkv = [by_name[f"{scope}to_{p}/MatMul"].output[0] for p in "qkv"]
        core = producer[x]
        graph.node.insert(list(graph.node).index(core), helper.make_node(
            "MultiHeadAttention", qkv, [x], name=f"{scope}MultiHeadAttention", domain="com.microsoft", num_heads=heads))
        graph.node.remove(core)
        fused += 1
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    while True:  # drop what fed only the replaced cores
        dead = [n for n in graph.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
        used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save_model(model, str(dst))
    return fused


def batchnorm_affine_graph(src: Path, dst: Path) -> int:
    """`src` with each GroupNorm's affine step (InstanceNormalization -> Reshape -> Mul gamma -> Add beta) as one
    BatchNormalization (mean 0, variance 1, epsilon 0: what sdrt.export.groupnorm exports for fp32 CPU graphs).
    Returns how many were rewritten."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(src), load_external_data=False)
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    consumers = collections.defaultdict(list)
    for n in graph.node:
        for i in n.input:
            consumers[i].append(n)
    done = 0
    for mul in [n for n in graph.node if n.op_type == "Mul"]:
        x = next((i for i in mul.input if i not in inits), None)
        gamma = next((i for i in mul.input if i in inits), None)
        if x is None or gamma is None or x not in producer or producer[x].op_type != "Reshape":
            continue
        if producer[x].input[0] not in producer or producer[producer[x].input[0]].op_type != "InstanceNormalization":
            continue
        adds = consumers[mul.output[0]]
        if len(adds) != 1 or adds[0].op_type != "Add" or not any(i in inits for i in adds[0].input):
            continue
        add = adds[0]
        beta = next(i for i in add.input if i in inits)
        g, b = numpy_helper.to_array(inits[gamma]).reshape(-1), numpy_helper.to_array(inits[beta]).reshape(-1)
        names = [f"{mul.name}_bn_{k}" for k in ("scale", "bias", "mean", "var")]
        for name, value in zip(names, (g, b, np.zeros_like(g), np.ones_like(g))):
            graph.initializer.append(numpy_helper.from_array(value.astype(np.float32), name))
        graph.node.insert(list(graph.node).index(mul), helper.make_node(
            "BatchNormalization", [x, *names], [add.output[0]], name=f"{mul.name}_bn", epsilon=0.0))
        graph.node.remove(mul)
        graph.node.remove(add)
        done += 1
    onnx.save_model(model, str(dst))
    return done


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["profile", "ab", "pipeline", "fuse", "batchnorm"])
    p.add_argument("files", nargs="+", type=Path, help="UNet ONNX files (inside or beside an sdrt export); pipeline: "
                   "export folders")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--calls", type=int, default=3)
    p.add_argument("--gap", type=float, default=0.3, help="ab: seconds between turns")
    p.add_argument("--block", type=int, default=1, help="ab: back-to-back calls per turn (the first not counted)")
    p.add_argument("--out", type=Path, help="JSON results (fuse: the new graph, beside the first file)")
    p.add_argument("--heads", type=int, help="fuse: attention heads (SD 1.5's UNet config: attention_head_dim 8)")
    p.add_argument("--scopes", default="", help="fuse: only self-attentions whose scope matches this regex")
    args = p.parse_args(argv)
    if args.what == "fuse":
        print(fuse_attention_graph(args.files[0], args.out, args.heads, args.scopes), "self-attentions fused")
        return 0
    if args.what == "batchnorm":
        print(batchnorm_affine_graph(args.files[0], args.out), "GroupNorm affine steps as BatchNormalization")
        return 0
    if args.what == "pipeline":
        result = pipeline_ab(args.files, args.threads, args.calls)
        args.out and args.out.write_text(json.dumps(result, indent=1))
        print(json.dumps(result, indent=1))
        return 0
    if args.what == "profile":
        result = [profile(f, args.threads, args.calls, str(f.parent / "profile")) for f in args.files]
    else:
        result = ab(args.files, args.threads, args.calls, args.gap, args.block)
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.write_text(text)
    print(text if args.what == "ab" else json.dumps([{k: r[k] for k in ("wall_s", "by_category_s", "by_op_s")} for r in result], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
