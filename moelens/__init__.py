"""moelens: mechanistic interpretability for sparse mixture-of-experts language models.

>>> from moelens import HookedMoETransformer
>>> model = HookedMoETransformer.from_pretrained("moelens-tiny-facts")
>>> logits, cache = model.run_with_cache("Tel Mor plays the")
"""

__version__ = "0.1.0"

from moelens.cache import MoEActivationCache, expert_names_filter
from moelens.config import MoEConfig
from moelens.hooks import HookEditError, check_shapes
from moelens.model import HookedMoETransformer
from moelens.generation import GenerationCache, RoutingTrace
from moelens.steering import SteerExperts, detect_experts
from moelens.tracing import *  # noqa: F401,F403  (FactCase, trace_layers, trace_experts, ...)
from moelens.tracing import __all__ as _tracing_all

__all__ = [
    "HookedMoETransformer", "MoEActivationCache", "MoEConfig", "check_shapes", "expert_names_filter",
    "GenerationCache", "RoutingTrace", "SteerExperts", "detect_experts",
    *_tracing_all,
]
