"""Fidelity evaluation: every method against `full` on the same inputs (needle grid, RULER-style tasks, decode
perplexity, next-token fidelity, budget sweeps) and a report that gathers them. The protocol is in
docs/evaluation.md."""

from ..methods import MethodSpec, parse_methods
from .fidelity import fidelity
from .needle import needle_grid
from .ppl import perplexity
from .report import report
from .ruler import ruler
from .sweep import budget_sweep

__all__ = ["MethodSpec", "parse_methods", "needle_grid", "perplexity", "budget_sweep", "ruler", "fidelity", "report"]
