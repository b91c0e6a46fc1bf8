"""Run-time LoRA slots on the SD 1.5 shape (CPU): what a plain call, a call with LoRAs and a switch cost.

    python benchmarks/lora_slots_export.py /tmp/lorabench plain     # today's CPU export (Winograd), 3.4 GB
    python benchmarks/lora_slots_export.py /tmp/lorabench all       # the same with LoRA slots ("all")
    python benchmarks/lora_slots.py /tmp/lorabench [--rounds 2] [--calls 4]
    python benchmarks/lora_slots.py /tmp/lorabench --threads 2 --only interleaved-pruned+gated --calls 16   # side by side
    python benchmarks/lora_slots.py /tmp/lorabench --threads 2 --only profile-plain,profile-all,profile-gated  # per op

Single UNet calls at 256 px (latents 32x32), batch 2 (guidance), as `sdrt bench --sd15-random --size 256` runs
them; each measurement in its own process (one SD 1.5 session at a time fits this machine), plain and slotted
processes alternated `rounds` times, conditions inside a process interleaved call by call. LoRAs: a kohya LoRA of
rank 16 on every attention/MLP layer (what sd-scripts trains by default) and a LoCon (rank 16 on those, rank 8 on
every conv); switching = registering nothing new, just combining the factors and handing them to the backend.
The PyTorch part times the UNet with and without hooks, and the alternative (fuse deltas into kept copies).
Writes benchmarks/results/lora_slots.json and prints a table.
"""

import collections
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

HERE = Path(__file__).resolve().parent
# One thread by default: on this shared 2-core machine a 2-thread run stalls whenever another job takes a core
# (the first 2-thread runs varied 2.9-6.8 s per call); one thread is slower but steady. --threads N to change.
THREADS = int(os.environ.get("LORA_BENCH_THREADS", "1"))


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def make_loras(slots, out: Path) -> dict[str, Path]:
    """kohya LoRA (rank 16, attention/MLP layers) and LoCon (16 there, 8 on convs) for these slots."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    files = {}
    for kind in ("lora", "locon"):
        state = {}
        for s in slots:
            attention = "attentions" in s.layer
            if not attention and kind == "lora":
                continue
            r = 16 if attention else 8
            key = "lora_unet_" + s.layer.replace(".", "_")
            w = tuple(s.weight)
            state[key + ".lora_down.weight"] = (rng.standard_normal((r,) + w[1:]) * 0.01).astype(np.float16)
            state[key + ".lora_up.weight"] = (rng.standard_normal((w[0], r) + ((1, 1) if len(w) == 4 else ())) * 0.01).astype(np.float16)
            state[key + ".alpha"] = np.array(float(r), np.float16)
        files[kind] = out / f"{kind}.safetensors"
        save_file(state, str(files[kind]))
    return files


def unet_feeds():
    rng = np.random.default_rng(1)
    return {"sample": rng.standard_normal((2, 4, 32, 32)).astype(np.float32),
            "timestep": np.array([500.0, 500.0], np.float32),
            "encoder_hidden_states": rng.standard_normal((2, 77, 768)).astype(np.float32)}


GATED = {"gated": True, "gated-nosink": False}  # variants made from the "all" export by sdrt.export.lora_gates


def model_path(root: Path, which: str) -> Path:
    """plain/attention/all: the exports; gated, gated-nosink, pruned: rewrites of the "all" graph next to it (sharing
    its weights file), made on first use."""
    if which not in (*GATED, "pruned"):
        return root / which / "unet" / "model.onnx"
    path = root / "all" / "unet" / f"model.{which}.onnx"
    if not path.exists():
        import onnx

        from sdrt.export.lora_gates import gate_slots, prune_slots

        model = onnx.load(str(root / "all" / "unet" / "model.onnx"), load_external_data=False)
        count = gate_slots(model, sink=GATED[which]) if which in GATED else prune_slots(model)
        tmp = path.with_suffix(".tmp")
        onnx.save_model(model, str(tmp))
        tmp.replace(path)
        print(f"{which}: {count} slots rewritten", flush=True)
    return path


def contract_of(root: Path, which: str):
    from sdrt.contracts import NetworkContract

    return NetworkContract.from_dict(json.loads((root / ("all" if which in GATED else which) / "contract.json").read_text()))


def measure_onnx(root: Path, which: str, calls: int) -> dict:
    import onnxruntime as ort

    from sdrt.adapters.lora_switch import activate, register
    from sdrt.backends.base import Backend
    from sdrt.contracts import UNET

    t0 = time.perf_counter()
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    session = ort.InferenceSession(str(model_path(root, which)), options, providers=["CPUExecutionProvider"])
    load_s = time.perf_counter() - t0
    rss_loaded = peak_rss_gb()
    feeds = unet_feeds()
    result = {"load_s": load_s, "rss_after_load_gb": rss_loaded, "times": {}}
    conditions = {"plain": {}}
    if which not in ("plain", "pruned"):
        contract = contract_of(root, which)

        class SlotBackend(Backend):
            name = "onnx"

            def set_lora_factors(self, network, factors):
                self.feeds = self._lora_feeds(network, factors)

        backend = SlotBackend({UNET: contract})
        backend.feeds = contract.empty_lora_feeds()
        pipe = SimpleNamespace(backend=backend, registered_loras={}, active_loras=())
        files = make_loras(contract.lora_slots, root)
        switch = {}
        for name, path in files.items():
            t0 = time.perf_counter()
            register(pipe, path, name)
            switch[f"register_{name}_s"] = time.perf_counter() - t0
        switch["factor_mb"] = {n: sum(d.nbytes + u.nbytes for layers in r.factors.values() for d, u in layers.values()) / 1e6
                               for n, r in pipe.registered_loras.items()}
        for name, loras in (("empty", ()), ("lora", (("lora", 0.8),)), ("locon", (("locon", 0.8),)),
                            ("lora+locon", (("locon", 0.4), ("lora", 0.8)))):
            t0 = time.perf_counter()
            activate(pipe, loras)
            switch[f"switch_to_{name}_s"] = time.perf_counter() - t0
            conditions[name] = dict(backend.feeds)
        del conditions["plain"]
        result["switch"] = switch
    for name, extra in conditions.items():  # warm-up (first-run allocations) per condition
        session.run(None, {**feeds, **extra})
    for k in range(calls):
        for name, extra in conditions.items():
            t0 = time.perf_counter()
            session.run(None, {**feeds, **extra})
            result["times"].setdefault(name, []).append(time.perf_counter() - t0)
    result["peak_rss_gb"] = peak_rss_gb()
    return result


def measure_torch(calls: int) -> dict:
    import torch

    sys.path.insert(0, str(HERE))
    from lora_slots_export import sd15_unet

    from sdrt.adapters.lora import read_lora, slot_factors
    from sdrt.backends.torch_modules import LoraHooks, lora_slot_layers

    torch.set_num_threads(THREADS)
    unet = sd15_unet()
    slots = lora_slot_layers(unet, "all")
    import tempfile

    files = make_loras(slots, Path(tempfile.mkdtemp()))
    factors, _ = slot_factors(read_lora(files["lora"]), {"unet": {s.layer: s.weight for s in slots}})
    hooks = LoraHooks(unet, slots)
    feeds = {k: torch.from_numpy(v) for k, v in unet_feeds().items()}
    tensors = {k: (torch.from_numpy(d), torch.from_numpy(u) * 0.8) for k, (d, u) in factors["unet"].items()}
    result = {"times": {}}
    with torch.inference_mode():
        run = lambda: unet(feeds["sample"], feeds["timestep"], feeds["encoder_hidden_states"], return_dict=False)  # noqa: E731
        run()
        for k in range(calls):
            for name in ("plain", "hooks"):
                t0 = time.perf_counter()
                hooks.set(tensors if name == "hooks" else {})
                if k == 0:
                    result.setdefault("switch_s", {})[name] = time.perf_counter() - t0
                t0 = time.perf_counter()
                run()
                result["times"].setdefault(name, []).append(time.perf_counter() - t0)
        hooks.set({})
        # The alternative: fuse into the weights from kept copies of the originals (no bleed), per switch.
        modules = dict(unet.named_modules())
        t0 = time.perf_counter()
        originals = {k: modules[k].weight.detach().clone() for k in tensors}
        result["copies_s"] = time.perf_counter() - t0
        result["copies_mb"] = sum(w.numel() * 4 for w in originals.values()) / 1e6
        t0 = time.perf_counter()
        for k, (d, u) in tensors.items():
            w = modules[k].weight
            w.copy_(originals[k] + (u.reshape(u.shape[0], -1) @ d.reshape(d.shape[0], -1)).reshape(w.shape))
        result["fuse_switch_s"] = time.perf_counter() - t0
    result["peak_rss_gb"] = peak_rss_gb()
    return result


def paired(root: Path, pairs: int, calls: int, variants=("plain", "all")) -> dict:
    """The export variants with no LoRA, one session at a time (two SD 1.5 sessions at once thrash this machine), in
    turn inside one process, `pairs` times: the machine's drift between separate processes (+-30% here) then hits
    every variant alike. Ratios are against the first variant (today's plain export)."""
    import gc

    import onnxruntime as ort

    feeds = unet_feeds()
    out = {"pairs": [], "variants": list(variants)}
    for k in range(pairs):
        pair = {}
        for which in variants:
            options = ort.SessionOptions()
            options.intra_op_num_threads = THREADS
            session = ort.InferenceSession(str(model_path(root, which)), options, providers=["CPUExecutionProvider"])
            extra = {} if which in ("plain", "pruned") else contract_of(root, which).empty_lora_feeds()
            session.run(None, {**feeds, **extra})
            times = []
            for _ in range(calls):
                t0 = time.perf_counter()
                session.run(None, {**feeds, **extra})
                times.append(time.perf_counter() - t0)
            pair[which] = times
            del session
            gc.collect()
        for which in variants[1:]:
            pair[f"ratio_{which}"] = float(np.median(pair[which]) / np.median(pair[variants[0]]))
        print("pair", k, pair, flush=True)
        out["pairs"].append(pair)
    out["median_ratio"] = {w: float(np.median([p[f"ratio_{w}"] for p in out["pairs"]])) for w in variants[1:]}
    out["slots"] = variants[1]
    return out


def mem_available_gb() -> float:
    with open("/proc/meminfo") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("MemAvailable")) / 2**20


def interleaved(root: Path, calls: int, variants=("pruned", "gated")) -> dict:
    """Sessions of the variants side by side in one process, called in turn one call at a time (A B A B ...), so a
    neighbour's load hits every variant alike (the paired runs, one session after another, varied 0.35-2.7x here
    under other jobs). "pruned" (the slotted graph without its branches, bit-equal to the plain export and sharing
    the gated graph's weights file, so two sessions fit) stands for today's plain export. Refuses to load a session
    with under 8 GB available."""
    import onnxruntime as ort

    feeds = unet_feeds()
    sessions, extras, out = {}, {}, {"variants": list(variants), "mem_available_gb": [mem_available_gb()]}
    for which in variants:
        if mem_available_gb() < 8:
            raise SystemExit(f"interleaved: only {mem_available_gb():.1f} GB available before loading {which}; not loading")
        options = ort.SessionOptions()
        options.intra_op_num_threads = THREADS
        sessions[which] = ort.InferenceSession(str(model_path(root, which)), options, providers=["CPUExecutionProvider"])
        extras[which] = {} if which in ("plain", "pruned") else contract_of(root, which).empty_lora_feeds()
        sessions[which].run(None, {**feeds, **extras[which]})
        out["mem_available_gb"].append(mem_available_gb())
    out["outputs_equal"] = bool(np.array_equal(*(sessions[w].run(None, {**feeds, **extras[w]})[0] for w in variants[:2])))
    times = {w: [] for w in variants}
    for k in range(calls):
        for which in (variants if k % 2 == 0 else variants[::-1]):
            t0 = time.perf_counter()
            sessions[which].run(None, {**feeds, **extras[which]})
            times[which].append(time.perf_counter() - t0)
    base = variants[0]
    out["times"] = times
    for which in variants[1:]:
        per_round = [b / a for a, b in zip(times[base], times[which])]
        out[f"ratio_{which}"] = {"median_of_medians": float(np.median(times[which]) / np.median(times[base])),
                                 "min_over_min": float(min(times[which]) / min(times[base])),
                                 "median_of_per_round": float(np.median(per_round))}
    out["peak_rss_gb"] = peak_rss_gb()
    return out


def two_sessions(root: Path, calls: int) -> dict:
    """The other design: a plain session (the slotted graph's branches pruned, same weights file) next to the slotted
    one, the plain one taken for LoRA-free calls. What it costs in memory: RSS with one, then both."""
    import onnxruntime as ort

    def rss_now():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 2**20

    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    feeds = unet_feeds()
    out = {"rss_start_gb": rss_now()}
    slotted = ort.InferenceSession(str(model_path(root, "all")), options, providers=["CPUExecutionProvider"])
    slotted.run(None, {**feeds, **contract_of(root, "all").empty_lora_feeds()})
    out["rss_slotted_gb"] = rss_now()
    plain = ort.InferenceSession(str(model_path(root, "pruned")), options, providers=["CPUExecutionProvider"])
    plain.run(None, feeds)
    out["rss_both_gb"] = rss_now()
    out["peak_rss_gb"] = peak_rss_gb()
    return out


def profile(root: Path, slots: str, calls: int) -> dict:
    """In one slotted session with no LoRA: the share of kernel time spent in the slots' nodes (the LoRA branch:
    its MatMul/Conv, Transposes and the Add into the layer's output), from ONNX Runtime's profiler. A within-session
    measure: immune to the drift between sessions that the paired comparison suffers from."""
    import onnx
    import onnxruntime as ort

    path = model_path(root, slots)
    graph = onnx.load(str(path), load_external_data=False).graph
    reach = {i.name for i in graph.input if i.name.startswith("lora_")}
    lora_nodes = set()
    for node in graph.node:  # topological order: everything computed from the LoRA inputs, up to the Add into y
        if any(i in reach for i in node.input):
            lora_nodes.add(node.name)
            if node.op_type != "Add":
                reach.update(node.output)
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.enable_profiling = True
    options.profile_file_prefix = str(root / f"profile-{slots}")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    empty = {} if slots in ("plain", "pruned") else contract_of(root, slots).empty_lora_feeds()
    feeds = {**unet_feeds(), **empty}
    session.run(None, feeds)
    for _ in range(calls):
        session.run(None, feeds)
    trace = json.loads(Path(session.end_profiling()).read_text())
    kernels = [e for e in trace if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    runs = [e for e in trace if e.get("cat") == "Session" and e["name"] == "model_run"]
    total = sum(e["dur"] for e in kernels)
    base = lambda name: name[: -len("_kernel_time")]  # noqa: E731
    in_lora = sum(e["dur"] for e in kernels if base(e["name"]) in lora_nodes or any(base(e["name"]).startswith(n + "_") for n in ()))
    names = {base(e["name"]) for e in kernels}
    by_op = collections.Counter()
    count_op = collections.Counter()
    for e in kernels:
        op = e.get("args", {}).get("op_name", "?")
        by_op[op] += e["dur"] / 1e6 / (calls + 1)
        count_op[op] += 1 / (calls + 1)
    return {"per_call_by_op_s": dict(by_op.most_common()), "per_call_nodes_by_op": dict(count_op.most_common()),
            "slots": slots, "graph_lora_nodes": len(lora_nodes), "profiled_lora_nodes": len(names & lora_nodes),
            "kernel_s": total / 1e6, "lora_kernel_s": in_lora / 1e6, "lora_share_of_kernels": in_lora / total,
            "overhead_vs_rest": in_lora / (total - in_lora), "model_run_s": [e["dur"] / 1e6 for e in runs]}


def child(args):
    root, what, calls = Path(args[0]), args[1], int(args[2])
    if what.startswith("profile-"):
        out = profile(root, what[len("profile-"):], calls)
    elif what.startswith("paired"):
        count, _, rest = what[len("paired"):].partition("-")  # paired3 (plain vs "all"), paired3-all+gated+pruned
        out = paired(root, int(count or 3), calls, ("plain", *(rest.split("+") if rest else ["all"])))
    elif what.startswith("interleaved-"):  # interleaved-pruned+gated
        out = interleaved(root, calls, tuple(what[len("interleaved-"):].split("+")))
    elif what == "two-sessions":
        out = two_sessions(root, calls)
    else:
        out = measure_torch(calls) if what == "torch" else measure_onnx(root, what, calls)
    print("RESULT " + json.dumps(out))


def main(argv):
    root = Path(argv[0])
    rounds = int(argv[argv.index("--rounds") + 1]) if "--rounds" in argv else 2
    calls = int(argv[argv.index("--calls") + 1]) if "--calls" in argv else 4
    if "--threads" in argv:
        os.environ["LORA_BENCH_THREADS"] = argv[argv.index("--threads") + 1]
    parts = argv[argv.index("--only") + 1].split(",") if "--only" in argv else ["all", "plain", "torch"]
    runs = []
    for r in range(rounds):
        for what in parts:
            if (what == "torch" or what.startswith(("paired", "profile"))) and r:  # one run each
                continue
            load = os.getloadavg()
            proc = subprocess.run([sys.executable, __file__, "--child", str(root), what, str(calls)], capture_output=True, text=True)
            line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
            if not line:
                raise SystemExit(f"{what} failed: {proc.stderr[-2000:]}")
            res = json.loads(line[0][7:])
            res.update(what=what, round=r, loadavg_before=load, loadavg_after=os.getloadavg())
            runs.append(res)
            print(what, r, {k: round(float(np.median(v)), 3) for k, v in res.get("times", {}).items()}, res.get("median_ratio"),
                  "load", load, flush=True)
    summary = summarise(runs)
    record = {"command": "python benchmarks/lora_slots.py " + " ".join(argv), "threads": os.environ.get("LORA_BENCH_THREADS", "1"),
              "machine": machine(), "runs": runs,
              "summary": summary}
    out = HERE / "results" / (argv[argv.index("--out") + 1] if "--out" in argv else "lora_slots.json")
    out.write_text(json.dumps(record, indent=1))
    print(json.dumps(summary, indent=1))


def summarise(runs):
    med = lambda xs: float(np.median(xs))  # noqa: E731
    s0 = {}
    for r in runs:
        if r["what"].startswith("paired"):
            s0["paired_times"] = r["pairs"]
            for w, ratio in r["median_ratio"].items():
                s0[f"paired_{w}_ratios"] = [p[f"ratio_{w}"] for p in r["pairs"]]
                s0[f"paired_plain_call_overhead_of_{w}"] = ratio - 1
        if r["what"].startswith("interleaved-"):
            s0["interleaved"] = {k: v for k, v in r.items() if k not in ("what", "round", "times")}
            s0["interleaved_times"] = r["times"]
        if r["what"] == "two-sessions":
            s0["two_sessions"] = {k: v for k, v in r.items() if k not in ("what", "round")}
    for r in runs:
        if r["what"].startswith("profile-"):
            s0[f"profiled_empty_slot_overhead_{r['slots']}"] = r["overhead_vs_rest"]
            s0[f"profile_{r['slots']}"] = {k: v for k, v in r.items() if k not in ("what", "round")}
    onnx_plain = [t for r in runs if r["what"] == "plain" for t in r["times"]["plain"]]
    slots = {}
    for r in runs:  # one slotted variant per run: "all" (as traced) or "gated"
        if r["what"] in ("all", *GATED):
            s0["slotted_variant"] = r["what"]
            for k, v in r["times"].items():
                slots.setdefault(k, []).extend(v)
    s = {**s0, "onnx_plain_export_s": med(onnx_plain) if onnx_plain else None,
         "onnx_plain_export_min_s": min(onnx_plain) if onnx_plain else None}
    s.update({f"onnx_slots_{k}_min_s": min(v) for k, v in slots.items()})
    if onnx_plain and "empty" in slots:
        s["plain_call_overhead_of_slots_by_min"] = min(slots["empty"]) / min(onnx_plain) - 1
    s.update({f"onnx_slots_{k}_s": med(v) for k, v in slots.items()})
    if onnx_plain and "empty" in slots:
        s["plain_call_overhead_of_slots"] = med(slots["empty"]) / med(onnx_plain) - 1
    for k in ("lora", "locon", "lora+locon"):
        if k in slots:
            s[f"{k}_call_overhead_vs_empty"] = med(slots[k]) / med(slots["empty"]) - 1
            if onnx_plain:
                s[f"{k}_call_overhead_vs_plain_export"] = med(slots[k]) / med(onnx_plain) - 1
    for what in ("plain", "all", *GATED):
        rs = [r for r in runs if r["what"] == what]
        if rs:
            s[f"onnx_{what}_peak_rss_gb"] = max(r["peak_rss_gb"] for r in rs)
            s[f"onnx_{what}_load_s"] = med([r["load_s"] for r in rs])
    sw = [r["switch"] for r in runs if "switch" in r]
    if sw:
        s["switch"] = {k: (med([x[k] for x in sw]) if not isinstance(sw[0][k], dict) else sw[0][k]) for k in sw[0]}
    t = [r for r in runs if r["what"] == "torch"]
    if t:
        t = t[0]
        s["torch"] = {"plain_s": med(t["times"]["plain"]), "hooks_s": med(t["times"]["hooks"]),
                      "hooks_overhead": med(t["times"]["hooks"]) / med(t["times"]["plain"]) - 1,
                      "hooks_switch_s": t["switch_s"]["hooks"], "fused_copies_mb": t["copies_mb"],
                      "fused_switch_s": t["fuse_switch_s"], "peak_rss_gb": t["peak_rss_gb"]}
    return s


def machine():
    from sdrt.cpu import cpu_name

    return {"cpu": cpu_name(), "cores": os.cpu_count(), "loadavg": os.getloadavg(),
            "note": "2 cores shared with other agents' jobs; conditions interleaved to share the noise"}


if __name__ == "__main__":
    if sys.argv[1] == "--child":
        child(sys.argv[2:])
    else:
        main(sys.argv[1:])
