"""Where a sparse deconvolution iteration spends its time, and the floors it runs against.

Each part of one Condat-Vu iteration is timed on its own inside a jitted loop (``--loops``
applications; the loop-free set-up cancels between two loop lengths), one chunk of stamps
at a time on one worker thread, and reported in ms per iteration for 10,000 41x41 stamps.
Two implementations are profiled:

* ``stamp``: the operators of ``skystack.deconvolve.operators`` on (n, ny, nx) batches, the
  PSF convolution by zero-padded real FFTs (the solver before the chunked layout);
* ``chunk``: those of ``skystack.deconvolve.batch_last`` on (ny, nx, n) chunks, the solver's.

Floors: a bare batched rfft2 + irfft2 pair at the FFT size of the stamp layout, a pass
that reads and writes the chunk's loop state once, and the GEMM rate of the DFT products.

Times are the process's CPU time, so that other people's load on shared cores counts
little; run it on one core, where XLA splits no operation over threads and the CPU time is
the work itself:

    JAX_PLATFORMS=cpu taskset -c 0 python benchmarks/deconvolve_profile.py [--repeats 5]
"""
from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from skystack.core.runtime import configure, device_summary
from skystack.deconvolve import batch_last
from skystack.deconvolve.operators import (
    convolve,
    correlate,
    fft_shape,
    psf_spectra,
    starlet_adjoint,
    starlet_transform,
)
from skystack.deconvolve.solvers import CPU_CHUNK_STAMPS, _solve_sparse_chunk, band_weights
from skystack.sim.stacks import simulate_truth_stack

lax = jax.lax
STAMP_PX = 41
PER_STAMPS = 10_000
N_BANDS = 3


def _loop_ms(run, n_stamps: int, loops: int, repeats: int) -> float:
    """CPU ms per loop step of ``run(k)`` for 10,000 stamps: two loop lengths, best of repeats."""
    short = max(1, loops // 5)
    run(short)
    best = np.inf
    for _ in range(repeats):
        times = []
        for k in (short, loops):
            t0 = time.process_time()
            run(k)
            times.append(time.process_time() - t0)
        best = min(best, (times[1] - times[0]) / (loops - short))
    return 1e3 * best * PER_STAMPS / n_stamps


def _per_iteration_ms(step, carry, n_stamps: int, loops: int, repeats: int) -> float:
    """CPU ms per application of ``step`` for 10,000 stamps."""
    looped = jax.jit(lambda c, k: lax.fori_loop(0, k, lambda i, c: step(c), c))
    return _loop_ms(lambda k: jax.block_until_ready(looped(carry, k)), n_stamps, loops, repeats)


def _stamp_parts(obs, psfs, w, loops, repeats):
    """The per-stamp implementation, float32, batch of the old default (256 stamps)."""
    n = len(obs)
    spec = psf_spectra(psfs, (STAMP_PX, STAMP_PX), "float32")
    x = jnp.asarray(np.maximum(obs, 0), jnp.float32)
    u = jnp.zeros((n, N_BANDS, STAMP_PX, STAMP_PX), jnp.float32) + 1e-4
    w = jnp.asarray(w[:, :, None, None], jnp.float32)
    big = fft_shape((STAMP_PX, STAMP_PX), (STAMP_PX, STAMP_PX))
    padded = jnp.zeros((n,) + big, jnp.float32) + 1e-3

    def prox(c):   # u_half = clip(u + sigma (2 phi_half - phix)) and the relaxation
        return c + 0.8 * (jnp.clip(c + 0.5 * (2 * (0.9 * c) - c), -w, w) - c)

    t = lambda step, carry: _per_iteration_ms(step, carry, n, loops, repeats)  # noqa: E731
    return {
        f"bare rfft2 + irfft2 pair {big[0]}x{big[1]}": t(lambda c: jnp.fft.irfft2(jnp.fft.rfft2(c) * 0.5, s=big), padded),
        "H x (pad, FFT pair, crop)": t(lambda c: convolve(c, spec), x),
        "H^T r (pad, FFT pair, crop)": t(lambda c: correlate(c, spec), x),
        "starlet analysis": t(lambda c: c + 0.1 * starlet_transform(c, N_BANDS + 1).sum(axis=1), x),
        "starlet synthesis (adjoint)": t(lambda c: c * 0.5 + 0.1 * starlet_adjoint(c)[:, None], u),
        "dual prox and relaxation": t(prox, u),
    }


def _chunk_parts(obs, psfs, w, loops, repeats):
    """The chunked implementation (what the solver runs), float32, one chunk."""
    n = CPU_CHUNK_STAMPS
    shape = (STAMP_PX, STAMP_PX)
    sizes = tuple(batch_last.exact_size(s, s) for s in shape)
    op = batch_last.convolver(shape, sizes, jnp.float32)
    mult = jnp.asarray(np.moveaxis(batch_last.psf_multipliers(psfs[:n], shape, op.axes), 0, -1), jnp.float32)
    x = jnp.asarray(np.moveaxis(np.maximum(obs[:n], 0), 0, -1), jnp.float32)
    u = jnp.zeros((N_BANDS,) + x.shape, jnp.float32) + 1e-4
    wl = jnp.asarray(np.moveaxis(np.broadcast_to(w[:n, :, None, None], (n, N_BANDS) + shape), 0, -1), jnp.float32)
    norm = jnp.float32(16)
    state = jnp.zeros((12,) + x.shape, jnp.float32)

    def prox(c):
        return c + 0.8 * (jnp.minimum(jnp.maximum(c + 0.5 * (2 * (0.9 * c) - c), -wl), wl) - c)

    def gemm(c):   # a y-axis analysis and synthesis pair: (Ky, h + 1) @ (h + 1, nx n) and back
        return jnp.tensordot(op.synth_y[0], jnp.tensordot(op.analyse_y[0], c, axes=1), axes=1) * 0.5

    t = lambda step, carry: _per_iteration_ms(step, carry, n, loops, repeats)  # noqa: E731
    parts = {
        "loop state pass (read + write 12 planes)": t(lambda c: c * 0.999 + 1e-6, state),
        "H x (DFT matrices)": t(lambda c: batch_last.convolve(c, mult, op), x),
        "H^T r (DFT matrices)": t(lambda c: batch_last.convolve(c, mult, op, adjoint=True), x),
        "starlet analysis": t(lambda c: c + 0.1 * batch_last.starlet(c, N_BANDS, norm).sum(axis=0), x),
        "starlet synthesis (adjoint)": t(lambda c: c * 0.5 + 0.1 * batch_last.starlet_adjoint(c, norm), u),
        "dual prox and relaxation": t(prox, u),
    }
    folded = jnp.zeros(op.analyse_y[0].shape[1:] + (STAMP_PX, n), jnp.float32) + 1e-3
    gemm_ms = t(gemm, folded)
    gemm_flops = 2 * 2 * op.analyse_y[0].size * STAMP_PX * PER_STAMPS
    return parts, gemm_flops / (gemm_ms * 1e-3), op


def _chunk_iteration_ms(obs, psfs, sigma, loops, repeats):
    n = CPU_CHUNK_STAMPS
    shape = (STAMP_PX, STAMP_PX)
    sizes = tuple(batch_last.exact_size(s, s) for s in shape)
    axes = tuple(batch_last.dft_axis(s, m) for s, m in zip(shape, sizes))
    bw = band_weights(psfs[:n], sigma[:n])
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    args = (f32(obs[:n]), f32(np.maximum(obs[:n], 0)), f32(batch_last.psf_multipliers(psfs[:n], shape, axes)),
            f32(np.broadcast_to(bw[:, :, None, None], bw.shape + shape)), f32(np.full(n, 0.5)), f32(np.full(n, 0.5)),
            0.8, 0.0)

    def solve(k):
        out = _solve_sparse_chunk(*args, k, jnp.float32(16), n_scales=N_BANDS + 1, n_reweights=0, fft_shape=sizes)
        return jax.block_until_ready(out)

    return _loop_ms(solve, n, loops, repeats)


def _dft_gemm_flops(op) -> float:
    """Multiply-adds x 2 of the DFT products per stamp and iteration (4 transforms)."""
    ay, ax = op.axes
    ky, kx = len(ay.weight), len(ax.weight)
    along_y = 2 * ky * (ay.half + 1) * STAMP_PX              # cos and sin, each (Ky, h+1) @ (h+1, nx)
    along_x = 2 * 2 * ky * kx * (ax.half + 1)                # cos and sin for both y parts
    return 4 * 2 * (along_y + along_x)


def main(argv=None) -> dict:
    configure()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--loops", type=int, default=40, help="applications per timed loop")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    truth, obs, psfs, sigma = simulate_truth_stack(256, size=STAMP_PX, n_psfs=64, seed=0, n_galaxies=64)
    w = band_weights(psfs, sigma)
    stamp = _stamp_parts(obs, psfs, w, args.loops, args.repeats)
    chunk, gemm_rate, op = _chunk_parts(obs, psfs, w, args.loops, args.repeats)
    iteration = _chunk_iteration_ms(obs, psfs, sigma, args.loops, args.repeats)
    flops = _dft_gemm_flops(op)
    state_pass = chunk["loop state pass (read + write 12 planes)"]
    fft_pair = next(v for k, v in stamp.items() if k.startswith("bare"))
    out = {
        "device": device_summary(), "load_average": os.getloadavg(), "chunk_stamps": CPU_CHUNK_STAMPS,
        "ms_per_iteration_10k": {"stamp layout, FFT": stamp, "chunk layout, DFT matrices": chunk},
        "chunk_iteration_ms_10k": round(iteration, 1),
        "floors_ms_10k": {
            "four FFTs (two rfft2 + irfft2 pairs) at the FFT size": round(2 * fft_pair, 1),
            "DFT GEMMs at the measured GEMM rate": round(flops * PER_STAMPS / gemm_rate * 1e3, 1),
            "one read + write pass of the loop state": round(state_pass, 1),
        },
        "dft_mflop_per_stamp_iteration": round(flops / 1e6, 3),
        "gemm_gflops_measured": round(gemm_rate / 1e9, 1),
        "note": "CPU time of one worker thread; the solver runs one chunk per core",
    }
    for table in out["ms_per_iteration_10k"].values():
        for key in table:
            table[key] = round(table[key], 1)
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
