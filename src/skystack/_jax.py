"""One place that configures JAX for skystack.

Positions need float64, so x64 is enabled for the whole process; pixel kernels ask for
float32 explicitly. GPU memory is not preallocated so several jobs can share one GPU.
"""
from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

jax.config.update("jax_enable_x64", True)


def device_summary() -> str:
    """A one-line description of the device JAX computes on, for logs."""
    dev = jax.devices()[0]
    kind = getattr(dev, "device_kind", dev.platform)
    return f"JAX {jax.__version__} on {dev.platform.upper()} ({kind}), {len(jax.devices())} device(s)"


__all__ = ["jax", "jnp", "device_summary"]
