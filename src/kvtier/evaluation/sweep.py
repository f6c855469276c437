"""One method over a list of budgets: where does it start to lose what full keeps? The curve, not one point."""

from __future__ import annotations

from pathlib import Path

from ..methods import MethodSpec, check_option_names, parse_methods
from .common import check_caches, check_output_dir, plotting, write_json
from .needle import check_grid, needle_grid
from .ppl import check_ppl, perplexity, text_windows


def check_sweep(method: str, option: str, values, base_options=None) -> tuple[str, dict]:
    """(method name, options held at every point) of a sweep of `option` over `values`, checked before any work."""
    parsed = parse_methods(method)
    if len(parsed) != 1:
        raise ValueError(f"a sweep runs one method, got {len(parsed)} in {method!r}")
    name, base = parsed[0].method, {**parsed[0].options, **(base_options or {})}
    check_option_names(name, {option: None}, " (the swept option)")
    if option in base:
        raise ValueError(f"{option!r} is swept over {list(values)}; do not also fix it in {method!r} or base_options")
    if not list(values):
        raise ValueError(f"no values to sweep {option!r} over; give some, such as 256,512,1024")
    return name, base


def budget_sweep(model, tokenizer, method: str = "freekv", budgets=(256, 512, 1024, 2048), option: str = "budget",
                 lengths=("2k",), depths=(0.1, 0.5, 0.9), texts=("prose", "code"), context="2k", targets=256,
                 base_options=None, out_dir=None, progress: bool = True, windows: int = 1) -> dict:
    """Needle success and perplexity delta vs full for `method` at each value of `option`.

    method may carry options after colons ("freekv:page_size=8:scorer=lowbit"), held at every point as
    base_options are; the swept option must not be one of them."""
    method, base = check_sweep(method, option, budgets, base_options)
    lengths, depths, _ = check_grid(lengths, depths, "single")
    texts, context = check_ppl(texts, context, targets, windows)
    if out_dir is not None:
        check_output_dir(out_dir)
    specs = [MethodSpec(method, {**base, option: b}) for b in budgets]
    check_caches(model, specs, lengths)
    check_caches(model, specs, context, targets)  # before the needle grid, not after it
    text_windows(tokenizer, texts, context, targets, windows)  # the same
    needle = needle_grid(model, tokenizer, specs, lengths=lengths, depths=depths, progress=progress)
    ppl = perplexity(model, tokenizer, specs, texts=texts, context=context, targets=targets, windows=windows,
                     progress=progress)
    points = []
    for spec, value in zip(specs, budgets):
        deltas = [r["ppl_delta_vs_full"] for r in ppl["rows"] if r["method"] == spec.label]
        points.append({option: value, "label": spec.label,
                       "needle_success": needle["summary"][spec.label]["success_rate"],
                       "needle_agreement_with_full": needle["summary"][spec.label]["agreement_with_full"],
                       "ppl_delta_max": max(deltas),
                       "ppl_delta_by_text": {r["text"]: r["ppl_delta_vs_full"] for r in ppl["rows"]
                                             if r["method"] == spec.label}})
    result = {"eval": "sweep", "method": method, "options": base, "option": option, "points": points,
              "full": {"needle_success": needle["summary"]["full"]["success_rate"]},
              "needle": needle, "ppl": ppl}
    if out_dir is not None:
        result["json"] = str(write_json(result, out_dir, f"sweep_{method}_{option}.json"))
        plt = plotting()
        if plt is not None:
            fig, ax1 = plt.subplots(figsize=(5, 3.4))
            xs = [p[option] for p in points]
            ax1.plot(xs, [p["needle_success"] for p in points], "o-", label="needle success")
            ax1.axhline(result["full"]["needle_success"], ls=":", color="gray", label="full: needle")
            ax1.set_xscale("log", base=2)
            ax1.set_xlabel(option)
            ax1.set_ylabel("needle success")
            ax2 = ax1.twinx()
            ax2.plot(xs, [p["ppl_delta_max"] for p in points], "s--", color="tab:red", label="ppl delta (max)")
            ax2.set_ylabel("perplexity - full's")
            fig.legend(loc="lower right", fontsize=8)
            ax1.set_title(f"{method}: {option} sweep", fontsize=10)
            fig.tight_layout()
            path = Path(out_dir) / f"sweep_{method}_{option}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            result["plot"] = str(path)
    return result
