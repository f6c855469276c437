"""KV placement methods, one per file (described in docs/methods.md). Importing this package registers them all."""

from .base import (METHOD_REGISTRY, Method, MethodSpec, check_option_names, method_class, parse_methods, parse_value,
                   register, resolve_options)
from . import freekv, full, kvpr, offload, specache  # noqa: F401  (registration)

__all__ = ["METHOD_REGISTRY", "Method", "MethodSpec", "check_option_names", "method_class", "parse_methods",
           "parse_value", "register", "resolve_options"]
