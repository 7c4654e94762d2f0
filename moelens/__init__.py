"""moelens: mechanistic interpretability for sparse mixture-of-experts language models.

>>> from moelens import HookedMoETransformer
>>> model = HookedMoETransformer.from_pretrained("moelens-tiny-facts")
>>> logits, cache = model.run_with_cache("Tel Mor plays the")
"""

__version__ = "0.1.0"

import importlib as _importlib
import importlib.util as _importlib_util


def _load():
    """Import the public API (torch, transformers...). Deferred until a name is first used, so that
    ``moelens --help`` and ``--version`` answer at once (PEP 562 module ``__getattr__``)."""
    global __all__
    from moelens.cache import MoEActivationCache, expert_names_filter
    from moelens.config import MoEConfig
    from moelens.hooks import HookEditError, check_shapes
    from moelens.model import HookedMoETransformer
    from moelens.generation import GenerationCache, RoutingTrace
    from moelens.steering import SteerExperts, detect_experts
    import moelens.tracing as _tracing  # FactCase, trace_layers, trace_experts, ... (all of tracing.__all__)

    _tracing_all = list(_tracing.__all__)
    globals().update({k: getattr(_tracing, k) for k in _tracing_all})
    __all__ = [
        "HookedMoETransformer", "MoEActivationCache", "MoEConfig", "check_shapes", "expert_names_filter",
        "GenerationCache", "RoutingTrace", "SteerExperts", "detect_experts",
        *_tracing_all,
    ]
    globals().update({k: v for k, v in locals().items() if not k.startswith("_")})


_loading = False


def __getattr__(name):
    global _loading
    # a submodule (``from moelens import loading`` inside moelens.model, ``moelens.presets``): import
    # just it. Loading the whole API here would re-enter a module that is still initialising
    # (``import moelens.model`` first in a fresh interpreter raised a circular ImportError).
    if not name.startswith("_") and _importlib_util.find_spec(f"{__name__}.{name}") is not None:
        return _importlib.import_module(f"{__name__}.{name}")
    # while loading (or for dunders), unknown names are submodules: let the import system find them
    if not _loading and "__all__" not in globals() and not (name.startswith("__") and name != "__all__"):
        _loading = True
        try:
            _load()
        finally:
            _loading = False
        if name in globals():
            return globals()[name]
    raise AttributeError(f"module 'moelens' has no attribute {name!r}")


def __dir__():
    if "__all__" not in globals():
        _load()
    return sorted(set(globals()) | set(__all__))
