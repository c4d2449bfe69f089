"""The search stage: one function per rule (shards, star mask, combination, detections,
report). Each reads files, writes files (atomically) and logs what it did."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd

from ..core.io import write_ecsv, write_parquet
from ..orbits.plan import chunk_range_ids, orbits_for_ids
from ..report.figures import (
    completeness,
    detection_figure,
    snr_histogram,
    snr_versus_parameter,
)
from ..survey.cache import TileCache
from ..survey.stage import select_images, with_zero_point
from .combine import combine_partials
from .evaluate import match_truth
from .filters import (
    bright_star_mask,
    duplicate_match_px,
    is_detection,
    merge_duplicates,
    star_mask_hits,
)
from .intersect import prepare_images
from .results import (
    clipped_coadd,
    expected_false_alarms,
    light_curves,
    robust_snr_sd,
    stamps_nmgy,
)
from .shard import search_partials, stage_cache


def _read_plan(path) -> dict:
    with open(path) as fh:
        return json.load(fh)


def searched_images(index: pd.DataFrame, image_kind: str, where: str) -> pd.DataFrame:
    """The images the search runs on, or an error saying that ``search.images`` selects none:
    a search over no image would report nothing, silently."""
    images = select_images(index, image_kind)
    if images.empty:
        kinds = index["is_difference"].astype(bool).value_counts().rename({True: "difference", False: "science"})
        have = ", ".join(f"{n} {k}" for k, n in kinds.items()) or "none"
        raise ValueError(f"{where}: search.images = {image_kind!r} selects none of the {len(index)} indexed images "
                         f"({have}); a difference image has IMAGETYP 'difference' or a pipeline's difference "
                         f"name, else set search.images: science")
    return images


def shard_stage(images_path, cache_path, listed_path, plan_path, chunk_range: int, partition: int, partials_out, *,
                image_kind: str, smoothing_sigma_px: float, max_batch_mb: int, staging_dir, log: logging.Logger,
                without_zero_point: str = "leave_out"):
    """``search_shard``: matched-filter partial sums of one chunk range on one partition."""
    plan = _read_plan(plan_path)
    listed = pd.read_parquet(listed_path)
    index = pd.read_parquet(images_path)
    images = with_zero_point(searched_images(index, image_kind, where=str(images_path)), str(images_path), log,
                             without_zero_point=without_zero_point)
    images = images[images["partition"] == partition]
    local = stage_cache(cache_path, staging_dir)
    if local != cache_path:
        log.info("tile cache staged to %s (once for all chunks of this job)", local)
    cache = TileCache.open(local)
    ids = chunk_range_ids(plan, chunk_range, listed)
    log.info("chunk range %d (%d orbits, ids %d..%d) x partition %d (%d %s images)", chunk_range, len(ids),
             ids[:1].sum(), ids[-1:].sum(), partition, len(images), image_kind)
    parts, size, steps = [], plan["chunk_size"], {}
    t0 = time.time()
    prepared = prepare_images(images) if len(images) else None  # headers parsed once for every chunk
    for k, start in enumerate(range(0, len(ids), size), 1):
        orbits = orbits_for_ids(plan, listed, ids[start:start + size])
        parts.append(search_partials(orbits, images, cache, smoothing_sigma_px=smoothing_sigma_px,
                                     max_batch_bytes=int(max_batch_mb) << 20, prepared=prepared, timings=steps))
        log.info("chunk %d/%d: %d orbits, %d intersections, %.1f s", k, -(-len(ids) // size), len(orbits),
                 len(parts[-1]), time.time() - t0)
    # A chunk range may hold no orbit (the plan's last range, a filtered file): an empty table.
    partials = pd.concat(parts, ignore_index=True) if parts else search_partials(
        orbits_for_ids(plan, listed, ids[:0]), images, cache)
    write_parquet(partials, partials_out)
    log.info("wrote %d intersections; seconds per step: %s", len(partials),
             ", ".join(f"{k} {v:.2f}" for k, v in steps.items()) or "none")


def star_mask_stage(catalog_path, stars_out, *, mag_limit: float, log: logging.Logger) -> None:
    """``star_mask``: the catalog's stars brighter than ``mag_limit`` (r, AB)."""
    stars = bright_star_mask(pd.read_parquet(catalog_path), mag_limit)
    write_parquet(stars, stars_out)
    log.info("%d catalog stars brighter than r = %.1f masked in the search", len(stars), mag_limit)


def combine_stage(partials_paths, images_path, stars_path, combined_out, candidates_out, *, sigma_g_clip: float,
                  snr_threshold: float, min_images: int, star_mask_radius_arcsec: float, log: logging.Logger) -> None:
    """``combine_chunk``: per-orbit combined SNR, and the partial sums of the detections."""
    partials = pd.concat([pd.read_parquet(p) for p in partials_paths], ignore_index=True)
    images = pd.read_parquet(images_path)
    stars = pd.read_parquet(stars_path) if stars_path else None
    masked = star_mask_hits(partials, images, stars, star_mask_radius_arcsec)
    combined = combine_partials(partials, n_sigma_g=sigma_g_clip, masked=masked)
    hit = combined[is_detection(combined, snr_threshold, min_images)]
    write_parquet(combined, combined_out)
    write_parquet(partials[partials["orbit_id"].isin(hit["orbit_id"])], candidates_out)
    log.info("%d orbits with intersections, %d masked intersections, %d above SNR %.1f",
             len(combined), int(masked.sum()), len(hit), snr_threshold)


def _candidates_of(combined_paths) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(str(p).replace(".parquet", "_candidates.parquet")) for p in combined_paths],
                     ignore_index=True)


def merge_stage(combined_paths, images_path, listed_path, plan_path, cache_paths, *, detections_out, ecsv_out,
                light_curves_out, all_orbits_out, plots_dir, snr_threshold: float, min_images: int,
                log: logging.Logger, stars_path=None, smoothing_sigma_px: float = 0.0, sigma_g_clip: float = 3.0,
                star_mask_radius_arcsec: float = 4.0, refined_snr_threshold: float | None = None) -> pd.DataFrame:
    """``merge_detections``: detections (duplicates merged), light curves, a figure each.

    For a region search (the plan has ``regions``) each candidate is refined over the six
    elements on the images (``search.refinement``), refined duplicates are merged, and the
    detections, light curves and figures follow the refined orbits."""
    plan = _read_plan(plan_path)
    listed = pd.read_parquet(listed_path)
    images = pd.read_parquet(images_path)
    combined = pd.concat([pd.read_parquet(p) for p in combined_paths], ignore_index=True)
    candidates = _candidates_of(combined_paths)
    write_parquet(combined, all_orbits_out)
    hits = combined[is_detection(combined, snr_threshold, min_images)]
    merged = merge_duplicates(hits, candidates, duplicate_match_px(images), snr_threshold=snr_threshold)
    det = merged.merge(orbits_for_ids(plan, listed, merged["orbit_id"].to_numpy()), on="orbit_id")
    names = listed.set_index("orbit_id")["name"] if "name" in listed else pd.Series(dtype=str)
    det["name"] = det["orbit_id"].map(names).fillna("")
    caches = {p: TileCache.open(c) for p, c in enumerate(cache_paths)}
    along, slices = candidates, {}  # the positions each detection's light curve and coadd follow
    if plan.get("regions"):
        det, along, slices = _refined(det, candidates, images, caches, stars_path, plan, smoothing_sigma_px=smoothing_sigma_px,
                              sigma_g_clip=sigma_g_clip, star_mask_radius_arcsec=star_mask_radius_arcsec,
                              refined_snr_threshold=snr_threshold if refined_snr_threshold is None
                              else refined_snr_threshold, min_images=min_images, log=log)
    det = det.sort_values(["snr", "orbit_id"], ascending=[False, True]).reset_index(drop=True)
    lc = light_curves(along[along["orbit_id"].isin(det["orbit_id"])], images)
    write_parquet(det, detections_out)
    write_ecsv(det, ecsv_out)
    write_ecsv(lc, light_curves_out)
    plots = Path(plots_dir)
    plots.mkdir(parents=True, exist_ok=True)
    for _, d in det.iterrows():
        on = along[along["orbit_id"] == d["orbit_id"]].sort_values("image_id", kind="stable")
        on = on.merge(images[["image_id", "mjd_mid_utc"]], on="image_id").sort_values("mjd_mid_utc", kind="stable")
        stamps, _ = stamps_nmgy(on, images, caches)
        title = f"orbit {d['orbit_id']} {d['name']}  a={d['a_au']:.4f} AU  SNR={d['snr']:.1f}  n={d['n_images']}"
        if "snr_trial" in d:
            title += f"  (trial SNR {d['snr_search']:.1f}, refined from {d['snr_trial']:.1f})"
        detection_figure(clipped_coadd(on, images, caches), lc[lc["orbit_id"] == d["orbit_id"]], title,
                         plots / f"orbit_{d['orbit_id']}.png", stamps=stamps, stamp_mjd=on["mjd_mid_utc"].to_numpy(),
                         slices=slices.get(int(d["orbit_id"])))
    log.info("%d orbits tried, %d above SNR %.1f, %d detections after merging duplicates",
             len(combined), len(hits), snr_threshold, len(det))
    return det


def _refined(det, candidates, images, caches, stars_path, plan, *, smoothing_sigma_px, sigma_g_clip,
             star_mask_radius_arcsec, refined_snr_threshold, min_images, log):
    """Refined detections of a region search and the tracks they follow (kept images only)."""
    from .refinement import refine_detections

    stars = pd.read_parquet(stars_path) if stars_path else None
    masked = star_mask_hits(candidates, images, stars, star_mask_radius_arcsec)
    n_trials = sum(r["n_trials"] for r in plan["regions"])
    log.info("region search: %d trial orbits; expected noise candidates above SNR %.1f at most %.2g (each trial "
             "an independent N(0, 1) SNR: an upper bound, neighbouring trials share pixels)", n_trials,
             refined_snr_threshold, expected_false_alarms(n_trials, refined_snr_threshold))
    refined, track, slices = refine_detections(det, candidates, images, caches, masked=masked, n_sigma_g=sigma_g_clip,
                                       smoothing_px=smoothing_sigma_px, match_px=duplicate_match_px(images),
                                       refined_snr_threshold=refined_snr_threshold, min_images=min_images, log=log)
    if refined.empty:
        return det.iloc[:0], candidates.iloc[:0], {}
    return refined, track[track["kept"]].drop(columns="kept"), slices


RECOVERED_COLUMNS = ["orbit_id", "name", "expected_combined_snr", "detected", "detection_orbit_id"]


def report_stage(all_orbits_path, detections_path, listed_path, plan_path, truth_paths, combined_paths, *,
                 histogram_out, completeness_out, grid_out, recovered_out, snr_threshold: float,
                 log: logging.Logger, summary_out=None, images_path=None, rejected_path=None,
                 catalog_path=None, experiment: str = "") -> pd.DataFrame:
    """``search_report``: SNR histogram, SNR along the listed grid, completeness against the
    simulated truth (when there is one), and the run's summary page (``summary_out``)."""
    combined = pd.read_parquet(all_orbits_path)
    det = pd.read_parquet(detections_path)
    listed = pd.read_parquet(listed_path)
    plan = _read_plan(plan_path)
    snr_histogram(combined["snr"].to_numpy(), snr_threshold, histogram_out)
    grid = listed[listed["listed_as"] == "grid"] if "listed_as" in listed else listed.iloc[:0]
    g = grid.merge(combined[["orbit_id", "snr"]], on="orbit_id", how="left").fillna({"snr": 0.0})
    snr_versus_parameter(g["a_au"].to_numpy(), g["snr"].to_numpy(), plan["reference"]["a_au"],
                         "semi-major axis (AU)", grid_out)
    recovered = pd.DataFrame(columns=RECOVERED_COLUMNS)
    if truth_paths:
        truth_orbits, injected, images = (pd.read_parquet(p) for p in truth_paths)
        # Injected positions are on the difference images the search used.
        inj = injected[injected["kind"] == "difference"].merge(images[["image_id", "path"]], on="path")
        det["truth_orbit_id"] = match_truth(det, inj[["orbit_id", "image_id", "x", "y"]],
                                            _candidates_of(combined_paths), duplicate_match_px(images))
        found = det[det["truth_orbit_id"] >= 0].groupby("truth_orbit_id")["orbit_id"].first()
        recovered = truth_orbits[["orbit_id", "name", "expected_combined_snr"]].copy()
        recovered["detected"] = recovered["orbit_id"].isin(found.index)
        recovered["detection_orbit_id"] = recovered["orbit_id"].map(found).fillna(-1).astype("int64")
        n_false = int((det["truth_orbit_id"] < 0).sum())
        spread = robust_snr_sd(combined["snr"]) if len(combined) >= 4 else 1.0
        expected = expected_false_alarms(len(combined), snr_threshold, snr_sd=max(spread, 1.0))
        log.info("false detections: %d; Gaussian-tail expectation for %d orbits tried (SNR spread %.3f): %.2g "
                 "(+3 sd: %.2g)", n_false, len(combined), spread, expected, expected + 3 * np.sqrt(expected))
        bright = recovered["expected_combined_snr"] >= 10
        log.info("recovered %d of %d injected objects; %d of %d with expected SNR >= 10; %d detections match no "
                 "injected object", int(recovered["detected"].sum()), len(recovered),
                 int(recovered.loc[bright, "detected"].sum()), int(bright.sum()), n_false)
    completeness(recovered, completeness_out)
    write_parquet(recovered, recovered_out)
    if summary_out is not None:
        from ..core.io import atomic_path
        from ..report.summary import run_summary_html

        page = run_summary_html(experiment, images_path=images_path, rejected_path=rejected_path,
                                detections_path=detections_path, plan_path=plan_path, recovered_path=recovered_out,
                                catalog_path=catalog_path, snr_threshold=snr_threshold)
        with atomic_path(summary_out) as tmp:
            Path(tmp).write_text(page)
    return recovered
