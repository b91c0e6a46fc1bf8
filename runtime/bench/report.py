"""Reports of a `sdrt bench` record: the markdown table, the report around it, and the PNG chart.

They read only the record run_bench returns (or its JSON), so a saved record can be formatted again without
measuring; apart from the orchestration so the formatting can change without touching how figures are taken.
matplotlib is imported only by write_chart.
"""

from __future__ import annotations

import shlex
from pathlib import Path


def _fmt(stat: dict | None, scale: float = 1.0, digits: int = 3, spread: bool = False) -> str:
    if not stat:
        return "-"
    text = f"{stat['median'] * scale:.{digits}f}"
    if spread and stat["n"] > 1:
        text += f" [{stat['min'] * scale:.{digits}f}-{stat['max'] * scale:.{digits}f}]"
    return text


def format_table(record: dict) -> str:
    """Markdown: one row per runner and batch size (medians; end to end with [min-max]), then the ratios."""
    c = record["config"]
    lines = [f"{c['size']}x{c['size']}, {c['steps']} steps ({c['scheduler']}), guidance {c['guidance']}, {c['precision']}, "
             f"{c['threads']} threads, {c['runs']} runs after {c['warmup']} warm-up"
             f"{', each after %g s idle' % c['settle_s'] if c.get('settle_s') else ''}; {record['order']}", "",
             "| runner | batch | load s | text s | UNet call s (calls) | loop overhead ms/step (% of step) | VAE decode s | "
             "VAE encode s | end to end s [min-max] | images/s | peak RSS GB* |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, entry in record["runners"].items():
        if entry.get("error") and not entry.get("stats"):
            lines.append(f"| {name} | - | not measured: {entry['error'][:300]} |||||||||")
            continue
        for batch, st in entry.get("stats", {}).items():
            calls = st["unet_call_s"] and entry["samples"][batch][0].get("unet_calls")
            lines.append(
                f"| {name} | {batch} | {_fmt(entry.get('stats_load_s'), digits=2)} | {_fmt(st['text_s'])} | "
                f"{_fmt(st['unet_call_s'])} ({calls or '-'}) | {_fmt(st['overhead_step_s'], 1e3, 2)} ({_fmt(st['overhead_pct'], digits=2)}%) | "
                f"{_fmt(st['decode_s'])} | {_fmt(st['encode_s'])} | {_fmt(st['e2e_s'], spread=True)} | {_fmt(st['images_per_s'], digits=2)} | "
                f"{_fmt(st['peak_rss_bytes'], 1e-9, 2)} |"
            )
    if record.get("speedups"):
        lines += ["", "| sdrt runner | vs | batch | end to end | UNet call | VAE decode | VAE encode | text |", "|---|---|---|---|---|---|---|---|"]
        for s, per in record["speedups"].items():
            for o, batches in per.items():
                for batch, r in batches.items():
                    cells = [f"{r[k]:.2f}x" if r.get(k) else "-" for k in ("e2e_s", "unet_call_s", "decode_s", "encode_s", "text_s")]
                    vs = o if r.get("side_by_side", True) else f"{o} (sequential, not side by side)"
                    lines.append(f"| {s} | {vs} | {batch} | " + " | ".join(cells) + " |")
    lines += ["", "*peak resident memory of the process during a run; in-process runners share sdrt's process. "
              "Loop overhead: loop time minus UNet calls, per call. Ratios: baseline median / sdrt median (> 1: sdrt faster)."]
    errors = [f"- {n}: {e['error']}" for n, e in record["runners"].items() if e.get("error") and e.get("stats")]
    return "\n".join(lines + (["", "Errors:"] + errors if errors else []))


def format_report(record: dict) -> str:
    """The table with what it was measured on: machine, libraries, what else ran, the command."""
    m, c = record["machine"], record["config"]
    lines = [f"# sdrt bench: {c['model_arg']} at {c['size']}x{c['size']}, {c['steps']} steps", "",
             f"- machine: {m['cpu']}, {m['physical_cores']} physical cores / {m['logical_cpus']} logical, "
             f"{(m.get('memory_bytes') or 0) / 2**30:.0f} GiB, GPU: {m.get('gpu') or 'none'}; {m['platform']}",
             f"- created {record['created']}, {record['seconds'] / 60:.1f} minutes",
             "- sdrt's environment: " + ", ".join(f"{k} {v}" for k, v in record["libraries"].items())]  # fmt: skip
    for name, entry in record["runners"].items():
        if entry.get("describe"):
            extra = f" ({entry.get('kind')}, {', '.join(f'{k} {v}' for k, v in (entry.get('versions') or {}).items())})"
            lines.append(f"- {name}: {entry['describe']}" + (extra if not name.startswith("sdrt-") else f" ({entry.get('kind')})"))
    for when in ("busy_before", "busy_after"):
        busy = record.get(when) or {}
        procs = busy.get("processes")
        procs = ", ".join(f"{p['cmd'][:90]} ({p['cpu_percent']:.0f}% CPU)" for p in procs) if isinstance(procs, list) else procs
        load = ", ".join(f"{x:.2f}" for x in busy.get("loadavg") or [])
        lines.append(f"- else running, {when.replace('busy_', '')} the benchmark: load average {load}; {procs or 'no other process above 5% CPU'}")
    if record.get("note"):
        lines.append(f"- note: {record['note']}")
    command = record.get("command") or {}
    if isinstance(command, dict) and command.get("argv"):
        lines.append(f"- command: `{shlex.join(['sdrt'] + command['argv'][1:])}`")
    return "\n".join(lines + ["", format_table(record)])


def write_chart(record: dict, path) -> Path:
    """A PNG: per-stage time of one image generation per runner (smallest batch), and images/s per batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, e in record["runners"].items() if e.get("stats")]
    batch = str(min(record["config"]["batches"]))
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 0.6 * max(len(names), 3) + 2.2), gridspec_kw={"width_ratios": [2, 1]})
    parts = (("text encoding", "text_s", 1), ("UNet calls", "unet_total_s", 1), ("loop overhead", "overhead_step_s", "calls"),
             ("VAE decode", "decode_s", 1))  # fmt: skip
    colours = ("#8da0cb", "#fc8d62", "#e78ac3", "#66c2a5", "#bbbbbb")
    for i, name in enumerate(names):
        st = record["runners"][name]["stats"].get(batch)
        if not st:
            continue
        calls = record["runners"][name]["samples"][batch][0].get("unet_calls") or 0
        left = 0.0
        for (label, key, mult), colour in zip(parts, colours):
            value = (st[key] or {}).get("median") or 0.0
            value *= calls if mult == "calls" else 1
            ax.barh(i, value, left=left, color=colour, label=label if i == 0 else None)
            left += value
        rest = max(st["e2e_s"]["median"] - left, 0.0)
        ax.barh(i, rest, left=left, color=colours[-1], label="rest (setup, image conversion)" if i == 0 else None)
        ax.text(st["e2e_s"]["median"], i, f" {st['e2e_s']['median']:.2f} s", va="center", fontsize=8)
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xlabel("seconds per generation (median)")
    c = record["config"]
    ax.set_title(f"batch {batch}, {c['size']}x{c['size']}, {c['steps']} steps, {c['threads']} threads", fontsize=10)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=5, frameon=False)
    for name in names:
        st = record["runners"][name]["stats"]
        bs = sorted(st, key=int)
        ax2.plot([int(b) for b in bs], [st[b]["images_per_s"]["median"] for b in bs], marker="o", label=name)
    ax2.set_xticks(sorted(int(b) for b in record["config"]["batches"]))
    ax2.set_xlabel("batch size")
    ax2.set_ylabel("images / s")
    ax2.set_title("throughput", fontsize=10)
    ax2.legend(fontsize=7)
    fig.suptitle(f"sdrt bench: {record['machine']['cpu']} ({record['machine']['physical_cores']} cores)"
                 + (f", GPU {record['machine']['gpu']}" if record["machine"].get("gpu") else ""), fontsize=11)  # fmt: skip
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
