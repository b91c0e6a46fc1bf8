"""LoRA slots that cost nothing when empty: each slot's branch runs inside an ONNX `If` taken only at rank > 0.

A slot as traced (sdrt.backends.torch_modules.LoraHooks) is y' = y + up(down(x)): at rank 0 ONNX Runtime still
runs its two MatMuls/Convs on empty tensors, fills a zero tensor the size of the layer's output and adds it, and
the Add sits between the layer and what ORT would fuse it with. Measured on the SD 1.5 shape
(benchmarks/lora_slots.py): +3.6-5.1 % per plain call with 278 slots. Here every slot's branch (the nodes computed
from its `lora_down/`/`lora_up/` inputs, up to the Add into y) moves into the then-branch of an `If` whose
condition is Size(lora_down) > 0; the else-branch passes y through. `sink`: the delta is added after the chain of
Adds that follow the layer (a resnet's conv2 + residual, conv1 + time embedding), so y meets them as in a plain
export. At rank > 0 the math is the slot's (the Add moves, so the sum is reassociated: float rounding only).

`ungate_slots` undoes it (the branches back in the main graph, the delta added where it was sunk to): graph tools
that know no subgraphs, like the fp16 conversion, run on that and gate again. `prune_slots` removes the branches
instead (a plain graph from a slotted one, for comparison).
"""

from __future__ import annotations

import collections
import re

SLOT_INPUT = re.compile(r"^lora_(down|up)([:/])(.+)$")  # ":" in exports from before 2026-12-05


def _slot_branches(graph):
    """{the slot's lora_down input: (branch node indices, index of the Add that joins the delta into y, y's name)} for each slot."""
    consumers = collections.defaultdict(list)
    for k, node in enumerate(graph.node):
        for name in node.input:
            consumers[name].append(k)
    layers = sorted({(m.group(3), m.group(2)) for m in map(SLOT_INPUT.match, (i.name for i in graph.input)) if m})
    out = {}
    for layer, sep in layers:
        reach = {f"lora_down{sep}{layer}", f"lora_up{sep}{layer}"}
        nodes, join = set(), None
        for k, node in enumerate(graph.node):  # topological order
            if not any(i in reach for i in node.input):
                continue
            if node.op_type == "Add" and sum(i in reach for i in node.input) == 1 and join is None:
                join = k
                continue
            nodes.add(k)
            reach.update(node.output)
        if join is None:
            continue
        _absorb_feeders(graph, nodes, join, consumers)
        delta = next(i for i in graph.node[join].input if i in reach)
        y = next(i for i in graph.node[join].input if i not in reach)
        inner = {o for k in nodes for o in graph.node[k].output}
        leaks = [c for o in inner for c in consumers[o] if c not in nodes and c != join]
        if leaks or any(c != join for c in consumers[delta]):
            continue  # something outside the branch reads it: leave the slot as traced
        out[f"lora_down{sep}{layer}"] = (nodes, join, y)
    return out


def _absorb_feeders(graph, branch: set, join: int, consumers) -> None:
    """Add to `branch` the nodes whose every output only the branch reads (an upsampler slot's Resize of x): they
    then run at rank > 0 only."""
    outputs = {o.name for o in graph.output}
    changed = True
    while changed:
        changed = False
        for k in range(join - 1, -1, -1):
            node = graph.node[k]
            if k in branch or not node.output or node.op_type in ("If", "Constant"):  # constants stay shared
                continue
            users = [c for o in node.output for c in consumers[o]]
            if users and all(c in branch for c in users) and not any(o in outputs for o in node.output):
                branch.add(k)
                changed = True


def _sink(nodes, join: int, consumers, outputs, taken: set) -> int:
    """The last Add of the single-consumer chain of Adds after the join (y + delta + r + ... = (y + r + ...) + delta),
    stopping before another slot's join or an Add another slot's delta already sinks to."""
    k = join
    while True:
        out = nodes[k].output[0]
        users = consumers.get(out, [])
        if out in outputs or len(users) != 1 or nodes[users[0]].op_type != "Add" or users[0] in taken:
            return k
        k = users[0]


def gate_slots(model, sink: bool = True) -> int:
    """Rewrite `model` (an onnx ModelProto with LoRA slot inputs) in place: each slot's delta computed in an If, taken
    at rank > 0 only; the other branch gives a scalar zero of y's type, so an empty slot costs one in-place Add of a
    scalar (an If that passed y through would copy it: measured, that cost as much as the empty branch). Returns the
    number of slots gated (a slot whose branch feeds anything but its Add stays as traced)."""
    from onnx import TensorProto, helper

    graph = model.graph
    branches = _slot_branches(graph)
    if not branches:
        return 0
    nodes = list(graph.node)
    consumers = collections.defaultdict(list)
    for k, node in enumerate(nodes):
        for name in node.input:
            consumers[name].append(k)
    outputs = {o.name for o in graph.output}
    drop, replace = set(), {}
    size_zero, float_zero = GATE + "zero", GATE + "fzero"
    taken = {join for _, join, _ in branches.values()} | {k for b, _, _ in branches.values() for k in b}
    for n, (down, (branch, join, y)) in enumerate(sorted(branches.items())):
        tag = f"{GATE}{n}"
        delta = next(i for i in nodes[join].input if i != y)
        end = _sink(nodes, join, consumers, outputs, taken) if sink else join
        taken.add(end)
        result = nodes[end].output[0]
        replace[join] = []
        if end == join:  # y + delta, as traced
            base = y
        else:  # the Adds after the join take y directly; the delta is added to the last one's result
            first = nodes[consumers[nodes[join].output[0]][0]]
            fixed = helper.make_node("Add", [y if i == nodes[join].output[0] else i for i in first.input],
                                     list(first.output), name=first.name)
            replace[consumers[nodes[join].output[0]][0]] = [fixed]
            base = result + "/sdrt_base"
            last = replace.get(end, [nodes[end]])[-1]
            renamed = helper.make_node(last.op_type, list(last.input), [base], name=last.name)
            renamed.attribute.extend(last.attribute)
            replace[end] = [renamed]
        then_graph = helper.make_graph([nodes[k] for k in sorted(branch)], tag + "/then_graph", [],
                                       [helper.make_empty_tensor_value_info(delta)])
        else_graph = helper.make_graph([helper.make_node("CastLike", [float_zero, base], [tag + "/zero"], name=tag + "/zero")],
                                       tag + "/else_graph", [], [helper.make_empty_tensor_value_info(tag + "/zero")])
        gate = [
            helper.make_node("Size", [down], [tag + "/size"], name=tag + "/size"),
            helper.make_node("Greater", [tag + "/size", size_zero], [tag + "/on"], name=tag + "/on"),
            helper.make_node("If", [tag + "/on"], [tag + "/delta"], name=tag, then_branch=then_graph, else_branch=else_graph),
            helper.make_node("Add", [base, tag + "/delta"], [result], name=tag + "/add"),
        ]
        replace[end] = replace.get(end, []) + gate
        drop.update(branch)
    new_nodes = [helper.make_node("Constant", [], [size_zero], name=size_zero, value=helper.make_tensor(size_zero, TensorProto.INT64, [], [0])),
                 helper.make_node("Constant", [], [float_zero], name=float_zero, value=helper.make_tensor(float_zero, TensorProto.FLOAT, [], [0.0]))]
    for k, node in enumerate(nodes):
        if k in drop:
            continue
        new_nodes.extend(replace.get(k, [node]))
    del graph.node[:]
    graph.node.extend(new_nodes)
    return len(branches)


GATE = "sdrt_lora_gate/"


def ungate_slots(model) -> int:
    """Rewrite a graph made by gate_slots in place with each gate's then-branch inlined; returns the gates undone."""
    graph = model.graph
    gates = [n for n in graph.node if n.op_type == "If" and n.name.startswith(GATE)]
    if not gates:
        return 0
    nodes, rename = [], {}
    for node in graph.node:
        if node.op_type == "If" and node.name.startswith(GATE):
            then = next(a.g for a in node.attribute if a.name == "then_branch")
            rename[node.output[0]] = then.output[0].name  # the delta, computed in the main graph again
            nodes.extend(then.node)
        elif not node.name.startswith(GATE) or node.op_type == "Add":
            nodes.append(node)  # (the gate's Size, Greater and the shared zeros go)
    for node in nodes:
        node.input[:] = [rename.get(i, i) for i in node.input]
    del graph.node[:]
    graph.node.extend(nodes)
    return len(gates)


def prune_slots(model) -> int:
    """Rewrite `model` in place without its LoRA slots: branches and slot inputs removed, y where y + delta was."""
    graph = model.graph
    branches = _slot_branches(graph)
    drop, rename = set(), {}
    for branch, join, y in branches.values():
        drop.update(branch)
        drop.add(join)
        rename[graph.node[join].output[0]] = y
    kept = [node for k, node in enumerate(graph.node) if k not in drop]
    for node in kept:
        for j, name in enumerate(node.input):
            while name in rename:
                name = rename[name]
            node.input[j] = name
    for out in graph.output:
        if out.name in rename:
            raise ValueError(f"a slot's sum is the graph output {out.name}")
    del graph.node[:]
    graph.node.extend(kept)
    inputs = [i for i in graph.input if not SLOT_INPUT.match(i.name)]
    del graph.input[:]
    graph.input.extend(inputs)
    return len(branches)
