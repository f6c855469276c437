"""The retrieval engine behind `freekv` and `specache`: scorer, granularity, query source, rest policy and
recall as parts (`options.EngineOptions`), one fixed-shape decode step without host syncs (`engine`)."""

from .options import EngineOptions, FreeKVOptions, SpeCacheOptions

__all__ = ["EngineOptions", "FreeKVOptions", "SpeCacheOptions"]
