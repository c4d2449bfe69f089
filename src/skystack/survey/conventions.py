"""Instrument header conventions as data: which keywords give time, band, zero point, gain,
PSF width and site, and which files are weight maps or masks rather than images.

The table is ``conventions.yaml`` beside this module (its header documents every field);
the config's ``survey.conventions`` adds entries (tried first) with the same fields and
``survey.sites`` adds sites. The ``generic`` entry is the fallback and the default of
every field an entry leaves out. This module also merges a primary header into an
extension's (``INHERIT = T``), reads each quantity by the convention's rules, normalises
band names, and reads legacypipe survey-ccds tables for zero points.
"""
from __future__ import annotations

import fnmatch
import functools
import math
import re
from pathlib import Path

import numpy as np
from astropy.io import fits

TABLE_PATH = Path(__file__).with_name("conventions.yaml")

#: Every field a convention entry may have (see conventions.yaml).
FIELDS = frozenset({
    "name", "match", "refuse", "time_mid", "time_start", "time_of_day", "exptime", "timesys", "timesys_force",
    "band_keys", "band_map", "band_required", "zeropoint", "ccd_table_zpt", "pixel_unit", "gain", "psf",
    "expid", "ccd", "site", "lon_conventions", "site_tolerance_km", "aux_markers", "aux_files", "mask_bits",
    "mask_bad_planes", "psfex", "calib_table",
})
AUX_KINDS = ("WEIGHT", "INVVAR", "VARIANCE", "MASK")


class ConventionError(ValueError):
    """A header value that the convention cannot turn into a usable quantity."""


# ----------------------------------------------------------------------------- the table
def _check_entry(entry: dict, where: str) -> dict:
    if not isinstance(entry, dict) or "name" not in entry:
        raise ValueError(f"{where}: a convention entry must be a mapping with a name, got {entry!r}")
    unknown = sorted(set(entry) - FIELDS)
    if unknown:
        raise ValueError(f"{where}: convention {entry['name']!r} has unknown field(s) {', '.join(unknown)} "
                         f"(known: {', '.join(sorted(FIELDS))})")
    for kind in entry.get("aux_markers", {}) or {}:
        if kind not in AUX_KINDS:
            raise ValueError(f"{where}: convention {entry['name']!r}: aux kind {kind!r} is not one of {AUX_KINDS}")
    for rule in entry.get("aux_files", []) or []:
        if rule.get("kind") not in AUX_KINDS or "pattern" not in rule or "replace" not in rule:
            raise ValueError(f"{where}: convention {entry['name']!r}: aux_files entries need kind {AUX_KINDS}, "
                             f"pattern and replace, got {rule!r}")
    return entry


@functools.lru_cache(maxsize=1)
def builtin_conventions() -> tuple[dict, ...]:
    """The entries of conventions.yaml, in order (generic last)."""
    import yaml

    data = yaml.safe_load(TABLE_PATH.read_text())
    entries = tuple(_check_entry(e, str(TABLE_PATH)) for e in data["conventions"])
    if entries[-1]["name"] != "generic":
        raise ValueError(f"{TABLE_PATH}: the last entry must be 'generic'")
    return entries


def load_conventions(extra=None) -> list[dict]:
    """The conventions to use: ``extra`` (config ``survey.conventions``) first, then the
    table; each entry completed with the generic entry's fields."""
    table = builtin_conventions()
    generic = table[-1]
    out = []
    for i, entry in enumerate(list(extra or []) + list(table)):
        entry = _check_entry(dict(entry), f"survey.conventions[{i}]" if i < len(extra or []) else str(TABLE_PATH))
        out.append({**generic, "match": [{}], **{k: v for k, v in entry.items() if v is not None or k == "site"}})
    return out


def _value(hdr, key):
    try:
        return hdr.get(key)
    except (KeyError, ValueError, IndexError):  # an unparseable card reads as absent
        return None


def _matches(alt: dict, hdr, path) -> bool:
    for key, pattern in alt.items():
        pattern = str(pattern).strip().lower()
        if key == "_name":
            if not fnmatch.fnmatchcase(Path(path).name.lower(), pattern):
                return False
            continue
        value = _value(hdr, key)
        if value is None:
            return False
        if not fnmatch.fnmatchcase(str(value).strip().lower(), pattern):
            return False
    return True


def find_convention(hdr, path, conventions) -> dict:
    """The first convention whose ``match`` fits the header (the generic one at worst)."""
    for conv in conventions:
        if any(_matches(alt or {}, hdr, path) for alt in conv.get("match") or [{}]):
            return conv
    return conventions[-1]


def refusal(conv: dict, hdr) -> str | None:
    """The convention's refusal reason with {KEYWORD} filled in, or None."""
    text = conv.get("refuse")
    if not text:
        return None

    def fill(m):
        value = _value(hdr, m.group(1))
        return "?" if value is None else str(value).strip()

    return "not a survey image: " + " ".join(re.sub(r"\{([A-Za-z0-9_.\-]+)\}", fill, str(text)).split())


# ----------------------------------------------------------------------------- headers
_STRUCTURAL = re.compile(
    r"^(SIMPLE|XTENSION|BITPIX|NAXIS\d*|EXTEND|PCOUNT|GCOUNT|BZERO|BSCALE|BLANK|CHECKSUM|DATASUM|EXTNAME|EXTVER|"
    r"EXTLEVEL|EXTTYPE|INHERIT|TFIELDS|THEAP|TTYPE\d+|TFORM\d+|TUNIT\d+|TDIM\d+|COMMENT|HISTORY|"
    r"Z(BITPIX|NAXIS\d*|TILE\d+|CMPTYPE|NAME\d+|VAL\d+|QUANTIZ|DITHER0|SIMPLE|EXTEND|BLOCKED|TENSION|PCOUNT|"
    r"GCOUNT|HECKSUM|DATASUM|IMAGE|MASKCMP|BLANK|SCALE|ZERO))$")
#: WCS keywords stay with their HDU: a primary's WCS (90Prime pre-CP: RA/Dec swapped) must
#: never leak into an extension's.
_WCS = re.compile(
    r"^(WCSAXES|WCSNAME|CTYPE|CRVAL|CRPIX|CDELT|CROTA|CUNIT|CD\d_\d|PC\d_\d|PC0\d+|PV\d+_\d+|PS\d+_\d+|"
    r"[AB]P?_(ORDER|\d+_\d+|DMAX)|LONPOLE|LATPOLE|RADESYS|RADECSYS|EQUINOX|EPOCH|LTV\d|LTM\d_\d|DC-FLAG|"
    r"WAT\d_\d+|WCSDIM|PROJP\d)\d*[A-Z]?$")


def _is_inherit(hdr) -> bool:
    value = _value(hdr, "INHERIT")
    return value is True or str(value).strip().upper() in ("T", "TRUE")


@functools.lru_cache(maxsize=1)
def _shared_keys() -> frozenset:
    """Keywords of time, site, band and instrument identity: taken from the primary even
    without INHERIT when the extension lacks them."""
    from .sites import SITE_KEYWORDS

    keys = {"TELESCOP", "INSTRUME", "OBSERVAT", "ORIGIN", "TIMESYS", "EXPTIME", "PRODTYPE", "PROCTYPE", "OBSTYPE",
            "OBSGEO-X", "OBSGEO-Y", "OBSGEO-Z", "OBSGEO-L", "OBSGEO-B", "OBSGEO-H"}
    for _, klat, klon, kh in SITE_KEYWORDS:
        keys.update((klat, klon, *kh))
    for conv in builtin_conventions():
        for field in ("time_mid", "time_start", "time_of_day", "exptime", "band_keys"):
            keys.update(conv.get(field) or [])
        for alt in conv.get("match") or []:
            keys.update(k for k in (alt or {}) if k != "_name")
    return frozenset(k.upper() for k in keys)


def merged_header(hdul, hdu: int) -> fits.Header:
    """The header of image HDU ``hdu`` with the primary's cards it lacks added.

    All non-structural, non-WCS primary cards are inherited when the extension says
    ``INHERIT = T`` or the primary holds no data (the DECam/NOIRLab Community Pipeline
    layout); otherwise only the time, site, band and identity keywords. Extension cards
    always win.
    """
    ext = hdul[hdu].header
    if hdu == 0:
        return ext.copy()
    primary = hdul[0].header
    full = _is_inherit(ext) or int(primary.get("NAXIS", 0) or 0) == 0
    shared = _shared_keys()
    out = ext.copy()
    present = {k.upper() for k in ext}
    for card in primary.cards:
        key = card.keyword.upper()
        if not key or key in present or _STRUCTURAL.match(key) or _WCS.match(key):
            continue
        if full or key in shared:
            try:
                out.append(card, end=True)
            except (ValueError, fits.VerifyError):  # an unparseable card in the primary: leave it
                pass
    return out


# ----------------------------------------------------------------------------- time
_TIMESYS = {"utc": "utc", "utc approximate": "utc", "ut": "utc", "gmt": "utc", "tai": "tai", "tt": "tt", "tdt": "tt"}
_DATE_ONLY = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def _float(value, key):
    try:
        out = float(str(value).strip()) if isinstance(value, str) else float(value)
    except (TypeError, ValueError) as err:
        raise ConventionError(f"{key} = {value!r} is not a number") from err
    return out


def exposure_time(hdr, conv) -> tuple[float | None, str]:
    """(EXPTIME in seconds or None, the keyword)."""
    for key in conv.get("exptime") or []:
        value = _value(hdr, key)
        if value is not None:
            return _float(value, key), key
    return None, ""


def time_scale(hdr, conv) -> str:
    if conv.get("timesys_force"):
        return str(conv["timesys_force"]).lower()
    raw = _value(hdr, "TIMESYS")
    if raw is None:
        return str(conv.get("timesys") or "utc").lower()
    scale = _TIMESYS.get(" ".join(str(raw).strip().lower().split()))
    if scale is None:
        raise ConventionError(f"unsupported TIMESYS {raw!r} (UTC, TAI or TT)")
    return scale


def _parse_time(value, key, scale, location):
    from astropy.time import Time

    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return Time(float(value), format="mjd", scale=scale, location=location), False
    text = str(value).strip()
    text = text.removesuffix("Z")
    if _DATE_ONLY.match(text):
        return text, True
    try:
        if re.match(r"^[+-]?\d+(\.\d*)?$", text):
            return Time(float(text), format="mjd", scale=scale, location=location), False
        return Time(text.replace(" ", "T"), format="isot", scale=scale, location=location), False
    except Exception as err:
        raise ConventionError(f"unparseable time keyword ({key} = {value!r}: {err})") from err


def _check_set(t, key, value):
    if abs(t.utc.mjd - 40587.0) < 1.0:  # 1970-01-01: the Unix epoch, what unset times become
        raise ConventionError(f"time keyword {key} = {str(value).strip()!r} is the Unix epoch (an unset value)")


def mid_exposure_time(hdr, conv, location=None):
    """Mid-exposure astropy Time and how it was found.

    Raises ConventionError naming the keyword: no time keyword, unparseable, a date
    without a time of day, an unset (1970) value, or an unsupported TIMESYS.
    """
    from astropy import units as u
    from astropy.time import Time

    scale = time_scale(hdr, conv)
    exptime, exp_key = exposure_time(hdr, conv)
    for key in conv.get("time_mid") or []:
        value = _value(hdr, key)
        if value is None or str(value).strip() == "":
            continue
        t, date_only = _parse_time(value, key, scale, location)
        if date_only:
            continue
        _check_set(t, key, value)
        return t, f"{key} (mid-exposure, {scale.upper()})"
    for key in conv.get("time_start") or []:
        value = _value(hdr, key)
        if value is None or str(value).strip() == "":
            continue
        t, date_only = _parse_time(value, key, scale, location)
        how = key
        if date_only:
            tod_key = next((k for k in conv.get("time_of_day") or [] if _value(hdr, k) is not None), None)
            if tod_key is None:
                raise ConventionError(f"{key} = {str(value).strip()!r} is a date without a time of day "
                                      f"(none of {', '.join(conv.get('time_of_day') or [])})")
            tod = str(hdr[tod_key]).strip()
            try:
                t = Time(f"{t}T{tod}", format="isot", scale=scale, location=location)
            except Exception as err:
                raise ConventionError(f"unparseable time keyword ({tod_key} = {tod!r}: {err})") from err
            how = f"{key} + {tod_key}"
        _check_set(t, key, value)
        half = (exptime or 0.0) / 2.0
        return t + half * u.s, f"{how} + {exp_key or 'EXPTIME'}/2 ({scale.upper()})"
    keys = list(conv.get("time_mid") or []) + list(conv.get("time_start") or [])
    raise ConventionError(f"no time keyword ({', '.join(keys)})")


# ----------------------------------------------------------------------------- band
#: Broad photometric bands the index knows (lower case); a convention's band_map adds more.
KNOWN_BANDS = ("u", "g", "r", "i", "z", "y", "w", "vr")
#: Filter values that are no photometric band, with the reason.
NOT_A_BAND = {
    "rggb": "a Bayer colour-filter mosaic (raw one-shot-colour camera), not one photometric band",
    "bggr": "a Bayer colour-filter mosaic (raw one-shot-colour camera), not one photometric band",
    "grbg": "a Bayer colour-filter mosaic (raw one-shot-colour camera), not one photometric band",
    "gbrg": "a Bayer colour-filter mosaic (raw one-shot-colour camera), not one photometric band",
    "_unknown_": "the LSST Science Pipelines' value for an unset filter",
    "unknown": "no filter recorded",
    "open": "no filter (open)", "clear": "no filter (clear)", "none": "no filter", "dark": "a dark frame",
    "blank": "a blanked filter wheel",
}
#: Spellings every convention understands (DECam, Bok, Mosaic3, ZTF, HSC, PS1).
COMMON_BAND_MAP = {"bokr": "r", "bokg": "g", "zd": "z", "ztf_g": "g", "ztf_r": "r", "ztf_i": "i",
                   "hsc-g": "g", "hsc-r": "r", "hsc-r2": "r", "hsc-i": "i", "hsc-i2": "i", "hsc-z": "z", "hsc-y": "y"}


def normalise_band(value, band_map: dict | None = None) -> str:
    """The band a filter keyword value names.

    'r DECam SDSS c0002 6415.0 1480.0' -> 'r', 'bokr' -> 'r', 'zd DECam k1038' -> 'z',
    'ZTF_r' -> 'r', 'z.00000' -> 'z', 'HSC-i' -> 'i', 'Y' -> 'y'. ``band_map`` (lower-case
    filter name or its first word -> band) is tried first. Raises ValueError with the reason
    for an empty, unknown or non-photometric value ('RGGB', '_unknown_', 'F200W', ...).
    """
    mapping = {**COMMON_BAND_MAP, **{str(k).lower(): v for k, v in (band_map or {}).items()}}
    text = " ".join(str(value).strip().split())
    if not text:
        raise ValueError("the filter keyword is empty")
    low = text.lower()
    first = low.split()[0]
    for cand in (low, first, re.sub(r"\.0+$", "", first)):
        if cand in mapping:
            if mapping[cand] is None or str(mapping[cand]).strip() == "":
                raise ValueError(f"filter {text!r} is mapped to no band by the convention")
            return str(mapping[cand]).strip()
        if cand in NOT_A_BAND:
            raise ValueError(f"filter {text!r} is {NOT_A_BAND[cand]}")
    cand = re.sub(r"\.0+$", "", first)
    known = set(KNOWN_BANDS) | {str(v).lower() for v in mapping.values() if v}
    if cand in known:
        return cand
    raise ValueError(f"filter {text!r} is not a band skystack knows ({', '.join(KNOWN_BANDS)}; add a band_map "
                     "entry under survey.conventions for others)")


def read_band(hdr, conv) -> tuple[str, str]:
    """(band, keyword). A convention without ``band_required`` gives 'unknown' when no
    keyword is present; otherwise a ConventionError."""
    for key in conv.get("band_keys") or []:
        value = _value(hdr, key)
        if value is None:
            continue
        try:
            return normalise_band(value, conv.get("band_map")), key
        except ValueError as err:
            raise ConventionError(f"band: {key} = {str(value).strip()!r} is not usable ({err})") from err
    if conv.get("band_required"):
        raise ConventionError(f"band: none of {', '.join(conv.get('band_keys') or [])} in the header")
    return "unknown", ""


# ----------------------------------------------------------------------------- photometry
def per_second_pixels(hdr, conv) -> bool:
    """Whether the pixels are counts per second (``pixel_unit``; ``bunit``: BUNIT ends in /s)."""
    unit = str(conv.get("pixel_unit") or "bunit").lower()
    if unit == "bunit":
        return str(_value(hdr, "BUNIT") or "").strip().lower().replace(" ", "").endswith("/s")
    return unit in ("adu/s", "counts/s", "e-/s")


def _good(x) -> bool:
    return x is not None and math.isfinite(x)


def header_number(hdr, key: str) -> float | None:
    """The header value of ``key`` as a float (inf allowed), None when absent or blank; a
    ConventionError naming the keyword and value when it is not a number (text, NaN)."""
    value = _value(hdr, key)
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    v = _float(value, key)
    if math.isnan(v) or isinstance(value, bool):
        raise ConventionError(f"{key} = {value!r} is not a number")
    return v


def _not_a_number(hdr, key: str) -> str | None:
    """'KEY = value' when ``key`` is present with a value that is not a number, else None."""
    if not key:
        return None
    try:
        header_number(hdr, key)
    except ConventionError as err:
        return str(err).removesuffix(" is not a number")
    return None


def _finite_number(hdr, key: str) -> float | None:
    """The header value of ``key`` as a finite number, or None (absent, not a number, NaN, inf):
    a rule whose keyword says nothing usable gives way to the next rule."""
    value = _value(hdr, key)
    if value is None:
        return None
    try:
        v = _float(value, key)
    except ConventionError:
        return None
    return v if math.isfinite(v) else None


def read_zeropoint(hdr, conv, exptime: float | None) -> tuple[float, str]:
    """(AB zero point of the pixel values, how) or (NaN, '') when the header has none.

    A zero-point keyword whose value is not a number ('n/a') is a ConventionError naming it,
    unless a later rule gives a zero point: a NaN zero point is for a header that has none."""
    per_s = per_second_pixels(hdr, conv)
    garbled = []
    for rule in conv.get("zeropoint") or []:
        kind = rule.get("kind", "mag")
        if kind == "constant":
            return float(rule["value"]), f"constant {rule['value']} ({conv['name']} calibrated pixels)"
        v = _finite_number(hdr, rule.get("key", ""))
        if v is None:
            garbled += [t for t in [_not_a_number(hdr, rule.get("key", ""))] if t]
            continue
        if kind == "fluxmag0":
            if v <= 0:
                continue
            return 2.5 * math.log10(v), f"2.5 log10({rule['key']})"
        if kind == "mag_per_s":
            if per_s:
                return v, f"{rule['key']} (per second, pixels per second)"
            if not (exptime and exptime > 0):
                continue
            return v + 2.5 * math.log10(exptime), f"{rule['key']} + 2.5 log10(EXPTIME)"
        if kind == "mag":
            if v <= 0:
                continue
            return v, rule["key"]
        raise ValueError(f"convention {conv['name']!r}: unknown zeropoint kind {kind!r}")
    if garbled:
        raise ConventionError(f"zero point: {'; '.join(garbled)} is not a number")
    return float("nan"), ""


def read_gain(hdr, conv, exptime: float | None) -> tuple[float, str]:
    """(electrons per pixel unit, how); 1.0 when the header has no gain.

    Per-second pixels (``pixel_unit``) have gain x EXPTIME electrons per unit. A gain keyword
    whose value is not a number is a ConventionError naming it, unless another rule gives one."""
    gain, how, garbled = None, "", []
    for rule in conv.get("gain") or []:
        if isinstance(rule, dict):
            keys = rule.get("mean") or []
            vals = []
            for k in keys:
                v = _value(hdr, k)
                try:
                    vals.append(_float(v, k) if v is not None else float("nan"))
                except ConventionError:
                    vals.append(float("nan"))
            vals = [v for v in vals if math.isfinite(v) and v > 0]
            if vals:
                gain, how = float(np.mean(vals)), f"mean({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
                break
            continue
        v = _value(hdr, rule)
        if v is None:
            continue
        try:
            v = _float(v, rule)
        except ConventionError as err:
            garbled.append(str(err).removesuffix(" is not a number"))
            continue
        if math.isfinite(v) and v > 0:
            gain, how = v, rule
            break
    if gain is None and garbled:
        raise ConventionError(f"gain: {'; '.join(garbled)} is not a number")
    if gain is None:
        return 1.0, "none in the header (1.0 assumed)"
    if per_second_pixels(hdr, conv) and exptime and exptime > 0:
        return gain * exptime, f"{how} x EXPTIME (pixels per second)"
    return gain, how


def psf_fwhm_px(hdr, conv, pixscale_arcsec: float) -> tuple[float, str] | None:
    """(PSF FWHM in pixels, keyword) from the first usable PSF keyword, else None."""
    for rule in conv.get("psf") or []:
        v = _finite_number(hdr, rule["key"])
        if v is None or v <= 0:
            continue
        if rule.get("unit", "px") == "arcsec":
            return v / pixscale_arcsec, f"{rule['key']} (arcsec)"
        return v, f"{rule['key']} (px)"
    return None


def first_int(hdr, keys):
    for key in keys or []:
        value = _value(hdr, key)
        if value is None:
            continue
        try:
            return int(str(value).strip()) if isinstance(value, str) else int(value)
        except (TypeError, ValueError):
            continue
    return None


def mask_bits(mask_hdr, conv) -> int:
    """Bits of a mask marking bad pixels: from LSST-style MP_<plane> keywords for the
    convention's ``mask_bad_planes`` where the mask header has them, else ``mask_bits``."""
    bits = 0
    if mask_hdr is not None:
        for plane in conv.get("mask_bad_planes") or []:
            n = first_int(mask_hdr, [f"MP_{plane}"])
            if n is not None and 0 <= n < 63:
                bits |= 1 << n
    return bits if bits else int(conv.get("mask_bits", -1))


# ----------------------------------------------------------------------------- aux files
def aux_kind(path, hdr, conv) -> str | None:
    """The auxiliary kind (WEIGHT, VARIANCE, MASK, ...) of a whole file, by the
    convention's file-name markers and PRODTYPE values, else None (an image)."""
    name = Path(path).name
    prodtype = str(_value(hdr, "PRODTYPE") or "").strip().lower()
    for kind, markers in (conv.get("aux_markers") or {}).items():
        if any(re.search(p, name) for p in markers.get("name", []) or []):
            return kind
        if prodtype and prodtype in [str(v).lower() for v in markers.get("PRODTYPE", []) or []]:
            return kind
    return None


def sibling_aux_files(path, conv) -> dict[str, str]:
    """Existing auxiliary files of an image by the convention's naming rules:
    kind -> path (the first rule that names an existing file wins per kind)."""
    path = Path(path)
    out: dict[str, str] = {}
    for rule in conv.get("aux_files") or []:
        if rule["kind"] in out or not re.search(rule["pattern"], path.name):
            continue
        other = path.with_name(re.sub(rule["pattern"], rule["replace"], path.name, count=1))
        if other != path and other.is_file():
            out[rule["kind"]] = str(other)
    return out


def psfex_path(path, conv) -> str | None:
    """The PSFEx model of an image by the convention's ``psfex`` rules, if it exists."""
    posix = Path(path).as_posix()
    for rule in conv.get("psfex") or []:
        if re.search(rule["pattern"], posix):
            other = re.sub(rule["pattern"], rule["replace"], posix, count=1)
            if other != posix and Path(other).is_file():
                return other
    return None


def calib_table_values(path, hdr, conv, band: str) -> dict:
    """Per-band PSF FWHM (arcsec) and gain (e- per pixel unit) from the convention's
    ``calib_table`` companion file (SDSS psField), with the file; {} when there is none."""
    spec = conv.get("calib_table")
    if not spec or not re.search(spec["pattern"], Path(path).name):
        return {}
    other = Path(path).with_name(re.sub(spec["pattern"], spec["replace"], Path(path).name, count=1))
    bands = [str(b).lower() for b in spec.get("bands", [])]
    if not other.is_file() or band.lower() not in bands:
        return {}
    k = bands.index(band.lower())
    out = {"file": str(other)}
    with fits.open(other, memmap=False) as hdul:
        row = hdul[int(spec.get("hdu", 1))].data
        names = [c.lower() for c in row.columns.names]

        def value(col):
            if not col or col.lower() not in names:
                return None
            v = np.asarray(row[col][0], dtype=np.float64).ravel()
            return float(v[k]) if v.size > k and np.isfinite(v[k]) and v[k] > 0 else None

        fwhm = value(spec.get("psf_fwhm_arcsec"))
        if fwhm is not None:
            out["psf_fwhm_arcsec"] = fwhm
        gain = value(spec.get("gain"))
        if gain is not None:
            scale_key = spec.get("gain_per_unit_key")
            scale = _value(hdr, scale_key) if scale_key else 1.0
            try:
                scale = _float(scale, scale_key) if scale is not None else None
            except ConventionError:
                scale = None
            if scale and scale > 0:
                out["gain"] = gain / scale
                out["gain_how"] = f"{other.name} {spec.get('gain')}[{band}]" + (f" / {scale_key}" if scale_key else "")
    return out


# ----------------------------------------------------------------------------- CCD tables
class CcdTables:
    """Zero points from legacypipe survey-ccds tables (``survey.ccd_tables``).

    Rows are found by ``image_filename`` (a path that the image's path ends with; the file
    name alone when that is unique) and ``image_hdu`` or ``ccdname`` (= EXTNAME).
    """

    def __init__(self, paths=()):
        self.paths = [str(p) for p in paths or []]
        self.rows: dict[str, list[dict]] = {}
        for p in self.paths:
            for row in self._read(p):
                self.rows.setdefault(Path(row["image_filename"]).name, []).append(row)

    @staticmethod
    def _read(path):
        from astropy.table import Table

        with fits.open(path, memmap=False) as hdul:
            for hdu in hdul:
                if isinstance(hdu, fits.BinTableHDU) and "image_filename" in [c.lower() for c in hdu.columns.names]:
                    t = Table(hdu.data)
                    break
            else:
                raise ValueError(f"survey.ccd_tables: {path} has no table with an image_filename column")
        cols = {c.lower(): c for c in t.colnames}
        out = []
        for r in t:
            def get(name, default=None, r=r):
                value = r[cols[name]] if name in cols else default
                return value.decode() if isinstance(value, bytes) else value
            zpt = get("ccdzpt", get("zpt"))
            out.append({"table": str(path), "image_filename": str(get("image_filename")).strip(),
                        "image_hdu": None if get("image_hdu") is None else int(get("image_hdu")),
                        "ccdname": str(get("ccdname", "")).strip(), "zpt": float(zpt) if zpt is not None else np.nan,
                        "zpt_col": "ccdzpt" if "ccdzpt" in cols else "zpt",
                        "exptime": float(get("exptime", np.nan))})
        return out

    def __bool__(self):
        return bool(self.rows)

    def lookup(self, path, hdu: int, extname: str) -> dict | None:
        rows = self.rows.get(Path(path).name, [])
        rows = [r for r in rows if (r["image_hdu"] == hdu) or (extname and r["ccdname"].lower() == extname.lower())]
        if not rows:
            return None
        norm = str(Path(path)).replace("\\", "/")
        exact = [r for r in rows if norm.endswith("/" + r["image_filename"].lstrip("/")) or norm == r["image_filename"]]
        if exact:
            return exact[0]
        return rows[0] if len(rows) == 1 else None


def ccd_table_zeropoint(row: dict, hdr, conv, exptime) -> tuple[float, str]:
    """The zero point of the pixel values from a survey-ccds row."""
    zpt = row["zpt"]
    if not math.isfinite(zpt) or zpt <= 0:
        return float("nan"), ""
    where = f"{Path(row['table']).name} {row['zpt_col']}"
    if str(conv.get("ccd_table_zpt", "per_second")) == "as_is" or per_second_pixels(hdr, conv):
        return zpt, where
    t = exptime if exptime and exptime > 0 else row["exptime"]
    if not (t and t > 0):
        return float("nan"), ""
    return zpt + 2.5 * math.log10(t), f"{where} + 2.5 log10(EXPTIME)"
