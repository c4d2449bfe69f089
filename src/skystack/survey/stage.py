"""The survey stage: index the images, cut them into partitions, build the tile caches.

Each function is one rule's work: it reads files, writes files (atomically) and logs.
"""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from ..core.io import IMAGES, write_parquet
from .cache import write_tile_cache
from .index import NoUsableImageError, index_survey, reason_counts
from .partitions import assign_partitions
from .pixels import aux_of, read_pixels

IMAGE_KINDS = ("science", "difference")
#: ``search.without_zero_point``: what the search does with images that have no zero point.
ZERO_POINT_POLICIES = ("leave_out", "adu")


def select_images(index: pd.DataFrame, kind: str, band: str | None = None) -> pd.DataFrame:
    """Index rows of one image type (``science`` or ``difference``), optionally of one band,
    in image_id order."""
    if kind not in IMAGE_KINDS:
        raise ValueError(f"image kind must be one of {', '.join(IMAGE_KINDS)}, got {kind!r}")
    keep = index["is_difference"].astype(bool) == (kind == "difference")
    if band is not None:
        keep &= index["band"] == band
    return index[keep].sort_values("image_id").reset_index(drop=True)


def index_stage(paths, images_out, rejected_out, *, site, on_bad_image: str, n_partitions: int,
                log: logging.Logger, sites=None, conventions=None, ccd_tables=None, refused=()) -> pd.DataFrame:
    """``index_survey``: images.parquet (with partitions) and rejected_images.parquet.

    rejected_images.parquet is written even when no image is usable, before the error.
    ``sites``, ``conventions``, ``ccd_tables``: the config's survey.sites,
    survey.conventions and survey.ccd_tables; ``refused``: (path, problem) of the matched
    survey paths that are no readable file (dangling links, link loops). More partitions than
    indexed images are refused: a partition holds one tile cache and a search job per chunk
    range, and an empty one is work for nothing.
    """
    log.info("indexing %d files (on_bad_image=%s, %d CCD table(s), %d extra convention(s), %d extra site(s))",
             len(paths), on_bad_image, len(ccd_tables or []), len(conventions or []), len(sites or {}))
    try:
        images, rejected = index_survey(paths, site=site, on_bad_image=on_bad_image, progress=log.info,
                                        sites=sites, conventions=conventions, ccd_tables=ccd_tables,
                                        refused=refused)
    except NoUsableImageError as err:
        write_parquet(err.rejected, rejected_out)
        for _, r in err.rejected.iterrows():
            log.warning("left out %s [HDU %d]: %s", r["path"], r["hdu"], r["reason"])
        log.error("%s", err)
        raise
    if n_partitions > len(images):
        message = (f"partitions: {n_partitions} is more than the {len(images)} indexed images (each partition "
                   f"is one tile cache and one search job per orbit chunk range); set partitions to at most "
                   f"{len(images)}")
        log.error("%s", message)
        raise ValueError(message)
    images["partition"] = assign_partitions(images, n_partitions)
    write_parquet(rejected, rejected_out)
    write_parquet(images, images_out, schema=IMAGES)
    for _, r in rejected.iterrows():
        log.warning("left out %s [HDU %d]: %s", r["path"], r["hdu"], r["reason"])
    no_zp = images[~np.isfinite(images["magzp"].to_numpy(dtype=float))]
    if len(no_zp):
        log.warning("%d image(s) have no zero point (magzp NaN: no header keyword, not in survey.ccd_tables); "
                    "stages that need photometry refuse them: %s", len(no_zp),
                    ", ".join(f"{p} [HDU {h}]" for p, h in zip(no_zp["path"][:5], no_zp["hdu"][:5]))
                    + (" ..." if len(no_zp) > 5 else ""))
    for conv, n in images["convention"].value_counts().items():
        log.info("convention %s: %d image HDU(s)", conv, n)
    counts = images.groupby("partition").size().to_dict()
    log.info("indexed %d image HDUs (%d difference) into %d partitions %s; %d left out%s",
             len(images), int(images["is_difference"].sum()), n_partitions, counts, len(rejected),
             f" ({reason_counts(rejected)})" if len(rejected) else "")
    return images


def cache_stage(images_path, partition: int, cache_out, *, tile_px: int, log: logging.Logger) -> None:
    """``build_tile_cache``: the tile cache of one partition."""
    images = pd.read_parquet(images_path)
    mine = images[images["partition"] == partition]
    log.info("partition %d: %d images, %d px tiles", partition, len(mine), tile_px)

    def pixels():
        for k, (_, row) in enumerate(mine.iterrows(), 1):
            yield int(row["image_id"]), read_pixels(row["path"], int(row["hdu"]), aux_of(row), row["saturate"])
            if k % 100 == 0:
                log.info("cached %d/%d images", k, len(mine))

    write_tile_cache(cache_out, pixels(), tile=tile_px)
    log.info("wrote %s", cache_out)


def with_zero_point(images: pd.DataFrame, where: str, log: logging.Logger | None = None,
                    without_zero_point: str = "leave_out") -> pd.DataFrame:
    """The images that have a zero point (finite ``magzp``), for the stages that measure fluxes.

    Photometry across images without one would mix ADU with nanomaggies (and weight images
    wrongly in the combined SNR), so they are left out with a warning, and a stage whose images
    all lack one is refused with the reason.

    ``without_zero_point`` (``search.without_zero_point``): ``leave_out`` as above; ``adu``:
    when *none* of the images has a zero point, all are kept and their fluxes stay in ADU
    (``counts_per_nmgy`` is 1 for a NaN zero point), so flux columns named ``*_nmgy`` then
    hold ADU. Each image's SNR does not depend on the zero point; the combined SNR weights
    images by their noise in ADU, which is right for images on one photometric scale (one
    camera, band and exposure time). When some images have a zero point the others are still
    left out: ADU and nanomaggies are never mixed.
    """
    if without_zero_point not in ZERO_POINT_POLICIES:
        raise ValueError(f"search.without_zero_point must be one of {', '.join(ZERO_POINT_POLICIES)}, "
                         f"got {without_zero_point!r}")
    ok = np.isfinite(images["magzp"].to_numpy(np.float64))
    if ok.all():
        return images
    missing = images.loc[~ok]
    if not ok.any():
        if without_zero_point == "adu":
            if log is not None:
                log.warning("%s: none of the %d images has a zero point; search.without_zero_point is 'adu', so all "
                            "are searched with fluxes in ADU per image (columns named *_nmgy hold ADU; the "
                            "combined SNR assumes one photometric scale across them)", where, len(images))
            return images
        raise ValueError(f"{where}: none of the {len(images)} images has a zero point (magzp is NaN, e.g. "
                         f"{missing['path'].iloc[0]}): give a zero-point keyword, a survey.conventions rule or "
                         f"survey.ccd_tables (or, for the search, search.without_zero_point: adu)")
    if log is not None:
        log.warning("%s: %d of %d images have no zero point and are left out (e.g. %s)", where, len(missing),
                    len(images), missing["path"].iloc[0])
    return images[ok].reset_index(drop=True)
