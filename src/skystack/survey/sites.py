"""Observatory sites: the table of known sites and the reading of site keywords in headers.

A site is ``{"lat_deg", "lon_deg", "height_m"}`` (geodetic WGS84, east longitude, height
in metres). The table below is keyed by a short name; each site also lists the header
values (TELESCOP / OBSERVAT / INSTRUME) and MPC observatory codes that name it, so a
header, a convention entry or the config's ``survey.site`` can refer to it by any of them
(``W84`` is the Blanco 4 m with DECam). ``survey.sites`` in the config adds sites.

Header site keywords are read in every common spelling (``SITE_KEYWORDS``) and, where the
instrument's site is known, checked against the table under the longitude conventions the
instrument's convention allows (``lon_conventions``): NOIRLab DECam headers say
``OBS-LONG = 70.81489 / [deg] Observatory east longitude`` while CTIO is at 70.8 deg
*west*; KPNO and Steward write unsigned sexagesimal west longitudes ('111:36.0');
Pan-STARRS1 writes ``FPA.LONGITUDE`` in hours west. A header value that is further than
``tolerance_km`` from the known site under every allowed convention is refused with a
reason naming the keyword and the values.

Sources of the coordinates (geodetic; heights are elevations above sea level where that
is what the source gives, which is within ~50 m of the WGS84 height, far below the
few-km tolerance and the ~1e-9 AU it makes in a parallax):

- ctio-blanco: Victor M. Blanco 4 m, CTIO: 30 10 10.78 S, 70 48 23.49 W, 2207 m
  (CTIO/NOIRLab Blanco telescope page; MPC W84 "Cerro Tololo-DECam", 807 Cerro Tololo).
- kpno-mayall: Mayall 4 m, Kitt Peak: 31 57.8 N, 111 36.0 W, 2120 m (NOIRLab KPNO
  Mayall telescope page; MPC 695 Kitt Peak).
- kpno-bok: Bok 2.3 m (Steward Observatory), Kitt Peak: 31 57 46 N, 111 36 01 W, 2071 m
  (Steward Observatory Bok telescope page; MPC V00 "Kitt Peak-Bok").
- apo-sdss: SDSS 2.5 m, Apache Point: 32 46 49.30 N, 105 49 13.50 W, 2788 m (Gunn et al.
  2006, AJ 131, 2332; MPC 645 "Apache Point-Sloan Digital Sky Survey").
- haleakala-ps1: Pan-STARRS1, Haleakala: 20 42 25.6 N, 156 15 21.2 W, 3048 m (MPC F51
  "Pan-STARRS 1, Haleakala"; the PS1 headers' FPA.LATITUDE/LONGITUDE/ELEVATION agree).
- maunakea-subaru: Subaru 8.2 m, Mauna Kea: 19 49 31.8 N, 155 28 33.7 W, 4139 m (NAOJ
  Subaru Telescope "Telescope overview"; MPC T09 "Mauna Kea-Subaru").
- maunakea-cfht: CFHT 3.6 m, Mauna Kea: 19 49 30.9 N, 155 28 07.9 W, 4204 m (CFHT
  "Observatory facts"; MPC 568 Mauna Kea).
- rubin: Rubin Observatory (Simonyi Survey Telescope), Cerro Pachon: 30 14 40.68 S,
  70 44 57.90 W, 2663 m (Rubin LSE-30 / obs_lsst site; MPC X05).
- palomar-p48: Samuel Oschin 48-inch (ZTF), ``skystack.core.units.PALOMAR`` (MPC I41).
- la-silla: ESO La Silla: 29 15 24 S, 70 43 48 W, 2400 m (ESO "La Silla" page; MPC 809).
- paranal: ESO Paranal (VLT): 24 37 38 S, 70 24 15 W, 2635 m (ESO "Paranal" page; MPC 309).
- roque: Observatorio del Roque de los Muchachos, La Palma: 28 45 38 N, 17 53 30 W,
  2396 m (IAC ORM page; MPC 950).
- siding-spring: Siding Spring (AAT): 31 16 37 S, 149 04 00 E, 1164 m (AAO; MPC 413).
"""
from __future__ import annotations

import math
import re

from ..core.units import PALOMAR

#: Default distance (km) within which a header's site must agree with the known site.
SITE_TOLERANCE_KM = 5.0


def _site(lat, lon, height, names, mpc=()):
    return {"lat_deg": float(lat), "lon_deg": float(lon), "height_m": float(height),
            "names": tuple(names), "mpc": tuple(mpc)}


def _dms(d, m=0.0, s=0.0, sign=1):
    return sign * (abs(d) + m / 60.0 + s / 3600.0)


#: The known sites (see the module docstring for the sources).
SITES: dict[str, dict] = {
    "ctio-blanco": _site(_dms(30, 10, 10.78, -1), _dms(70, 48, 23.49, -1), 2207.0,
                         ["CTIO", "CTIO 4.0-m telescope", "Blanco", "Blanco 4m", "DECam", "Cerro Tololo"],
                         ["W84", "807"]),
    "kpno-mayall": _site(_dms(31, 57.8), _dms(111, 36.0, 0, -1), 2120.0,
                         ["KPNO", "KPNO 4.0 meter telescope", "Mayall", "Mosaic3", "Kitt Peak"], ["695"]),
    "kpno-bok": _site(_dms(31, 57, 46), _dms(111, 36, 1, -1), 2071.0,
                      ["Steward", "Steward 2.3 m (bok)", "Bok", "90prime"], ["V00"]),
    "apo-sdss": _site(_dms(32, 46, 49.30), _dms(105, 49, 13.50, -1), 2788.0,
                      ["SDSS", "APO", "Apache Point", "SDSS 2.5m"], ["645"]),
    "haleakala-ps1": _site(_dms(20, 42, 25.6), _dms(156, 15, 21.2, -1), 3048.0,
                           ["PS1", "GPC1", "Pan-STARRS1", "Haleakala"], ["F51"]),
    "maunakea-subaru": _site(_dms(19, 49, 31.8), _dms(155, 28, 33.7, -1), 4139.0,
                             ["Subaru", "NAOJ", "Hyper Suprime-Cam", "HSC", "Suprime-Cam"], ["T09"]),
    "maunakea-cfht": _site(_dms(19, 49, 30.9), _dms(155, 28, 7.9, -1), 4204.0,
                           ["CFHT", "CFHT 3.6m", "MegaPrime", "MegaCam", "Mauna Kea"], ["568"]),
    "rubin": _site(_dms(30, 14, 40.68, -1), _dms(70, 44, 57.90, -1), 2663.0,
                   ["LSST", "Rubin", "Simonyi", "LSSTCam", "Cerro Pachon"], ["X05"]),
    "palomar-p48": _site(PALOMAR["lat_deg"], PALOMAR["lon_deg"], PALOMAR["height_m"],
                         ["P48", "ZTF", "Palomar", "Samuel Oschin"], ["I41"]),
    "la-silla": _site(_dms(29, 15, 24, -1), _dms(70, 43, 48, -1), 2400.0,
                      ["La Silla", "ESO-LASILLA", "ESO La Silla"], ["809"]),
    "paranal": _site(_dms(24, 37, 38, -1), _dms(70, 24, 15, -1), 2635.0,
                     ["Paranal", "ESO-PARANAL", "ESO-VLT", "VLT", "VISTA", "VST"], ["309"]),
    "roque": _site(_dms(28, 45, 38), _dms(17, 53, 30, -1), 2396.0,
                   ["ORM", "La Palma", "Roque de los Muchachos", "INT", "WHT", "NOT"], ["950"]),
    "siding-spring": _site(_dms(31, 16, 37, -1), _dms(149, 4, 0), 1164.0,
                           ["Siding Spring", "SSO", "AAO", "AAT"], ["413"]),
}


class SiteError(ValueError):
    """A site problem, worded for a rejection reason."""


def site_table(extra: dict | None = None) -> dict[str, dict]:
    """The known sites plus ``extra`` (config ``survey.sites``: name -> lat_deg, lon_deg,
    height_m and optional ``names``/``mpc`` lists); an extra entry replaces a built-in one."""
    table = dict(SITES)
    for name, entry in (extra or {}).items():
        table[str(name)] = _site(entry["lat_deg"], entry["lon_deg"], entry["height_m"],
                                 [name, *entry.get("names", [])], entry.get("mpc", []))
    return table


def _norm(value) -> str:
    return " ".join(str(value).strip().lower().split())


def lookup_site(name, table: dict | None = None) -> tuple[str, dict] | None:
    """The (name, site) a table name, header value or MPC code refers to, else None."""
    table = SITES if table is None else table
    key = _norm(name)
    if not key:
        return None
    for site_name, site in table.items():
        if key == _norm(site_name) or key in (_norm(n) for n in site["names"]) or key in (_norm(c) for c in site["mpc"]):
            return site_name, site
    return None


def plain(site: dict) -> dict:
    """lat_deg, lon_deg, height_m only."""
    return {"lat_deg": float(site["lat_deg"]), "lon_deg": float(site["lon_deg"]), "height_m": float(site["height_m"])}


_SEXA = re.compile(r"^\s*([+-]?)\s*(\d+(?:\.\d*)?)(?:[:\s]+(\d+(?:\.\d*)?))?(?:[:\s]+(\d+(?:\.\d*)?))?\s*([NSEWnsew]?)\s*$")


def parse_angle(value) -> tuple[float, str]:
    """An angle from a number or a (sexagesimal) string: (degrees, how it was written).

    '31:57:48.0', '111:36.0', '-30 09 57.8', '19.825556', '70:48:53.6 W', 70.81489 ...
    ``how`` is "number" (a FITS number), "signed" (a string with a leading + or -),
    "unsigned" (a string with neither sign nor hemisphere letter: its east/west meaning
    is the convention's) or "hemisphere" (a trailing N/S/E/W letter, which settles the
    sign: S and W are negative). Raises ValueError on anything else.
    """
    if isinstance(value, bool):
        raise ValueError(f"not an angle: {value!r}")  # noqa: TRY004 - callers catch ValueError
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise ValueError(f"not a finite angle: {value!r}")
        return float(value), "number"
    text = str(value).strip()
    m = _SEXA.match(text)
    if not m:
        raise ValueError(f"not an angle: {value!r}")
    sign, d, mi, s, letter = m.groups()
    angle = float(d) + (float(mi) / 60.0 if mi else 0.0) + (float(s) / 3600.0 if s else 0.0)
    if sign == "-" or letter.upper() in ("S", "W"):
        angle = -angle
    return angle, ("hemisphere" if letter else "signed" if sign else "unsigned")


#: Site keyword spellings, tried in this order: (label, latitude, longitude, heights).
SITE_KEYWORDS = (
    ("OBS-LAT/OBS-LONG", "OBS-LAT", "OBS-LONG", ("OBS-ELEV", "OBS-ALT")),
    ("LAT-OBS/LONG-OBS", "LAT-OBS", "LONG-OBS", ("ALT-OBS", "ELEV-OBS")),
    ("SITELAT/SITELONG", "SITELAT", "SITELONG", ("SITEALT", "SITEELEV")),
    ("LATITUDE/LONGITUD", "LATITUDE", "LONGITUD", ("HEIGHT", "ELEVATIO")),
    ("FPA.LATITUDE/FPA.LONGITUDE", "FPA.LATITUDE", "FPA.LONGITUDE", ("FPA.ELEVATION",)),
)

#: Longitude conventions: how a header's longitude number maps to east longitude (deg).
LON_CONVENTIONS = {
    "east": lambda v: v,
    "west": lambda v: -v,
    "east_hours": lambda v: 15.0 * v,
    "west_hours": lambda v: -15.0 * v,
}


def _wrap(lon: float) -> float:
    return (lon + 180.0) % 360.0 - 180.0


def _geocentric(site: dict):
    import astropy.units as u
    from astropy.coordinates import EarthLocation

    loc = EarthLocation.from_geodetic(site["lon_deg"] * u.deg, site["lat_deg"] * u.deg, site["height_m"] * u.m)
    return loc.x.to_value(u.km), loc.y.to_value(u.km), loc.z.to_value(u.km)


def distance_km(a: dict, b: dict) -> float:
    """Straight-line distance between two sites (km)."""
    return math.dist(_geocentric(a), _geocentric(b))


def _get(hdr, key):
    try:
        return hdr.get(key)
    except (KeyError, ValueError):  # an unparseable card reads as absent
        return None


def _site_number(hdr, key: str, low: float = -math.inf, high: float = math.inf, what: str = "a number") -> float:
    """A site keyword's value as a finite float in [low, high], or a SiteError naming it."""
    value = hdr[key]
    try:
        number = float(str(value).strip()) if isinstance(value, str) else float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not (math.isfinite(number) and low <= number <= high):
        raise SiteError(f"site: {key} = {value!r} is not {what}")
    return number


def header_site_reading(hdr) -> dict | None:
    """The first complete site reading of a header, uninterpreted where it is ambiguous.

    Returns ``{"keys", "lat_deg", "lon_value", "height_m", "exact", "comment", "text"}``:
    ``exact`` for OBSGEO-X/Y/Z and OBSGEO-L/B/H (FITS standard, east longitude, no
    convention to choose); otherwise ``lon_value`` is the header's number before any
    east/west or hours convention is applied. None when no spelling is complete.
    Raises SiteError for values that are present but not a ground site.
    """
    if all(_get(hdr, k) is not None for k in ("OBSGEO-X", "OBSGEO-Y", "OBSGEO-Z")):
        import astropy.units as u
        from astropy.coordinates import EarthLocation

        xyz = [_site_number(hdr, k) for k in ("OBSGEO-X", "OBSGEO-Y", "OBSGEO-Z")]
        r_km = math.hypot(*xyz) / 1e3
        if not 6340.0 < r_km < 6400.0:
            raise SiteError(f"site: OBSGEO-X/Y/Z is {r_km:.4g} km from the geocentre: a spacecraft position, "
                            "not a ground observatory (the search needs a ground site)")
        geo = EarthLocation.from_geocentric(*xyz, unit=u.m).to_geodetic("WGS84")
        return {"keys": "OBSGEO-X/Y/Z", "lat_deg": float(geo.lat.deg), "lon_value": float(geo.lon.deg),
                "height_m": float(geo.height.to_value(u.m)), "exact": True, "comment": "", "text": ""}
    if all(_get(hdr, k) is not None for k in ("OBSGEO-L", "OBSGEO-B", "OBSGEO-H")):
        lat = _site_number(hdr, "OBSGEO-B", -90.0, 90.0, "a latitude (-90 to 90 deg)")
        lon = _site_number(hdr, "OBSGEO-L", -360.0, 360.0, "a longitude (-360 to 360 deg)")
        height = _site_number(hdr, "OBSGEO-H", -500.0, 9000.0, "the height of a ground observatory (-500 to 9000 m)")
        return {"keys": "OBSGEO-L/B/H", "lat_deg": lat, "lon_value": lon, "height_m": height, "exact": True,
                "comment": "", "text": ""}
    for label, klat, klon, kheights in SITE_KEYWORDS:
        lat_raw, lon_raw = _get(hdr, klat), _get(hdr, klon)
        if lat_raw is None or lon_raw is None:
            continue
        try:
            lat, _ = parse_angle(lat_raw)
            lon, how = parse_angle(lon_raw)
        except ValueError as err:
            raise SiteError(f"site: unreadable {label} = {lat_raw!r}, {lon_raw!r} ({err})") from err
        if not -90.0 <= lat <= 90.0:
            raise SiteError(f"site: {klat} = {lat_raw!r} is not a latitude")
        height = None
        for kh in kheights:
            if _get(hdr, kh) is not None:
                try:
                    height = float(hdr[kh])
                    break
                except (TypeError, ValueError):
                    continue
        if height is not None and not -500.0 < height < 9000.0:
            raise SiteError(f"site: {kh} = {hdr[kh]!r} m is not the height of a ground observatory")
        comment = ""
        try:
            comment = str(hdr.comments[klon])
        except (KeyError, IndexError):
            pass
        return {"keys": label, "lat_deg": lat, "lon_value": lon, "height_m": height, "exact": False,
                "comment": comment, "how": how, "text": f"{klat} = {lat_raw!r}, {klon} = {lon_raw!r}"}
    return None


def _comment_says_west(comment: str) -> bool:
    c = comment.lower()
    return "west" in c or "degrees w" in c or "deg w" in c or "[w]" in c


def resolve_site(hdr, known: tuple[str, dict] | None = None, lon_conventions=None,
                 tolerance_km: float = SITE_TOLERANCE_KM) -> tuple[dict | None, str]:
    """The site of an image from its header and, where known, the instrument's site.

    Parameters
    ----------
    known : (name, site), optional
        The site the instrument is known to be at (from its convention or a TELESCOP /
        OBSERVAT / INSTRUME value in the site table).
    lon_conventions : list of str, optional
        Longitude conventions (``LON_CONVENTIONS``) the header may use; by default
        east-positive, or west-positive where the keyword's comment says west. With a
        known site and no list, both east and west are tried.

    Returns
    -------
    site, provenance
        The table's coordinates when the header agrees with the known site within
        ``tolerance_km``; the header's when no site is known; the known site when the
        header has no site keywords; (None, "") when neither.

    Raises
    ------
    SiteError
        When the header's value is further than ``tolerance_km`` from the known site under
        every allowed convention, naming the keyword and both values.
    """
    reading = header_site_reading(hdr)
    if reading is None:
        if known is not None:
            return plain(known[1]), f"site table {known[0]} (no site keywords in the header)"
        return None, ""
    if reading["exact"] or reading.get("how") == "hemisphere":
        candidates = [("east", reading["lon_value"])]
    else:
        if lon_conventions:
            names = list(lon_conventions)
        elif known is not None:
            names = ["east", "west"]
        else:
            names = ["west" if _comment_says_west(reading["comment"]) else "east"]
        unknown = [n for n in names if n not in LON_CONVENTIONS]
        if unknown:
            raise SiteError(f"site: unknown longitude convention(s) {unknown} (known: {', '.join(LON_CONVENTIONS)})")
        candidates = [(n, _wrap(LON_CONVENTIONS[n](reading["lon_value"]))) for n in names]
    if known is None:
        if (reading.get("how") == "unsigned" and not lon_conventions
                and not _comment_says_west(reading["comment"])):
            raise SiteError(f"site: {reading['text']} is an unsigned sexagesimal longitude (east or west?) and the "
                            "site is not in the table: add it under survey.sites, or give lon_conventions in a "
                            "survey.conventions entry")
        name, lon = candidates[0]
        height = reading["height_m"] if reading["height_m"] is not None else 0.0
        return ({"lat_deg": reading["lat_deg"], "lon_deg": lon, "height_m": height},
                f"{reading['keys']} ({name} longitude)")
    site_name, site = known
    best = None
    for name, lon in candidates:
        height = reading["height_m"] if reading["height_m"] is not None else site["height_m"]
        d = distance_km({"lat_deg": reading["lat_deg"], "lon_deg": lon, "height_m": height}, site)
        if best is None or d < best[0]:
            best = (d, name, lon)
    d, name, lon = best
    if d > tolerance_km:
        text = reading["text"] or f"{reading['keys']} = ({reading['lat_deg']:.5f}, {reading['lon_value']:.5f})"
        raise SiteError(
            f"site: {text} is {d:.0f} km from {site_name} (lat {site['lat_deg']:.5f}, east lon {site['lon_deg']:.5f}) "
            f"under every longitude convention allowed here ({', '.join(c[0] for c in candidates)}); "
            f"tolerance {tolerance_km:g} km")
    return plain(site), f"{reading['keys']} ({name} longitude) agrees with {site_name} to {d:.2f} km: table coordinates"
