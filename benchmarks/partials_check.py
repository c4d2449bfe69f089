"""Check that the search's partial sums do not change: ``search_partials`` on the first orbits
of the demo plan, saved once (``--save``) and compared later (``--compare``), bit for bit and
to a relative tolerance, for several chunk sizes and batch budgets.

    python -m benchmarks.partials_check --orbits 4000 --save /tmp/partials_before.parquet
    python -m benchmarks.partials_check --orbits 4000 --compare /tmp/partials_before.parquet

Prints JSON: per variant (chunk size, batch budget) the rows, whether every column is
identical, and the largest relative difference of psi and phi (against max(|a|, |b|), and
against each orbit-image row's own sqrt(phi) scale for psi, which can be near zero).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from skystack.core.runtime import configure
from skystack.search.shard import search_partials

from .end_to_end import REPO, chunk_orbits, load_search

VARIANTS = [(None, None), (1000, None), (None, 4)]  # (chunk size, max batch MiB); None: the config's


def partials_of(loaded: dict, n_orbits: int, chunk: int | None, batch_mb: int | None) -> pd.DataFrame:
    """Partials of plan positions [0, n_orbits) over every partition, in (orbit, image) order."""
    cfg, plan, listed = loaded["cfg"], loaded["plan"], loaded["listed"]
    size = chunk or plan["chunk_size"]
    budget = (batch_mb or cfg["search"]["max_batch_mb"]) << 20
    parts = []
    for start in range(0, n_orbits, size):
        orbits = chunk_orbits(plan, listed, start, min(start + size, n_orbits))
        parts += [search_partials(orbits, mine, cache, prepared=prepared, max_batch_bytes=budget,
                                  smoothing_sigma_px=cfg["search"]["smoothing_sigma_px"])
                  for mine, cache, prepared in loaded["shards"]]
    out = pd.concat(parts, ignore_index=True)
    return out.sort_values(["orbit_id", "image_id"], kind="stable").reset_index(drop=True)


def compare(got: pd.DataFrame, want: pd.DataFrame) -> dict:
    """Identity per column and the largest relative differences of psi and phi."""
    if len(got) != len(want) or not (got[["orbit_id", "image_id"]].to_numpy() == want[["orbit_id", "image_id"]].to_numpy()).all():
        return {"rows": len(got), "rows_before": len(want), "same_rows": False}
    identical = {c: bool(np.array_equal(got[c].to_numpy(), want[c].to_numpy(), equal_nan=True)) for c in want.columns}
    rel = {}
    for c in ("psi", "phi"):
        a, b = got[c].to_numpy(), want[c].to_numpy()
        scale = np.maximum(np.abs(a), np.abs(b))
        rel[c] = float(np.max(np.where(scale > 0, np.abs(a - b) / np.where(scale > 0, scale, 1), 0.0)))
    noise = np.sqrt(np.maximum(want["phi"].to_numpy(), 1e-300))  # psi's own noise scale
    rel["psi_over_sqrt_phi"] = float(np.max(np.abs(got["psi"].to_numpy() - want["psi"].to_numpy()) / noise))
    return {"rows": len(got), "same_rows": True, "identical": identical, "max_relative_difference": rel}


def main(argv=None) -> dict:
    configure()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=REPO / "config" / "experiments" / "demo.yaml")
    ap.add_argument("--workdir", type=Path, default=REPO / "benchmarks" / "out" / "end_to_end")
    ap.add_argument("--orbits", type=int, default=4000)
    ap.add_argument("--save", type=Path, help="write the partials of the config's chunking here")
    ap.add_argument("--compare", type=Path, help="compare every variant against these partials")
    args = ap.parse_args(argv)
    loaded = load_search(args.config, args.workdir)
    result = {"orbits": args.orbits}
    if args.save:
        partials_of(loaded, args.orbits, None, None).to_parquet(args.save)
        result["saved"] = str(args.save)
    if args.compare:
        want = pd.read_parquet(args.compare)
        result["variants"] = {f"chunk {c or 'config'}, batch {b or 'config'} MiB": compare(partials_of(loaded, args.orbits, c, b), want)
                              for c, b in VARIANTS}
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
