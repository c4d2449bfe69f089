"""How skystack sets up JAX: called explicitly by every entry point, never on import.

``configure()`` enables float64 (positions need it; pixel kernels ask for float32
explicitly), keeps compiled kernels on disk ($SKYSTACK_JAX_CACHE, default
~/.cache/skystack/jax; "off" disables it: every search or fit job compiles the same
shapes, and compiling took most of a small job's time) and stops JAX from preallocating
GPU memory, so several jobs can share one GPU. Workflow scripts call it through
``core.logs.setup``; tests and benchmarks call it themselves.
"""
from __future__ import annotations

import os


def configure(compilation_cache: bool = True) -> None:
    """Set up JAX for skystack (idempotent). Call before the first JAX computation."""
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax

    jax.config.update("jax_enable_x64", True)
    cache_dir = os.environ.get("SKYSTACK_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "skystack", "jax"))
    if compilation_cache and cache_dir.lower() != "off":
        jax.config.update("jax_compilation_cache_dir", cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def require_x64(where: str) -> None:
    """Refuse to compute positions in float32: an error naming ``where`` unless x64 is on."""
    import jax

    if not jax.config.jax_enable_x64:
        raise RuntimeError(f"{where}: JAX float64 is off; call skystack.core.runtime.configure() first")


def device_summary() -> str:
    """A one-line description of the device JAX computes on, for logs."""
    import jax

    dev = jax.devices()[0]
    kind = getattr(dev, "device_kind", dev.platform)
    return f"JAX {jax.__version__} on {dev.platform.upper()} ({kind}), {len(jax.devices())} device(s)"
