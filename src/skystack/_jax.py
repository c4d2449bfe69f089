"""One place that configures JAX for skystack.

Positions need float64, so x64 is enabled for the whole process; pixel kernels ask for
float32 explicitly. GPU memory is not preallocated so several jobs can share one GPU.
Compiled kernels are kept on disk ($SKYSTACK_JAX_CACHE, default ~/.cache/skystack/jax; "off"
disables it): every search or fit job compiles the same shapes, and compiling took most of
a small job's time.
"""
from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

jax.config.update("jax_enable_x64", True)

_cache_dir = os.environ.get("SKYSTACK_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "skystack", "jax"))
if _cache_dir.lower() != "off":
    jax.config.update("jax_compilation_cache_dir", _cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def device_summary() -> str:
    """A one-line description of the device JAX computes on, for logs."""
    dev = jax.devices()[0]
    kind = getattr(dev, "device_kind", dev.platform)
    return f"JAX {jax.__version__} on {dev.platform.upper()} ({kind}), {len(jax.devices())} device(s)"


__all__ = ["jax", "jnp", "device_summary"]
