"""The survey stage: index the images, cut them into partitions, build the tile caches.

Each function is one rule's work: it reads files, writes files (atomically) and logs.
"""
from __future__ import annotations

import logging

import pandas as pd

from ..core.io import IMAGES, write_parquet
from .cache import write_tile_cache
from .index import index_survey
from .partitions import assign_partitions
from .pixels import aux_of, read_pixels

IMAGE_KINDS = ("science", "difference")


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
                log: logging.Logger) -> pd.DataFrame:
    """``index_survey``: images.parquet (with partitions) and rejected_images.parquet."""
    log.info("indexing %d files (on_bad_image=%s)", len(paths), on_bad_image)
    images, rejected = index_survey(paths, site=site, on_bad_image=on_bad_image, progress=log.info)
    images["partition"] = assign_partitions(images, n_partitions)
    write_parquet(rejected, rejected_out)
    write_parquet(images, images_out, schema=IMAGES)
    for _, r in rejected.iterrows():
        log.warning("left out %s [HDU %d]: %s", r["path"], r["hdu"], r["reason"])
    counts = images.groupby("partition").size().to_dict()
    log.info("indexed %d image HDUs (%d difference) into %d partitions %s; %d left out",
             len(images), int(images["is_difference"].sum()), n_partitions, counts, len(rejected))
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
