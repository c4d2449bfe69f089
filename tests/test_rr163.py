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


@pytest.mark.workflow
@needs_shared(f"{DATA}/2013_RR163.csv")
def test_search_finds_2013_rr163_at_its_measured_positions(tmp_path):
    from astropy.io import fits
    from astropy.table import Table
    from astropy.wcs import WCS

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
    nsc = pd.read_csv(SHARED_DATA / DATA / "2013_RR163.csv").dropna(subset=["ra_deg"])
    for _, row in lc.iterrows():
        im = images.loc[row["image_id"]]
        measured = nsc[nsc["exposure_id"] == im["path"].split("expid_")[1].split("_h20")[0]].iloc[0]
        ra, dec = WCS(fits.Header.fromstring(im["wcs_header"])).all_pix2world(row["x"], row["y"], 0)
        offset = np.hypot((ra - measured["ra_deg"]) * np.cos(np.radians(measured["dec_deg"])),
                          dec - measured["dec_deg"]) * 3600.0
        assert offset < 0.3, (im["path"], offset)  # arcsec; 0.04-0.08 found


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
