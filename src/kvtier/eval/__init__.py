"""Fidelity evaluation: every method against `full` on the same inputs (needle grid, decode perplexity, sweeps)."""

from .common import MethodSpec, parse_methods
from .needle import needle_grid
from .ppl import perplexity
from .sweep import budget_sweep

__all__ = ["MethodSpec", "parse_methods", "needle_grid", "perplexity", "budget_sweep"]
