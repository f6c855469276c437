"""The report: every evaluation JSON in a directory gathered into README.md (markdown tables, each number with
full's beside it) and summary.png (every method across every task)."""

from __future__ import annotations

import json
from pathlib import Path

from .common import bars, plotting


def _pct(x: float) -> str:
    return f"{x:.0%}"


def _vs_full(value: float, full: float, label: str, fmt=_pct) -> str:
    return fmt(value) if label == "full" else f"{fmt(value)} (full {fmt(full)})"


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header),
            *("| " + " | ".join(str(c) for c in row) + " |" for row in rows), ""]


def load_results(out_dir) -> dict:
    """{"needle": data, "ruler": data, "ppl": data, "fidelity": data, "sweeps": [data, ...]} from the JSONs in
    out_dir and its subfolders. Several perplexity JSONs (one per context, or per text run side by side) merge
    into one: their rows together, each row keeping its own context, targets and windows. Several needle grids
    over the same prompts merge likewise (methods run apart, against one baseline)."""
    found = {"sweeps": []}
    root = Path(out_dir)
    # out_dir's own files first: a grid there is the one others merge into (its header, its method order)
    if not root.is_dir():
        raise ValueError(f"no evaluation JSON in {root}: " + ("it is a file, not a folder" if root.exists() else
                         "the folder does not exist") + "; give the folder the eval commands wrote to")
    for path in sorted(root.rglob("*.json"), key=lambda p: (len(p.relative_to(root).parts), str(p))):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path} is not valid JSON ({err}); fix or remove it, or report on another folder") \
                from None
        if not isinstance(data, dict):
            continue  # not an evaluation result
        data["file"] = str(path.relative_to(root))
        data["folder"] = path.parent  # where the run's pictures are, beside its JSON
        if data.get("eval") == "sweep":
            found["sweeps"].append(data)
        elif data.get("eval") == "ppl" and "ppl" in found:
            merged = found["ppl"]
            _merge_rows(merged, data, ("text", "context"))
            merged["texts"] = list(dict.fromkeys(merged["texts"] + data["texts"]))
        elif data.get("eval") == "needle" and "needle" in found:
            merged = found["needle"]
            for key in ("kinds", "lengths", "depths", "seed"):
                if merged.get(key) != data.get(key):
                    raise ValueError(f"needle grids {merged['file']} and {data['file']} differ in {key} "
                                     f"({merged.get(key)} vs {data.get(key)}): only grids over the same prompts merge")
            _merge_rows(merged, data, ("kind", "length", "depth"))
            merged["summary"].update({m: s for m, s in data["summary"].items() if m != "full"})
        elif data.get("eval") in ("needle", "ruler", "ppl", "fidelity"):
            found[data["eval"]] = data
    return found


def _merge_rows(merged: dict, data: dict, key: tuple[str, ...]) -> None:
    """Add a second run's rows to merged. Its `full` rows are the baseline again on the prompts both runs share:
    they must agree with the first run's (same answer, same perplexity), or the two runs' deltas are not
    against one baseline; full rows on new prompts are kept."""
    full = {tuple(r[k] for k in key): r for r in merged["rows"] if r["method"] == "full"}
    for row in data["rows"]:
        if row["method"] != "full":
            merged["rows"].append(row)
            continue
        first = full.get(tuple(row[k] for k in key))
        if first is None:
            merged["rows"].append(row)
        elif first.get("answer") != row.get("answer") or \
                abs(first.get("ppl", 0.0) - row.get("ppl", 0.0)) > 1e-4 * abs(first.get("ppl", 1.0)):
            raise ValueError(f"{merged['file']} and {data['file']} disagree on full at "
                             f"{dict(zip(key, (row[k] for k in key)))}: rerun them with the same settings "
                             "(threads, dtype, versions) or in one run")
    merged["file"] += f"`, `{data['file']}"


def _ppl_columns(ppl: dict) -> dict:
    """{(text, context): {label: row}} of the perplexity rows."""
    columns = {}
    for row in ppl["rows"]:
        columns.setdefault((row["text"], row["context"]), {})[row["method"]] = row
    return columns


def _metrics(found: dict) -> dict:
    """{panel title: {group: {method label: value}}}: what summary.png and the summary table show."""
    panels = {}
    if "needle" in found:
        s = found["needle"]["summary"]
        panels["needle found"] = {k: {m: v["kinds"][k]["success_rate"] for m, v in s.items()}
                                  for k in found["needle"]["kinds"]}
    if "ruler" in found:
        s = found["ruler"]["summary"]
        panels["RULER score"] = {t: {m: v[t]["score"] for m, v in s.items()} for t in found["ruler"]["tasks"]}
    if "fidelity" in found:
        s = found["fidelity"]["summary"]
        panels["top-1 agreement with full"] = {t: {m: v["by_text"][t]["top1_agreement"] for m, v in s.items()}
                                               for t in found["fidelity"]["texts"]}
    if "ppl" in found:
        panels["perplexity - full's"] = {f"{t} {n}": {m: r["ppl_delta_vs_full"] for m, r in rows.items()}
                                         for (t, n), rows in _ppl_columns(found["ppl"]).items()}
    return panels


def _labels(panels: dict) -> list[str]:
    return list(dict.fromkeys(m for groups in panels.values() for g in groups.values() for m in g))


def _summary_png(panels: dict, out_dir) -> str | None:
    plt = plotting()
    if plt is None or not panels:
        return None
    cols = min(2, len(panels))
    rows = (len(panels) + cols - 1) // cols
    labels = _labels(panels)
    ncol = min(3, len(labels))
    legend_in = 0.25 * (-(-len(labels) // ncol)) + 0.2  # the legend's own band, so it never covers tick labels
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 3.4 * rows + legend_in), squeeze=False)
    for ax, (title, groups) in zip(axes.flat, panels.items()):
        bars(ax, groups, title, title, labels)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=8)
    fig.tight_layout(rect=(0, legend_in / fig.get_figheight(), 1, 1))
    path = Path(out_dir) / "summary.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def _files(data: dict, *pictures: str) -> str:
    """The section's files for its heading: the JSON, then each picture (a glob beside it) that was written."""
    shown = [data["file"]]
    for picture in pictures:
        if any(Path(data["folder"]).glob(picture.replace("<method>", "*"))):
            shown.append(picture)
    return "`" + "`, `".join(shown) + "`"


def _needle_section(data: dict) -> list[str]:
    lines = [f"## Needle in a haystack ({_files(data, 'needle.png', 'needle_<method>.png')})", "",
             f"Passphrases at depths {', '.join(f'{d:g}' for d in data['depths'])} of Python's help text; kinds: "
             f"{', '.join(data['kinds'])} (multikey: {data.get('keys', 4)} projects' passphrases, one asked); "
             f"seed {data['seed']}; greedy answers. Cells: share found, full's beside it.", ""]
    for kind in data["kinds"]:
        cell = {(r["method"], r["length"]): [] for r in data["rows"] if r["kind"] == kind}
        for r in data["rows"]:
            if r["kind"] == kind:
                cell[r["method"], r["length"]].append(r)
        rows = []
        for label, s in data["summary"].items():
            rates = [sum(r["success"] for r in cell[label, n]) / len(cell[label, n]) for n in data["lengths"]]
            full = [sum(r["success"] for r in cell["full", n]) / len(cell["full", n]) for n in data["lengths"]]
            rows.append([label, *(_vs_full(a, b, label) for a, b in zip(rates, full)),
                         _pct(s["kinds"][kind]["agreement_with_full"])])
        lines += [f"**{kind}**", ""]
        lines += _table(["method", *(f"{n} tokens" for n in data["lengths"]), "token-identical to full"], rows)
    rates = [[label, _pct(s["prefetch_hit_rate"]) if "prefetch_hit_rate" in s else "",
              _pct(s["correction_rate"]) if "correction_rate" in s else ""]
             for label, s in data["summary"].items() if "prefetch_hit_rate" in s or "correction_rate" in s]
    if rates:
        lines += ["Speculation, mean over the prompts: SpeCache's prefetch hit rate (share of the speculative "
                  "token's top-k that the real token also picked) and the correction rate: FreeKV's is the share of "
                  "layer, KV head and step checks whose query drifted below tau; SpeCache's (with `correct`) the "
                  "share of layer-steps that fetched the real top-k again.", ""]
        lines += _table(["method", "prefetch hit rate", "correction rate"], rates)
    return lines


def _ruler_section(data: dict) -> list[str]:
    lines = [f"## RULER-style tasks ({_files(data, 'ruler.png')})", "",
             f"{data['samples']} prompt(s) per task and length, seed {data['seed']}; score = share of the expected "
             f"names / words in the answer (vt: variable tracking, cwe: common-word extraction; options "
             f"{data['task_options']}).", ""]
    rows = []
    for label, s in data["summary"].items():
        rows.append([label, *(f"{_vs_full(s[t]['score'], data['summary']['full'][t]['score'], label)}, "
                              f"{_pct(s[t]['agreement_with_full'])} identical" for t in data["tasks"])])
    return lines + _table(["method", *data["tasks"]], rows)


def _fidelity_section(data: dict) -> list[str]:
    lines = [f"## Next-token fidelity ({_files(data, 'fidelity.png')})", "",
             f"Along full's greedy continuation ({data['new_tokens']} tokens) of {data['prompts']} window(s) per "
             f"text of {', '.join(map(str, data['lengths']))} tokens, every method teacher-forced on full's tokens.",
             ""]
    rows = [[label, t, _pct(v["by_text"][t]["top1_agreement"]), f"{v['by_text'][t]['kl_mean']:.3g}"]
            for label, v in data["summary"].items() for t in data["texts"]]
    rows += [[label, "all", _pct(v["top1_agreement"]), f"{v['kl_mean']:.3g} (max {v['kl_max']:.3g})"]
             for label, v in data["summary"].items()]
    return lines + _table(["method", "text", "top-1 = full's", "mean KL(full ‖ method), nats"], rows)


def _ppl_section(data: dict) -> list[str]:
    lines = [f"## Decode perplexity (`{data['file']}`)", "",
             "`kvtier.score`: target tokens after the context, one token at a time; with several windows per text "
             "their targets are pooled (scored tokens = targets x windows).", ""]
    with_ci = all("ppl_delta_ci95" in r for r in data["rows"])  # JSONs from before the interval lack it
    rows = []
    for (text, context), by_method in _ppl_columns(data).items():
        scored = {label: r.get("scored_tokens", r.get("targets", data.get("targets"))) for label, r in by_method.items()}
        rows += [[label, text, context, scored[label], f"{r['ppl']:.3f}",
                  f"{by_method['full']['ppl']:.3f}", f"{r['ppl_delta_vs_full']:+.4f}",
                  *([f"[{r['ppl_delta_ci95'][0]:+.4f}, {r['ppl_delta_ci95'][1]:+.4f}]"] if with_ci else [])]
                 for label, r in by_method.items()]
    return lines + _table(["method", "text", "context", "scored tokens", "ppl", "full's ppl", "delta",
                           *(["95% CI"] if with_ci else [])], rows)


def _sweep_section(data: dict) -> list[str]:
    option = data["option"]
    texts = data["ppl"]["texts"]
    held = ",".join(f"{k}={v}" for k, v in sorted(data.get("options", {}).items()))
    name = f"{data['method']}:{held}" if held else data["method"]
    png = Path(data["file"]).with_suffix(".png")
    files = f"`{data['file']}`, `{png}`" if (Path(data["folder"]) / png.name).is_file() else f"`{data['file']}`"
    lines = [f"## {name} {option} sweep ({files})", "",
             f"Needle at {data['needle']['lengths']} tokens, depths {data['needle']['depths']}; perplexity after "
             f"{data['ppl']['context']} tokens.", ""]
    rows = [[p[option], _vs_full(p["needle_success"], data["full"]["needle_success"], ""),
             _pct(p["needle_agreement_with_full"]), *(f"{p['ppl_delta_by_text'][t]:+.4f}" for t in texts)]
            for p in data["points"]]
    return lines + _table([option, "needle found", "token-identical to full", *(f"{t} ppl delta" for t in texts)],
                          rows)


def report(out_dir, title: str = "kvtier: approximate methods against full", command: str | None = None,
           note: str | None = None) -> dict:
    """Read every evaluation JSON in out_dir; write out_dir/README.md (`command` that made them at the top, then
    `note`) and out_dir/summary.png."""
    found = load_results(out_dir)
    if len(found) == 1 and not found["sweeps"]:
        raise ValueError(f"no evaluation JSON (needle, ruler, ppl, fidelity, sweep) in {out_dir}")
    panels = _metrics(found)
    png = _summary_png(panels, out_dir)
    first = next(d for k, d in found.items() if k != "sweeps") if len(found) > 1 else found["sweeps"][0]
    env = first.get("environment", {})
    lines = [f"# {title}", ""]
    if command:
        lines += ["Produced by one command, from the repository root:", "", "```bash", command, "```", ""]
    if note:
        lines += [note, ""]
    if env:
        lines += [f"kvtier {env.get('kvtier')}, torch {env.get('torch')}, transformers {env.get('transformers')}, "
                  f"device {env.get('device')} ({env.get('cpu_threads')} threads). Every row is set against `full` "
                  f"on the same prompts in the same run (runs merged here agree on `full`: checked on load); a "
                  f"fractional budget (`budget=0.25`) is that share of each "
                  f"prompt's context length.", ""]
    if panels:
        labels = _labels(panels)
        columns = [(title, group) for title, groups in panels.items() for group in groups]
        rows = [[label, *(_fmt_metric(title, panels[title][group].get(label)) for title, group in columns)]
                for label in labels]
        # the picture only when it was written (it is not without matplotlib)
        lines += ["## Summary (`summary.png`)", "", "![summary](summary.png)", ""] if png else ["## Summary", ""]
        header = ["method", *(f"{title}: {group}" for title, group in columns)]
        if "fidelity" in found:  # the KL is on another scale than the chart's panels: table only
            kl = found["fidelity"]["summary"]
            header.append("mean KL(full ‖ method)")
            rows = [[*row, f"{kl[row[0]]['kl_mean']:.3g}" if row[0] in kl else ""] for row in rows]
        lines += _table(header, rows)
    sections = {"needle": _needle_section, "ruler": _ruler_section, "fidelity": _fidelity_section,
                "ppl": _ppl_section}
    for key, section in sections.items():
        if key in found:
            lines += section(found[key])
    for sweep in found["sweeps"]:
        lines += _sweep_section(sweep)
    path = Path(out_dir) / "README.md"
    path.write_text("\n".join(lines))
    return {"readme": str(path), "plot": png, "panels": panels}


def _fmt_metric(title: str, value) -> str:
    if value is None:
        return ""
    return f"{value:+.3f}" if title.startswith("perplexity") else _pct(value)
