"""Every method beside `full` on the same inputs: the runner each evaluation and the demo is built on.

`full` runs first on every input and its output is the reference: each method's row is computed from its own
output and full's, so every figure is set against full on exactly the same prompt.
"""

from __future__ import annotations

from ..cache import make_cache
from ..methods import parse_methods
from .common import check_caches, check_output_dir, with_full


class BesideFull:
    """`methods` ("freekv:budget=512,specache" or MethodSpecs) with full put first. Before any work it checks the
    output folder (when given) and builds each method's cache once at each of `lengths`, so that a bad option
    value fails before the first method runs, and that the longest length + `new_tokens` (what each prompt is
    given after it, where that is exact) fits the model's positions."""

    def __init__(self, model, methods, lengths, out_dir=None, new_tokens: int = 0):
        self.model = model
        self.specs = with_full(parse_methods(methods))
        if out_dir is not None:
            check_output_dir(out_dir)
        check_caches(model, self.specs, lengths, new_tokens)
        self.device = next(model.parameters()).device

    @property
    def labels(self) -> list[str]:
        return [spec.label for spec in self.specs]

    def cache(self, spec, context_tokens: int):
        """A fresh cache of `spec` for a prompt of `context_tokens` (a fractional budget is a share of it)."""
        return make_cache(self.model, spec, context_tokens)

    def rows(self, work, row) -> list[dict]:
        """`work(spec)` for every method, full first; one row per method: its label, then the fields
        `row(spec, output, full's output)` returns."""
        rows, reference = [], None
        for spec in self.specs:
            output = work(spec)
            if reference is None:
                reference = output
            rows.append({"method": spec.label, **row(spec, output, reference)})
        return rows

    def by_method(self, rows: list[dict]) -> dict[str, list[dict]]:
        """The rows of each method, in the methods' order."""
        return {label: [r for r in rows if r["method"] == label] for label in self.labels}
