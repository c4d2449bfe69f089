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
from ..orbits.noise_peaks import expected_noise_peaks, gaussian_tail, threshold_for_noise_peaks
from ..orbits.plan import chunk_range_ids, orbits_for_ids
from ..report.figures import (
    completeness,
    detection_figure,
    snr_histogram,
    snr_versus_parameter,
)
from ..survey.cache import TileCache
from ..survey.stage import select_images, with_zero_point
from .combine import combine_partials, combine_sums, reduce_partials
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


def _shard_images(images_path, image_kind: str, without_zero_point: str, log) -> pd.DataFrame:
    """The searched images of the index that have a zero point (or all, in ADU)."""
    index = pd.read_parquet(images_path)
    return with_zero_point(searched_images(index, image_kind, where=str(images_path)), str(images_path), log,
                           without_zero_point=without_zero_point)


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _search_partition(plan, listed, ids, images, cache_path, *, smoothing_sigma_px, max_batch_mb, staging_dir, log,
                      steps=None) -> pd.DataFrame:
    """Per-image partials of the orbits ``ids`` on one partition's images, chunk by chunk."""
    local = stage_cache(cache_path, staging_dir)
    if local != cache_path:
        log.info("tile cache staged to %s (once for all chunks of this job)", local)
    cache = TileCache.open(local)
    parts, size, steps = [], plan["chunk_size"], {} if steps is None else steps
    t0 = time.time()
    prepared = prepare_images(images) if len(images) and len(ids) else None  # headers parsed once for every chunk
    for k, start in enumerate(range(0, len(ids), size), 1):
        orbits = orbits_for_ids(plan, listed, ids[start:start + size])
        parts.append(search_partials(orbits, images, cache, smoothing_sigma_px=smoothing_sigma_px,
                                     max_batch_bytes=int(max_batch_mb) << 20, prepared=prepared, timings=steps))
        log.info("chunk %d/%d: %d orbits, %d intersections, %.1f s", k, -(-len(ids) // size), len(orbits),
                 len(parts[-1]), time.time() - t0)
    # A chunk range may hold no orbit (the plan's last range, a filtered file): an empty table.
    return pd.concat(parts, ignore_index=True) if parts else search_partials(
        orbits_for_ids(plan, listed, ids[:0]), images, cache)


def shard_stage(images_path, cache_path, listed_path, plan_path, chunk_range: int, partition, partials_out, *,
                image_kind: str, smoothing_sigma_px: float, max_batch_mb: int, staging_dir, log: logging.Logger,
                without_zero_point: str = "leave_out", reduce: bool = False, stars_path=None,
                star_mask_radius_arcsec: float = 4.0):
    """``search_shard``: matched-filter partial sums of one chunk range on one partition, or on a
    group of partitions (``partition`` and ``cache_path`` then lists, in the same order).

    ``reduce`` (a search without sigma-G clipping): the bright-star mask (``stars_path``) is
    applied here and one row of sums per orbit and partition is written (``reduce_partials``)
    instead of one per intersection."""
    plan = _read_plan(plan_path)
    listed = pd.read_parquet(listed_path)
    searched = _shard_images(images_path, image_kind, without_zero_point, log)
    stars = pd.read_parquet(stars_path) if stars_path else None
    ids = chunk_range_ids(plan, chunk_range, listed)
    out, steps = [], {}
    for p, cache_path_p in zip(_as_list(partition), _as_list(cache_path), strict=True):
        images = searched[searched["partition"] == p]
        log.info("chunk range %d (%d orbits, ids %d..%d) x partition %d (%d %s images)", chunk_range, len(ids),
                 ids[:1].sum(), ids[-1:].sum(), p, len(images), image_kind)
        partials = _search_partition(plan, listed, ids, images, cache_path_p, smoothing_sigma_px=smoothing_sigma_px,
                                     max_batch_mb=max_batch_mb, staging_dir=staging_dir, log=log, steps=steps)
        if reduce:
            partials = reduce_partials(partials, star_mask_hits(partials, images, stars, star_mask_radius_arcsec))
        out.append(partials)
    partials = pd.concat(out, ignore_index=True)
    write_parquet(partials, partials_out)
    log.info("wrote %d %s; seconds per step: %s", len(partials),
             "per-orbit sums (orbit x partition)" if reduce else "intersections",
             ", ".join(f"{k} {v:.2f}" for k, v in steps.items()) or "none")


def star_mask_stage(catalog_path, stars_out, *, mag_limit: float, log: logging.Logger) -> None:
    """``star_mask``: the catalog's stars brighter than ``mag_limit`` (r, AB)."""
    stars = bright_star_mask(pd.read_parquet(catalog_path), mag_limit)
    write_parquet(stars, stars_out)
    log.info("%d catalog stars brighter than r = %.1f masked in the search", len(stars), mag_limit)


#: Most partial rows combine_chunk holds at once (about 220 bytes each while combining): a chunk
#: range's orbits are combined in blocks of whole orbits, so its memory does not grow with the
#: range (results do not change: every orbit is combined from all of its rows, in the same order).
COMBINE_BLOCK_ROWS = 2_000_000


def combine_stage(partials_paths, images_path, stars_path, combined_out, candidates_out, *,
                  sigma_g_clip: float | None, snr_threshold: float, min_images: int, star_mask_radius_arcsec: float,
                  log: logging.Logger, research: dict | None = None, block_rows: int = COMBINE_BLOCK_ROWS) -> None:
    """``combine_chunk``: per-orbit combined SNR, and the partial sums of the detections.

    Reduced partials (per-orbit sums, written by searches without clipping) are added up; the
    per-image rows of the orbits that pass are then searched again (``research``: the keyword
    arguments of ``candidate_partials`` less the orbit ids), the same computation on those
    orbits alone, so that the candidates are the rows an unreduced search would have kept."""
    paths = list(partials_paths)
    reduced = _reduced_kind(paths)
    if reduced and sigma_g_clip is not None:
        raise ValueError(f"{paths[0]}: per-orbit sums cannot be sigma-G clipped (search.sigma_g_clip: "
                         f"{sigma_g_clip}); rerun search_shard with per-image partials")
    if reduced and research is None:
        raise ValueError(f"{paths[0]}: reduced partials need the search inputs to rebuild the detections' "
                         "per-image rows (research)")
    images = None if reduced else pd.read_parquet(images_path)
    stars = pd.read_parquet(stars_path) if stars_path and not reduced else None
    combined, candidates, n_masked = [], [], 0
    blocks = _orbit_blocks(paths, block_rows)
    for lo, hi in blocks:
        rows = _read_orbits(paths, lo, hi)
        if reduced:
            part = combine_sums(rows)
        else:
            masked = star_mask_hits(rows, images, stars, star_mask_radius_arcsec)
            part, n_masked = combine_partials(rows, n_sigma_g=sigma_g_clip, masked=masked), n_masked + int(masked.sum())
            candidates.append(rows[rows["orbit_id"].isin(part.loc[is_detection(part, snr_threshold, min_images),
                                                                  "orbit_id"])])
        combined.append(part)
    combined = pd.concat(combined, ignore_index=True) if combined else combine_partials(_read_orbits(paths, 0, -1))
    hit = combined[is_detection(combined, snr_threshold, min_images)]
    if reduced:
        candidates = candidate_partials(hit["orbit_id"].to_numpy(np.int64), log=log, **research)
    else:
        candidates = pd.concat(candidates, ignore_index=True) if candidates else _read_orbits(paths, 0, -1)
    write_parquet(combined, combined_out)
    write_parquet(candidates, candidates_out)
    masked_note = "star mask applied in the search jobs" if reduced else f"{n_masked} masked intersections"
    log.info("%d orbits with intersections in %d block(s), %s, %d above SNR %.1f", len(combined), len(blocks),
             masked_note, len(hit), snr_threshold)


def _orbit_blocks(paths, block_rows: int) -> list[tuple[int, int]]:
    """Orbit id intervals [lo, hi] of whole orbits with at most ``block_rows`` rows each (one
    orbit with more rows is a block of its own); read from the orbit_id column alone."""
    import pyarrow.parquet as pq

    ids = [pq.read_table(p, columns=["orbit_id"])["orbit_id"].to_numpy() for p in paths]
    orbit_ids, counts = np.unique(np.concatenate(ids) if ids else np.zeros(0, np.int64), return_counts=True)
    blocks, first, rows = [], 0, 0
    for k, n in enumerate(counts):
        if rows and rows + n > block_rows:
            blocks.append((int(orbit_ids[first]), int(orbit_ids[k - 1])))
            first, rows = k, 0
        rows += n
    if len(orbit_ids):
        blocks.append((int(orbit_ids[first]), int(orbit_ids[-1])))
    return blocks


def _read_orbits(paths, lo: int, hi: int) -> pd.DataFrame:
    """The rows of orbits lo..hi of every file, file by file in order (rows stay in file order)."""
    filters = [("orbit_id", ">=", lo), ("orbit_id", "<=", hi)]
    return pd.concat([pd.read_parquet(p, filters=filters) for p in paths], ignore_index=True)


def _reduced_kind(paths) -> bool:
    """Whether the partials are per-orbit sums (all of them) or per-image rows (all of them)."""
    import pyarrow.parquet as pq

    kinds = ["image_id" not in pq.read_schema(p).names for p in paths]
    if len(set(kinds)) > 1:
        mixed = paths[kinds.index(not kinds[0])]
        raise ValueError(f"{mixed}: per-orbit sums and per-image partials mixed in one combination (search."
                         "sigma_g_clip changed between search jobs?); rerun search_shard")
    return bool(kinds and kinds[0])


def candidate_partials(orbit_ids, *, images_path, cache_paths, listed_path, plan_path, image_kind: str,
                       smoothing_sigma_px: float, max_batch_mb: int, without_zero_point: str, log: logging.Logger,
                       staging_dir=None) -> pd.DataFrame:
    """Per-image partials of the given orbits on every partition (``cache_paths[p]`` for p)."""
    plan, listed = _read_plan(plan_path), pd.read_parquet(listed_path)
    searched = _shard_images(images_path, image_kind, without_zero_point, log)
    ids = np.sort(np.asarray(orbit_ids, np.int64))
    parts = [_search_partition(plan, listed, ids, searched[searched["partition"] == p], cache,
                               smoothing_sigma_px=smoothing_sigma_px, max_batch_mb=max_batch_mb,
                               staging_dir=staging_dir, log=log)
             for p, cache in enumerate(cache_paths)]
    out = pd.concat(parts, ignore_index=True)
    return out.sort_values(["orbit_id", "image_id"], kind="stable").reset_index(drop=True)


def _candidates_of(combined_paths) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(str(p).replace(".parquet", "_candidates.parquet")) for p in combined_paths],
                     ignore_index=True)


def merge_stage(combined_paths, images_path, listed_path, plan_path, cache_paths, *, detections_out, ecsv_out,
                light_curves_out, all_orbits_out, plots_dir, snr_threshold: float, min_images: int,
                log: logging.Logger, stars_path=None, smoothing_sigma_px: float = 0.0, sigma_g_clip: float = 3.0,
                star_mask_radius_arcsec: float = 4.0, refined_snr_threshold: float | None = None,
                max_noise_detections: float | None = None) -> pd.DataFrame:
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
                              else refined_snr_threshold, min_images=min_images, log=log,
                              snr_sd=_noise_sd(combined), max_noise_detections=max_noise_detections)
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


def _noise_sd(combined: pd.DataFrame) -> float:
    """The combined SNR's noise spread (sigma-G clipping widens it a little), at least 1."""
    return max(robust_snr_sd(combined["snr"]), 1.0) if len(combined) >= 4 else 1.0


def refined_threshold(plan: dict, refined_snr_threshold: float, snr_sd: float, max_noise_detections, log) -> float:
    """The refined SNR a detection needs: the configured one, raised where the regions' SNR field
    would give more than ``max_noise_detections`` noise peaks above it; the log says how many
    noise detections to expect and how many independent trials the covering amounts to."""
    n_trials = sum(r["n_trials"] for r in plan["regions"])
    curvatures = [r["lipschitz_killing"] for r in plan["regions"] if "lipschitz_killing" in r]
    if len(curvatures) < len(plan["regions"]):  # a plan written before the curvatures were
        log.info("region search: %d trial orbits; expected noise detections above SNR %.1f at most %.2g (each trial "
                 "independent: an upper bound)", n_trials, refined_snr_threshold,
                 expected_false_alarms(n_trials, refined_snr_threshold, snr_sd))
        return refined_snr_threshold
    lk = np.sum([np.pad(c, (0, 7 - len(c))) for c in curvatures], axis=0)
    threshold = refined_snr_threshold
    if max_noise_detections is not None:
        needed = threshold_for_noise_peaks(lk, max_noise_detections, snr_sd)
        if needed > threshold:
            log.info("region search: refined SNR threshold raised from %.2f to %.2f for at most %.3g expected noise "
                     "detections (search.max_noise_detections)", threshold, needed, max_noise_detections)
            threshold = needed
    expected = expected_noise_peaks(lk, threshold, snr_sd)
    tail = gaussian_tail(threshold / snr_sd)
    log.info("region search: %d trial orbits; expected noise detections above refined SNR %.2f: %.3g (the Euler "
             "characteristic of the SNR field's excursion set over the regions, noise sd %.3f), as many as %.3g "
             "independent trials would give; counting each trial as independent would expect %.3g", n_trials,
             threshold, expected, snr_sd, expected / tail if tail > 0 else float("inf"), n_trials * tail)
    return threshold


def _refined(det, candidates, images, caches, stars_path, plan, *, smoothing_sigma_px, sigma_g_clip,
             star_mask_radius_arcsec, refined_snr_threshold, min_images, log, snr_sd=1.0, max_noise_detections=None):
    """Refined detections of a region search and the tracks they follow (kept images only)."""
    from .refinement import refine_detections

    stars = pd.read_parquet(stars_path) if stars_path else None
    masked = star_mask_hits(candidates, images, stars, star_mask_radius_arcsec)
    refined_snr_threshold = refined_threshold(plan, refined_snr_threshold, snr_sd, max_noise_detections, log)
    refined, track, slices = refine_detections(det, candidates, images, caches, masked=masked, n_sigma_g=sigma_g_clip,
                                       smoothing_px=smoothing_sigma_px, match_px=duplicate_match_px(images),
                                       refined_snr_threshold=refined_snr_threshold, min_images=min_images, log=log)
    if refined.empty:
        return det.iloc[:0], candidates.iloc[:0], {}
    return refined, track[track["kept"]].drop(columns="kept"), slices


RECOVERED_COLUMNS = ["orbit_id", "name", "expected_combined_snr", "detected", "detection_orbit_id"]


def report_stage(all_orbits_path, detections_path, listed_path, plan_path, truth_paths, tracks_path, *,
                 histogram_out, completeness_out, grid_out, recovered_out, snr_threshold: float,
                 log: logging.Logger, summary_out=None, images_path=None, rejected_path=None,
                 catalog_path=None, experiment: str = "") -> pd.DataFrame:
    """``search_report``: SNR histogram, SNR along the listed grid, completeness against the
    simulated truth (when there is one), and the run's summary page (``summary_out``).

    ``tracks_path``: the detections' light curves (``merge_detections``), whose positions are
    the tracks the detections follow (refined ones in a region search); a detection recovers
    the injected object whose positions those tracks meet."""
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
        from astropy.table import Table

        # The detection's own track, not its trial orbit's: refinement may climb far from the trial.
        tracks = Table.read(tracks_path, format="ascii.ecsv").to_pandas()[["orbit_id", "image_id", "x", "y"]]
        det["truth_orbit_id"] = match_truth(det, inj[["orbit_id", "image_id", "x", "y"]], tracks,
                                            duplicate_match_px(images))
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
