"""Logging for workflow scripts: everything, stderr included, goes to the rule's log."""
from __future__ import annotations

import logging
import sys
import time


def setup(log_path, name: str) -> logging.Logger:
    """Send logging and stderr to ``log_path``, set up JAX (``core.runtime.configure``);
    return the script's logger."""
    from .runtime import configure

    configure()
    handle = open(log_path, "a", buffering=1)
    sys.stderr = handle
    logging.basicConfig(level=logging.INFO, stream=handle, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # JAX reports every platform it probes (TPU, ...) at INFO; only its warnings belong here.
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    logger = logging.getLogger(name)
    logger.info("started (%s)", time.strftime("%Y-%m-%d %H:%M:%S"))
    return logger


def log_device(logger: logging.Logger) -> None:
    """Say which device JAX computes on."""
    from .runtime import device_summary

    logger.info("device: %s", device_summary())
