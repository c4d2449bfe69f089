"""Tiled image cache: float32 pixels in square tiles, one file per partition, memory-mapped.

File layout (little-endian), format version 2:

- 8 bytes magic ``SKYTILE2``; uint64 length L of a JSON index; uint32 CRC32 of the JSON
  and the checksum table; 4 zero bytes;
- L bytes of JSON: tile size, and per image its image_id, shape, tile grid and first tile;
- the checksum table: one uint32 CRC32 per tile;
- zero padding to a 4096-byte boundary;
- tiles, each ``tile x tile`` float32 in row-major order, images one after another, each
  image's tiles in row-major tile order. Pixels outside the image and bad pixels are NaN.

A patch read touches only the tiles it overlaps, which is what makes random patch reads
fast compared with row-major FITS, where a patch spans many rows of a large image.
``TileCache.open`` checks the file size and every tile's checksum (about 50 ms per 100 MB in
the page cache), so a damaged or truncated cache is refused, naming the file, instead of
giving wrong pixels.
"""
from __future__ import annotations

import hashlib
import json
import struct
import zlib
from pathlib import Path

import numpy as np

from ..core.io import atomic_path

MAGIC = b"SKYTILE2"
PREFIX = struct.Struct("<QI4x")  # JSON length, CRC32 of JSON + checksum table
ALIGN = 4096
VERIFY_CHUNK_BYTES = 16 << 20  # read this much at a time when checking tile checksums
REBUILD = "delete this file so that the workflow rebuilds it"
#: Patches gathered from the tiles at a time: keeps the (n, k, k) index arrays in cache.
GATHER_BATCH = 8192
#: The tiles under an image's patches are assembled into one row-major block (copies, about
#: 1 ns per block pixel) when the patches cover at least this many pixels per block pixel:
#: slicing an 11 x 11 patch from the block takes about 80 ns, gathering it pixel by pixel
#: from the tiles about 400 ns (2 cores), so the block pays for itself near 0.3.
_DENSE_PATCH_PIXELS_PER_PIXEL = 0.25


class CacheIntegrityError(ValueError):
    """A tile cache that is damaged, truncated or of another format version."""


def _tile_crcs(tiles_le: np.ndarray) -> list[int]:
    """CRC32 of each tile's little-endian bytes."""
    view = memoryview(np.ascontiguousarray(tiles_le)).cast("B")
    step = tiles_le[0].nbytes if len(tiles_le) else 1
    return [zlib.crc32(view[k:k + step]) for k in range(0, len(view), step)]


def _tile_grid(shape: tuple[int, int], tile: int) -> tuple[int, int]:
    ny, nx = shape
    return -(-ny // tile), -(-nx // tile)


def _to_tiles(pixels: np.ndarray, tile: int) -> np.ndarray:
    """Reorder an image into (n_tiles, tile, tile), NaN-padded to whole tiles."""
    ny, nx = pixels.shape
    nty, ntx = _tile_grid(pixels.shape, tile)
    padded = np.full((nty * tile, ntx * tile), np.nan, dtype=np.float32)
    padded[:ny, :nx] = pixels
    return padded.reshape(nty, tile, ntx, tile).transpose(0, 2, 1, 3).reshape(-1, tile, tile)


def write_tile_cache(path, images, tile: int = 32) -> None:
    """Write a tile cache atomically.

    Parameters
    ----------
    path : path-like
        Output file.
    images : iterable of (image_id, pixels)
        ``pixels`` a 2-D array (converted to float32; NaN marks bad pixels). Images are
        consumed one at a time, so memory holds one image, not the partition.
    tile : int
        Tile side in pixels.
    """
    entries, first_tile, crcs = [], 0, []
    with atomic_path(path) as tmp:
        body = tmp.with_name(tmp.name + ".body")
        try:
            with open(body, "wb") as fh:
                for image_id, pixels in images:
                    pixels = np.asarray(pixels, dtype=np.float32)
                    if pixels.ndim != 2:
                        raise ValueError(f"image {image_id}: expected 2-D pixels, got shape {pixels.shape}")
                    tiles = _to_tiles(pixels, tile)
                    nty, ntx = _tile_grid(pixels.shape, tile)
                    entries.append({"image_id": int(image_id), "ny": pixels.shape[0], "nx": pixels.shape[1],
                                    "nty": nty, "ntx": ntx, "first_tile": first_tile})
                    first_tile += len(tiles)
                    tiles_le = tiles.astype("<f4")
                    crcs += _tile_crcs(tiles_le)
                    fh.write(tiles_le.tobytes())
            header = json.dumps({"tile": tile, "n_tiles": first_tile, "images": entries}).encode()
            table = np.asarray(crcs, dtype="<u4").tobytes()
            with open(tmp, "wb") as out, open(body, "rb") as src:
                out.write(MAGIC + PREFIX.pack(len(header), zlib.crc32(header + table)) + header + table)
                out.write(b"\0" * (-out.tell() % ALIGN))
                while chunk := src.read(1 << 24):
                    out.write(chunk)
        finally:
            body.unlink(missing_ok=True)


def read_index(path) -> dict:
    """The index region of a cache: ``header`` (the JSON), ``crcs`` (uint32 per tile),
    ``data_offset`` (bytes) and ``digest`` (hex SHA-256 of the JSON and checksum table: it
    names the content, since any pixel change changes a checksum)."""
    path = Path(path)
    with open(path, "rb") as fh:
        magic = fh.read(8)
        if len(magic) < 8 and MAGIC.startswith(magic):
            raise CacheIntegrityError(f"{path}: tile cache is {len(magic)} bytes long, truncated; {REBUILD}")
        if magic != MAGIC:
            if magic[:7] == MAGIC[:7]:
                raise CacheIntegrityError(f"{path}: tile cache format version {magic[7:].decode(errors='replace')} "
                                          f"is not supported (this skystack writes {MAGIC[7:].decode()}, with "
                                          f"checksums); {REBUILD}")
            raise ValueError(f"{path}: not a skystack tile cache (bad magic {magic!r})")
        prefix = fh.read(PREFIX.size)
        if len(prefix) < PREFIX.size:
            raise CacheIntegrityError(f"{path}: tile cache truncated inside its header; {REBUILD}")
        length, index_crc = PREFIX.unpack(prefix)
        text = fh.read(length)
        try:
            header = json.loads(text)
            n = int(header["n_tiles"])
        except (ValueError, KeyError, TypeError) as err:
            raise CacheIntegrityError(f"{path}: tile cache index unreadable ({err}); {REBUILD}") from None
        table = fh.read(4 * n)
    if len(table) < 4 * n or zlib.crc32(text + table) != index_crc:
        raise CacheIntegrityError(f"{path}: tile cache index fails its checksum (damaged or truncated); {REBUILD}")
    offset = 8 + PREFIX.size + length + 4 * n
    return {"header": header, "crcs": np.frombuffer(table, dtype="<u4"), "data_offset": offset + -offset % ALIGN,
            "digest": hashlib.sha256(text + table).hexdigest()}


def _verify_tiles(path: Path, index: dict) -> None:
    """Compare every tile's CRC32 with the table; the error names the first bad tile."""
    t = int(index["header"]["tile"])
    tile_bytes, stored = t * t * 4, index["crcs"]
    per_read = max(1, VERIFY_CHUNK_BYTES // tile_bytes)
    bad = []  # (tile, computed CRC32)
    with open(path, "rb") as fh:
        fh.seek(index["data_offset"])
        for start in range(0, len(stored), per_read):
            block = fh.read(min(per_read, len(stored) - start) * tile_bytes)
            got = _tile_crcs(np.frombuffer(block, dtype="<f4").reshape(-1, t, t))
            bad += [(start + k, c) for k, c in enumerate(got) if c != stored[start + k]]
    if bad:
        k, got = bad[0]
        firsts = [e["first_tile"] for e in index["header"]["images"]]
        image = index["header"]["images"][int(np.searchsorted(firsts, k, side="right")) - 1]["image_id"]
        raise CacheIntegrityError(f"{path}: {len(bad)} of {len(stored)} tiles fail their checksum, first tile {k} "
                                  f"(image_id {image}): stored CRC32 {int(stored[k]):08x}, computed {got:08x}; "
                                  f"the file is damaged: {REBUILD}")


class TileCache:
    """A memory-mapped tile cache (see module docstring for the layout)."""

    def __init__(self, path, header: dict, tiles: np.ndarray):
        self.path = Path(path)
        self.tile = int(header["tile"])
        imgs = header["images"]
        self.image_ids = np.array([e["image_id"] for e in imgs], dtype=np.int64)
        self.shapes = np.array([[e["ny"], e["nx"]] for e in imgs], dtype=np.int64).reshape(-1, 2)
        self._ntx = np.array([e["ntx"] for e in imgs], dtype=np.int64)
        self._first = np.array([e["first_tile"] for e in imgs], dtype=np.int64)
        self._order = np.argsort(self.image_ids, kind="stable")
        self.tiles = tiles

    @classmethod
    def open(cls, path, verify: bool = True) -> TileCache:
        """Open a cache file read-only, memory-mapped, after checking its size and (``verify``)
        every tile's checksum; a CacheIntegrityError names the file and what is wrong."""
        path = Path(path)
        index = read_index(path)
        header, t, n = index["header"], int(index["header"]["tile"]), int(index["header"]["n_tiles"])
        expected = index["data_offset"] + n * t * t * 4
        actual = path.stat().st_size
        if actual != expected:
            raise CacheIntegrityError(f"{path}: tile cache is {actual} bytes, its index says {expected} "
                                      f"({n} tiles of {t}x{t} float32): truncated or damaged; {REBUILD}")
        if verify:
            _verify_tiles(path, index)
        tiles = np.memmap(path, dtype="<f4", mode="r", offset=index["data_offset"], shape=(n, t, t)) if n else np.zeros((0, t, t), np.float32)
        return cls(path, header, tiles)

    def __len__(self) -> int:
        return len(self.image_ids)

    def index_of(self, image_id) -> np.ndarray:
        """Positions in this cache of the given image ids; KeyError for an id not here."""
        image_id = np.asarray(image_id, dtype=np.int64)
        pos = np.searchsorted(self.image_ids, image_id, sorter=self._order)
        pos = np.clip(pos, 0, len(self.image_ids) - 1)
        idx = self._order[pos]
        missing = self.image_ids[idx] != image_id if len(self.image_ids) else np.ones(image_id.shape, bool)
        if np.any(missing):
            raise KeyError(f"{self.path}: image ids not in this cache: {np.unique(image_id[missing])[:10].tolist()}")
        return idx

    def image(self, image_id: int) -> np.ndarray:
        """A whole image as a 2-D float32 array."""
        i = int(self.index_of([image_id])[0])
        ny, nx = self.shapes[i]
        nty, ntx = _tile_grid((ny, nx), self.tile)
        block = np.asarray(self.tiles[self._first[i] : self._first[i] + nty * ntx])
        full = block.reshape(nty, ntx, self.tile, self.tile).transpose(0, 2, 1, 3).reshape(nty * self.tile, ntx * self.tile)
        return full[:ny, :nx].copy()

    def patches(self, image_id, x, y, radius: int, *, batch: int = GATHER_BATCH) -> np.ndarray:
        """Gather square patches centred on the pixels nearest to (x, y).

        Parameters
        ----------
        image_id : array of int
            ``image_id`` of each patch's image (must be in this cache).
        x, y : arrays of float
            Patch centres, 0-based pixel coordinates (astropy convention: pixel centres at
            integers). Each patch is centred on ``round(x), round(y)``.
        radius : int
            Half-size: patches are ``(2 radius + 1)`` square.
        batch : int
            Patches gathered at a time (bounds the index arrays; the pixels do not depend on it).

        Returns
        -------
        ndarray, shape (n, 2 radius + 1, 2 radius + 1), float32
            Pixels; NaN outside the image and at bad pixels.

        Where many patches fall close together on one image, the tiles under them are
        assembled once, row-major with a NaN border, and the patches are sliced from that
        block; the other patches are gathered pixel by pixel from the tiles (see
        ``_DENSE_PATCH_PIXELS_PER_PIXEL``). Both give the same pixels.
        """
        idx = self.index_of(np.atleast_1d(image_id))
        xc = np.floor(np.asarray(x, dtype=np.float64) + 0.5).astype(np.int64)
        yc = np.floor(np.asarray(y, dtype=np.float64) + 0.5).astype(np.int64)
        radius = int(radius)
        k = 2 * radius + 1
        out = np.empty((len(idx), k, k), np.float32)
        sparse = np.ones(len(idx), bool)
        for i, (ty, tx), rows in _dense_groups(idx, xc, yc, self.shapes, self.tile, radius):
            block = self._padded_block(i, ty, tx, radius)
            patches = _window_patches(block, xc[rows] - tx.start * self.tile, yc[rows] - ty.start * self.tile, k)
            if rows[-1] - rows[0] + 1 == len(rows):  # sorted by image (the search's order): a plain copy
                out[rows[0]:rows[-1] + 1] = patches
            else:
                out[rows] = patches
            sparse[rows] = False
        rest = np.flatnonzero(sparse)
        for start in range(0, len(rest), max(1, int(batch))):
            rows = rest[start:start + batch]
            out[rows] = self._tile_patches(idx[rows], xc[rows], yc[rows], radius)
        return out

    def _padded_block(self, i: int, ty: range, tx: range, radius: int) -> np.ndarray:
        """Tile rows ``ty`` x tile columns ``tx`` of the image at position ``i``, row-major,
        with a ``radius`` px NaN border (pixels past the image edge are NaN in the tiles)."""
        t = self.tile
        ids = self._first[i] + np.asarray(ty)[:, None] * self._ntx[i] + np.asarray(tx)[None, :]
        block = self.tiles[ids.reshape(-1)].reshape(len(ty), len(tx), t, t).transpose(0, 2, 1, 3)
        padded = np.full((len(ty) * t + 2 * radius, len(tx) * t + 2 * radius), np.nan, np.float32)
        padded[radius:radius + len(ty) * t, radius:radius + len(tx) * t] = block.reshape(len(ty) * t, len(tx) * t)
        return padded

    def _tile_patches(self, idx, xc, yc, radius: int) -> np.ndarray:
        """Patches of cache positions ``idx`` centred on pixels (xc, yc), gathered pixel by
        pixel from the tiles (NaN outside the image)."""
        off = np.arange(-radius, radius + 1, dtype=np.int64)
        px = xc[:, None] + off[None, :]  # (n, k) columns
        py = yc[:, None] + off[None, :]  # (n, k) rows
        inside_x = (px >= 0) & (px < self.shapes[idx, 1][:, None])
        inside_y = (py >= 0) & (py < self.shapes[idx, 0][:, None])
        px, py = np.where(inside_x, px, 0), np.where(inside_y, py, 0)
        t = self.tile
        # The flat offset separates into a row part and a column part, so the (n, k, k)
        # index is one broadcast add, as cheap as for a row-major array.
        col = (px // t) * (t * t) + px % t
        row = (py // t) * (self._ntx[idx][:, None] * t * t) + (py % t) * t + (self._first[idx] * (t * t))[:, None]
        values = self.tiles.reshape(-1)[row[:, :, None] + col[:, None, :]]
        if inside_x.all() and inside_y.all():
            return values
        inside = inside_y[:, :, None] & inside_x[:, None, :]
        return np.where(inside, values, np.float32(np.nan)).astype(np.float32, copy=False)


def _dense_groups(idx, xc, yc, shapes, tile: int, radius: int):
    """Per image whose patches lie close enough together to be sliced from one assembled
    block of tiles: (cache position, (tile rows, tile columns) of the block, patch rows).
    Only patches centred inside their image (all of the search's) are taken."""
    inside = (xc >= 0) & (xc < shapes[idx, 1]) & (yc >= 0) & (yc < shapes[idx, 0])
    rows = np.flatnonzero(inside)
    if len(rows) == 0:
        return
    rows = rows[np.argsort(idx[rows], kind="stable")]
    starts = np.r_[0, np.flatnonzero(np.diff(idx[rows])) + 1]
    image = idx[rows[starts]]
    ny, nx = shapes[image, 0], shapes[image, 1]
    # Tiles under the patches' bounding box, clipped to the image.
    ty0 = np.maximum(np.minimum.reduceat(yc[rows], starts) - radius, 0) // tile
    ty1 = np.minimum(np.maximum.reduceat(yc[rows], starts) + radius, ny - 1) // tile + 1
    tx0 = np.maximum(np.minimum.reduceat(xc[rows], starts) - radius, 0) // tile
    tx1 = np.minimum(np.maximum.reduceat(xc[rows], starts) + radius, nx - 1) // tile + 1
    count = np.diff(np.r_[starts, len(rows)])
    block_px = (ty1 - ty0) * (tx1 - tx0) * tile * tile
    dense = count * (2 * radius + 1) ** 2 >= _DENSE_PATCH_PIXELS_PER_PIXEL * block_px
    for g in np.flatnonzero(dense):
        yield (int(image[g]), (range(ty0[g], ty1[g]), range(tx0[g], tx1[g])),
               rows[starts[g]:starts[g] + count[g]])


def _window_patches(padded: np.ndarray, xc, yc, k: int) -> np.ndarray:
    """(k, k) windows of a block with a (k - 1) / 2 px NaN border, centred on the block's
    pixels (xc, yc) (0-based, border excluded)."""
    windows = np.lib.stride_tricks.sliding_window_view(padded, (k, k))
    return windows[yc, xc]
