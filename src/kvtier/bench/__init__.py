"""The benchmark: decode speed and memory of every method beside Hugging Face's own caches (`kvtier bench`).

The harness is `kvtier.bench.harness`; the model shapes it builds are in `kvtier.bench.shapes` and the table and
plot it writes in `kvtier.bench.report`. The public names are re-exported here: `kvtier.bench.run(...)`.
"""

from .harness import (CPU_LABEL, DEFAULT_METHODS, HF_BASELINES, REAL_SHAPES, SHAPES, TINY_SHAPES, build_model,
                      format_table, model_config, parameter_count, parse_bench_methods, run)

__all__ = ["CPU_LABEL", "DEFAULT_METHODS", "HF_BASELINES", "REAL_SHAPES", "SHAPES", "TINY_SHAPES", "build_model",
           "format_table", "model_config", "parameter_count", "parse_bench_methods", "run"]
