"""KV placement methods, one per file. Importing this package registers them all."""

from .base import METHOD_REGISTRY, Method, method_class, register
from . import freekv, full, kvpr, offload, specache  # noqa: F401  (registration)

__all__ = ["METHOD_REGISTRY", "Method", "method_class", "register"]
