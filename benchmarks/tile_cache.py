"""B3: random patch gathers from the tile cache against the same patches from row-major FITS.

Writes ZTF-quadrant-sized images (3072 x 3080 float32) as plain FITS and as one tile cache,
then gathers the same random patches three ways: the tile cache (one vectorized call),
fitsio section reads per patch (how a FITS reader fetches a patch), and a vectorized gather
on the memory-mapped row-major FITS data (same code path as the cache, other layout).
Pages are warm in both cases after the first pass; --cold drops the page cache first (root).
The cache also gathers clustered patches (all of an image's within ``--cluster-px``, as a
region search's orbits fall), which it slices from assembled blocks of tiles; and the
machine's copy bandwidth is measured (a 256 MiB numpy copy) to set the gathers against.

    python -m benchmarks.tile_cache [--images 8] [--patches 200000] [--radius 4] [--tile 32]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import fitsio
import numpy as np

from skystack.core.runtime import configure
from skystack.survey.cache import TileCache, write_tile_cache


def drop_page_cache() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def copy_bandwidth_gb_s(mib: int = 256, repeat: int = 5) -> float:
    """Bytes read plus written per second by the best of ``repeat`` large numpy copies."""
    src = np.ones(mib << 18, np.float32)
    dst = np.empty_like(src)
    best = np.inf
    for _ in range(repeat):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.nbytes / best / 1e9


def main(argv=None) -> dict:
    configure()  # float64 positions, the compilation cache
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--patches", type=int, default=200_000)
    ap.add_argument("--fits-patches", type=int, default=20_000, help="patches read with fitsio (slow path)")
    ap.add_argument("--radius", type=int, default=4)
    ap.add_argument("--tile", type=int, default=32)
    ap.add_argument("--cluster-px", type=int, default=64, help="side of the box clustered patches fall in")
    ap.add_argument("--cold", action="store_true", help="drop the page cache before each method (needs root)")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args(argv)

    ny, nx = 3080, 3072
    rng = np.random.default_rng(0)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="skystack_b3_"))
    work.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(args.images):
        p = work / f"im{i}.fits"
        if not p.exists():
            fitsio.write(str(p), rng.normal(100, 10, (ny, nx)).astype(np.float32), clobber=True)
        paths.append(p)
    cache_path = work / "cache.tiles"
    if not cache_path.exists():
        write_tile_cache(cache_path, ((i, fitsio.read(str(p))) for i, p in enumerate(paths)), tile=args.tile)

    ids = rng.integers(0, args.images, args.patches)
    x = rng.uniform(args.radius, nx - 1 - args.radius, args.patches)
    y = rng.uniform(args.radius, ny - 1 - args.radius, args.patches)
    r = args.radius
    results = {}

    if args.cold:
        drop_page_cache()
    cache = TileCache.open(cache_path, verify=not args.cold)  # verifying reads every tile: no cold read after it
    t = time.perf_counter()
    got = cache.patches(ids, x, y, r)
    results["tile_cache_patches_per_s"] = args.patches / (time.perf_counter() - t)

    if args.cold:
        drop_page_cache()
    # Row-major memory map of the FITS data unit, gathered with the same vectorized indexing.
    arrays = []
    for p in paths:
        with fitsio.FITS(str(p)) as f:
            offset = f[0].get_offsets()["data_start"]
        arrays.append(np.memmap(p, dtype=">f4", mode="r", offset=offset, shape=(ny, nx)))
    t = time.perf_counter()
    off = np.arange(-r, r + 1)
    xc, yc = np.floor(x + 0.5).astype(int), np.floor(y + 0.5).astype(int)
    row_major = np.empty_like(got)
    for i, a in enumerate(arrays):
        sel = ids == i
        row_major[sel] = a[yc[sel, None, None] + off[None, :, None], xc[sel, None, None] + off[None, None, :]]
    results["row_major_mmap_patches_per_s"] = args.patches / (time.perf_counter() - t)
    assert np.array_equal(row_major, got), "tile cache and FITS disagree"

    # Clustered patches: each image's within one box (the dense path: blocks of tiles).
    corner_x = rng.uniform(r, nx - 1 - r - args.cluster_px, args.images)[ids]
    corner_y = rng.uniform(r, ny - 1 - r - args.cluster_px, args.images)[ids]
    cx, cy = corner_x + rng.uniform(0, args.cluster_px, args.patches), corner_y + rng.uniform(0, args.cluster_px, args.patches)
    cache.patches(ids, cx, cy, r)
    t = time.perf_counter()
    clustered = cache.patches(ids, cx, cy, r)
    results["tile_cache_clustered_patches_per_s"] = args.patches / (time.perf_counter() - t)
    cxc, cyc = np.floor(cx + 0.5).astype(int), np.floor(cy + 0.5).astype(int)
    for i, a in enumerate(arrays):
        sel = ids == i
        want = a[cyc[sel, None, None] + off[None, :, None], cxc[sel, None, None] + off[None, None, :]]
        assert np.array_equal(clustered[sel], want), "clustered patches disagree with FITS"
    results["copy_bandwidth_gb_s"] = copy_bandwidth_gb_s()
    results["patch_bytes"] = 4 * (2 * r + 1) ** 2

    if args.cold:
        drop_page_cache()
    n = min(args.fits_patches, args.patches)
    handles = [fitsio.FITS(str(p)) for p in paths]
    t = time.perf_counter()
    for k in range(n):
        patch = handles[ids[k]][0][yc[k] - r: yc[k] + r + 1, xc[k] - r: xc[k] + r + 1]
    results["fitsio_patches_per_s"] = n / (time.perf_counter() - t)
    assert np.array_equal(patch, got[n - 1])

    results.update({
        "images": args.images, "image_shape": [ny, nx], "patch_px": 2 * r + 1, "patches": args.patches,
        "cold_page_cache": bool(args.cold), "cpu_count": os.cpu_count(),
        "device": f"host CPU, numpy gathers ({os.cpu_count()} cores)",
        "speedup_vs_fitsio": results["tile_cache_patches_per_s"] / results["fitsio_patches_per_s"],
        "speedup_vs_row_major_mmap": results["tile_cache_patches_per_s"] / results["row_major_mmap_patches_per_s"],
    })
    results["load_average"] = list(os.getloadavg())
    results["summary"] = (f"tile cache {results['tile_cache_patches_per_s']:.3g} patches/s "
                          f"({results['tile_cache_clustered_patches_per_s']:.3g} clustered), "
                          f"{results['speedup_vs_fitsio']:.1f}x fitsio section reads, "
                          f"{results['speedup_vs_row_major_mmap']:.2f}x row-major mmap ({results['device']})")
    print(json.dumps(results, indent=1))
    print(results["summary"])
    return results


if __name__ == "__main__":
    main()
