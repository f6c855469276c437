"""The benchmark's printed table and its plot."""

from __future__ import annotations

from pathlib import Path

from ..evaluation.common import plotting

CPU_LABEL = "CPU — harness check, not a speed result"


def short_length(tokens: int) -> str:
    return f"{tokens // 1024}k" if tokens % 1024 == 0 else str(tokens)


def model_label(result: dict) -> str:
    """The benchmarked model as the table and plot name it: the shape, or the embedded model and its name."""
    if result.get("model"):
        name = result.get("model_name")
        return result["model"] if name in (None, result["model"]) else f"{result['model']} ({name})"
    return result["model_config"]


def format_table(result: dict) -> str:
    """One line per row, decode time (and on CPU the cache's share of it) and device KV set against full, the
    step's aten ops set against hf-dynamic and its host syncs; rows that failed say why, and each sync is named
    under the table."""
    mib = 1 << 20
    cpu = result["device_type"] == "cpu"
    w = max(8, *(len(r["method"]) + 2 for r in result["rows"]))
    head = (f"{'method':<{w}}{'ctx':>7}{'b':>4}  {'ms/tok':>9}{'ms x full':>10}{'cache ms':>9}{'x full':>7}"
            f"{'prefill s':>10}"
            f"{'peak MiB':>10}{'dev KV MiB':>11}{'KV x full':>10}{'h2d MiB/tok':>12}{'link GB/s':>10}"
            f"{'roofline ms':>12}{'transfer ms':>12}{'ops/step':>10}{'x hf':>6}{'syncs/step':>11}")
    lines = [f"{model_label(result)} ({result['parameters'] / 1e9:.3g}B params, {result['dtype']}) on "
             f"{result['device']}" + (f"  [{CPU_LABEL}]" if cpu else ""), head]
    notes, failed = [], []

    def num(value, fmt):
        return "-" if value is None else format(value, fmt)

    for r in result["rows"]:
        start = f"{r['method']:<{w}}{r['context']:>7}{r['batch']:>4}  "
        if r["status"] != "ok":
            lines.append(start + f"{r['status']}: {r['error'][:90]}")
            continue
        peak = "n/m" if cpu else num(r.get("peak_device_bytes", 0) / mib, ".0f")
        lines.append(start + f"{r['decode_ms_per_token']:>9.3f}{num(r['ms_vs_full'], '.2f'):>10}"
                     f"{num(r.get('cache_ms_per_token'), '.3f'):>9}{num(r.get('cache_ms_vs_full'), '.2f'):>7}"
                     f"{r['prefill_s']:>10.2f}{peak:>10}{r['device_kv_bytes'] / mib:>11.1f}"
                     f"{num(r['device_kv_vs_full'], '.3f'):>10}{r['h2d_bytes_per_token'] / mib:>12.2f}"
                     f"{r['link_bytes_per_s'] / 1e9:>10.2f}{r['roofline_ms']:>12.3f}{r['transfer_ms']:>12.3f}"
                     f"{num(r.get('aten_ops_per_step'), '.0f'):>10}{num(r.get('ops_vs_hf_dynamic'), '.2f'):>6}"
                     f"{num(r.get('host_syncs_per_step'), '.3g'):>11}")
        where = f"{r['method']} at {r['context']} x{r['batch']}"
        if r.get("host_syncs_by_call"):
            calls = ", ".join(f"{name} {n:g}" for name, n in r["host_syncs_by_call"].items())
            notes.append(f"host syncs per step, {where}: {calls}")
        if r.get("sync_debug") not in (None, "passed"):
            failed.append(f"CUDA sync debug mode, {where}: {r['sync_debug'][:160]}")
        if r.get("cpu_contention_spells"):
            notes.append(f"{where}: another process competed for the CPU cores during the timed steps "
                         f"({r['cpu_contention_spells']} contention spells of the C kernels): not a quiet machine's time")
    lines += notes + failed
    if any(r.get("sync_debug") == "passed" for r in result["rows"]):
        lines.append(f"CUDA sync debug mode: {'the other rows' if failed else 'every row'} passed.")
    if cpu:
        lines.append("cache ms: the step's time inside the kvtier method (storing and attention); the rest is the "
                     "model's own layers.")
        lines.append("peak device memory is not measured on CPU (n/m); dev KV is the caches' own count.")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> str | None:
    """Decode ms/token per method, one group per (context, batch), with each bar's two limits marked."""
    plt = plotting()
    if plt is None:
        return None
    groups = [(n, b) for n in result["contexts"] for b in result["batches"]]
    methods = result["methods"]
    rows = {(r["method"], r["context"], r["batch"]): r for r in result["rows"]}
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.4 * len(groups) * len(methods)) + 3.5, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    named = set()

    def once(name):  # a legend entry the first time only
        if name in named:
            return None
        named.add(name)
        return name

    for i, label in enumerate(methods):
        for g, (n, b) in enumerate(groups):
            row = rows[(label, n, b)]
            x = g + (i - (len(methods) - 1) / 2) * width
            if row["status"] != "ok":
                ax.annotate(f"{label}: {row['status']}", (x, 0.02), xycoords=("data", "axes fraction"), rotation=90,
                            ha="center", va="bottom", fontsize=7, color="crimson")
                continue
            ax.bar(x, row["decode_ms_per_token"], width, color=colors[i % len(colors)], label=once(label))
            ax.plot([x], [row["roofline_ms"]], marker="_", markersize=10, color="black",
                    linestyle="none", label=once("roofline (weights + KV read at HBM bandwidth)"))
            if row["transfer_ms"] > 0:
                ax.plot([x], [row["transfer_ms"]], marker="x", markersize=5, color="dimgray", linestyle="none",
                        label=once("pure transfer (h2d bytes at pinned bandwidth)"))
    ax.set_yscale("log")
    ax.set_xticks(range(len(groups)), [f"{short_length(n)} x{b}" for n, b in groups])
    ax.set_xlabel("context x batch")
    ax.set_ylabel("decode ms/token (median)")
    title = f"{model_label(result)} {result['dtype']} on {result['device']}"
    if result["device_type"] == "cpu":
        title += f"\n{CPU_LABEL}"
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
