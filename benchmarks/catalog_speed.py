"""Catalog fitting throughput: isolated sources seen by ~20 images each.

Simulates isolated stars and galaxies in g, r, i over several epochs (21 images by
default), fits them from perturbed starting values, and reports sources per second with
the compilation excluded (a warm-up fit of one batch compiles the same shapes first).

    JAX_PLATFORMS=cpu python benchmarks/catalog_speed.py [--n-sources 256] [--epochs 7] [--psf moffat]

``--psf moffat`` renders the field with a beta = 2.5 Moffat PSF (given to the catalog as a
pixelised image, which its mixture fit then represents with 5 Gaussians instead of 1).
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from skystack.catalog.fit import fit_region, patch_sizes_px
from skystack.core.runtime import configure, device_summary
from skystack.sim.fields import simulate_field


def main(argv=None) -> dict:
    configure()  # float64 positions, the compilation cache
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-sources", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=7, help="epochs per band (3 bands)")
    ap.add_argument("--patch-px", type=int, default=15, help="smallest patch side (see fit.patch_sizes_px)")
    ap.add_argument("--psf", choices=("gaussian", "moffat"), default="gaussian")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-residual-search", action="store_true",
                    help="fit the candidates only (fit_region's detect_residuals off)")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    psf = {} if args.psf == "gaussian" else dict(psf_profile="moffat", moffat_beta=2.5, psf_sigma_px=(1.1, 1.4),
                                                 stamp_half_px=30, psf_image_half_px=25)
    images, truth = simulate_field(n_sources=args.n_sources, n_epochs=args.epochs, seed=args.seed, spacing_px=30,
                                   **psf)
    t_sim = time.perf_counter() - t0
    rng = np.random.default_rng(args.seed)
    cand = truth[["ra", "dec", "flux_r_nmgy"]].copy()
    cand["ra"] += rng.normal(0, 0.3, len(cand)) / 3600 / np.cos(np.radians(cand["dec"]))
    cand["dec"] += rng.normal(0, 0.3, len(cand)) / 3600
    cand["flux_r_nmgy"] *= np.exp(rng.normal(0, 0.2, len(cand)))
    kw = dict(patch_px=args.patch_px, batch_size=args.batch_size, detect_residuals=not args.no_residual_search)

    t0 = time.perf_counter()
    fit_region(cand.iloc[: args.batch_size], None, images, **kw)      # compiles these shapes
    t_warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    cat = fit_region(cand, None, images, **kw)
    t_fit = time.perf_counter() - t0
    out = {
        "device": device_summary(),
        "n_sources": len(cand), "images_per_source_median": float(np.median(cat["n_images"])),
        "psf": args.psf, "residual_search": not args.no_residual_search,
        "psf_components": int(max(im.psf_at(0, 0).n_components for im in images)),
        "patch_px": sorted(set(patch_sizes_px(images, cand, args.patch_px).tolist())),
        "simulate_s": round(t_sim, 2), "compile_and_first_batch_s": round(t_warm, 2),
        "fit_s": round(t_fit, 2), "sources_per_s": round(len(cand) / t_fit, 2),
        "converged_fraction": float(cat["converged"].mean()),
        "iterations_median": float(cat["iterations"].median()),
    }
    print(json.dumps(out, indent=1))
    print(f"\n{out['sources_per_s']} sources/s ({out['images_per_source_median']:.0f} images/source, "
          f"{out['patch_px']} px patches, {args.psf} PSF as {out['psf_components']} Gaussians) on {out['device']}")
    return out


if __name__ == "__main__":
    main()
