"""The orbit search on real DECam images of asteroid 2013 RR163 (config/experiments/rr163.yaml):
three 20" g cutouts (2013-09-01, -03, -08) searched along the orbit fitted to the object's NSC
DR2 detections (resources/2013_RR163_fit.csv). The search finds it at combined SNR ~18, on each
image within ~0.1 arcsec of the NSC position measured on that exposure. The cutouts have no zero
point: the experiment searches them with fluxes in ADU (search.without_zero_point: adu)."""
import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import REPO, SHARED_DATA, needs_shared, run_snakemake

DATA = "real/decam/asteroid-2013RR163"
CONFIG = REPO / "config" / "experiments" / "rr163.yaml"


def offsets_from_nsc_arcsec(lc: pd.DataFrame, images: pd.DataFrame) -> np.ndarray:
    """Per light-curve row: the distance (arcsec) from the NSC position measured on its exposure."""
    from astropy.io import fits
    from astropy.wcs import WCS

    nsc = pd.read_csv(SHARED_DATA / DATA / "2013_RR163.csv").dropna(subset=["ra_deg"])
    out = []
    for _, row in lc.iterrows():
        im = images.loc[row["image_id"]]
        measured = nsc[nsc["exposure_id"] == im["path"].split("expid_")[1].split("_h20")[0]].iloc[0]
        ra, dec = WCS(fits.Header.fromstring(im["wcs_header"])).all_pix2world(row["x"], row["y"], 0)
        out.append(np.hypot((ra - measured["ra_deg"]) * np.cos(np.radians(measured["dec_deg"])),
                            dec - measured["dec_deg"]) * 3600.0)
    return np.array(out)


@pytest.mark.workflow
@needs_shared(f"{DATA}/2013_RR163.csv")
def test_search_finds_2013_rr163_at_its_measured_positions(tmp_path):
    from astropy.table import Table

    # Absolute input paths, so the run reads the shared data wherever it is (SKYSTACK_SHARED_DATA).
    overlay = tmp_path / "paths.yaml"
    overlay.write_text(yaml.safe_dump({"survey": {"paths": [str(SHARED_DATA / DATA / "*_ooi_g_*.fits")]},
                                       "orbits": {"path": str(REPO / "resources" / "2013_RR163_fit.csv")}}))
    run_snakemake(tmp_path, configfile=[CONFIG, overlay], timeout=600)
    out = tmp_path / "results" / "rr163"
    det = pd.read_parquet(out / "detections.parquet")
    assert len(det) == 1 and det["name"].iloc[0] == "2013 RR163"
    d = det.iloc[0]
    assert d["n_images"] == 3 and d["n_rejected"] == 0
    assert d["snr"] > 14.0, d["snr"]  # threshold 7
    lc = Table.read(out / "light_curves.ecsv").to_pandas()
    images = pd.read_parquet(out / "images.parquet").set_index("image_id")
    assert np.isnan(images["magzp"]).all()  # fluxes in ADU
    assert len(lc) == 3 and (lc["flux_nmgy"] / lc["flux_sd_nmgy"] > 6).all()
    offsets = offsets_from_nsc_arcsec(lc, images)
    assert (offsets < 0.3).all(), offsets  # 0.04-0.08 found


def test_search_without_zero_point_adu_keeps_only_a_set_with_none():
    """search.without_zero_point: 'adu' keeps images without zero points only when none has one
    (never mixing ADU with nanomaggies); the default leaves them out, and refuses when none is left."""
    import logging

    from skystack.survey.stage import with_zero_point

    log = logging.getLogger("test")
    none = pd.DataFrame({"path": ["a.fits", "b.fits"], "magzp": [np.nan, np.nan]})
    mixed = pd.DataFrame({"path": ["a.fits", "b.fits"], "magzp": [25.0, np.nan]})
    with pytest.raises(ValueError, match="none of the 2 images has a zero point"):
        with_zero_point(none, "images.parquet", log)
    assert len(with_zero_point(none, "images.parquet", log, without_zero_point="adu")) == 2
    assert with_zero_point(mixed, "images.parquet", log, without_zero_point="adu")["path"].tolist() == ["a.fits"]
    with pytest.raises(ValueError, match="without_zero_point must be one of leave_out, adu"):
        with_zero_point(none, "images.parquet", log, without_zero_point="nmgy")


@pytest.mark.workflow
@needs_shared(f"{DATA}/2013_RR163.csv")
def test_region_search_finds_2013_rr163_in_its_fits_uncertainty_box(tmp_path):
    """The same real cutouts searched without an orbit: a region, the fit's elements +- their
    1-sd (from the CSV's 12 positions). The covering's trials (~23,000) find one object; refined
    on the three images, its track is on the NSC positions. Three images give six coordinates
    for six elements, so the refined track can follow each image's noise: 0.07-0.41 arcsec found,
    0.6 allowed (the file-orbit search above: 0.3)."""
    from astropy.table import Table

    fit = pd.read_csv(REPO / "resources" / "2013_RR163_fit.csv", comment="#").iloc[0]
    region = {"name": "rr163-box", "reference": {k: float(fit[k]) for k in (
        "a_au", "e", "inc_deg", "node_deg", "argperi_deg", "mean_anomaly_deg", "epoch_jd_tdb")},
              "half_width": {"a_au": 0.000352, "e": 0.000171, "inc_deg": 0.000349, "node_deg": 0.00319,
                             "argperi_deg": 0.00588, "mean_anomaly_deg": 0.0201}}
    overlay = tmp_path / "region.yaml"
    overlay.write_text(yaml.safe_dump({"survey": {"paths": [str(SHARED_DATA / DATA / "*_ooi_g_*.fits")]},
                                       "orbits": {"source": "region", "path": None, "regions": [region],
                                                  "chunk_size": 25000}}))
    run_snakemake(tmp_path, configfile=[CONFIG, overlay], timeout=900)
    out = tmp_path / "results" / "rr163"
    det = pd.read_parquet(out / "detections.parquet")
    assert len(det) == 1 and det["name"].iloc[0] == "rr163-box" and det["refined"].iloc[0]
    assert det["snr"].iloc[0] > 14.0 and det["n_images"].iloc[0] == 3
    lc = Table.read(out / "light_curves.ecsv").to_pandas()
    images = pd.read_parquet(out / "images.parquet").set_index("image_id")
    assert len(lc) == 3
    offsets = offsets_from_nsc_arcsec(lc, images)
    assert (offsets < 0.6).all(), offsets
