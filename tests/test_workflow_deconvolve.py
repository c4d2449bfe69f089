"""The deconvolution stage in the workflow: real Euclid-like stamps, any number of shards."""
import numpy as np
import pandas as pd
import pytest
import yaml
from astropy.io import fits
from conftest import REPO, SHARED_DATA, needs_shared, run_snakemake

from skystack.deconvolve.solvers import deconvolve_stack
from skystack.deconvolve.stage import deconvolve_shard
from skystack.deconvolve.stamps import DIAG_COLUMNS, load_stamps_and_psfs

STAMPS = SHARED_DATA / "deconv" / "example_image_stack.npy"
PSFS = SHARED_DATA / "deconv" / "example_psfs.npy"
EUCLID = REPO / "config" / "experiments" / "euclid_stamps.yaml"
N = 12  # 3 shards of 4: one compiled shape for the three
SOLVER = {"max_iter": 100}
pytestmark = needs_shared("deconv/example_image_stack.npy", "deconv/example_psfs.npy")


def _overlay(path, **deconvolve):
    path.write_text(yaml.safe_dump({"deconvolve": {"max_stamps": N, **SOLVER, **deconvolve}}))
    return path


def _outputs(workdir, experiment):
    out = workdir / "results" / experiment
    with fits.open(out / "deconvolved" / "deconvolved.fits") as hdul:
        cube = hdul[0].data.copy()
    return cube, pd.read_parquet(out / "deconvolved" / "diagnostics.parquet"), out


def test_shards_give_the_same_answer_as_one_solve(tmp_path):
    # One shard, absolute paths to the stacks.
    one_dir = tmp_path / "one"
    one_dir.mkdir()
    absolute = one_dir / "stacks.yaml"
    absolute.write_text(yaml.safe_dump({"experiment": "stacks", "deconvolve": {
        "source": "stacks", "stamps_path": str(STAMPS), "psfs_path": str(PSFS), "max_stamps": N, "shards": 1,
        **SOLVER}}))
    run_snakemake(one_dir, "results/stacks/deconvolved/deconvolved.fits", configfile=absolute)
    one, diag, out = _outputs(one_dir, "stacks")

    # Three shards, the experiment's paths relative to the repository (the run is elsewhere).
    three_dir = tmp_path / "three"
    three_dir.mkdir()
    relative = EUCLID.exists() and (REPO / yaml.safe_load(EUCLID.read_text())["deconvolve"]["stamps_path"]).exists()
    configs = [EUCLID, _overlay(three_dir / "three.yaml", shards=3)] if relative else \
        [absolute, _overlay(three_dir / "three.yaml", shards=3)]
    experiment = "euclid_stamps" if relative else "stacks"
    run_snakemake(three_dir, f"results/{experiment}/deconvolved/deconvolved.fits", configfile=configs)
    three, diag3, out3 = _outputs(three_dir, experiment)
    assert len(list((out3 / "deconvolve" / "shards").glob("shard_*.npy"))) == 3

    np.testing.assert_array_equal(one, three)
    pd.testing.assert_frame_equal(diag, diag3)
    # ... and the same as one call on the stamps and PSFs the stage wrote
    stamps, psfs = np.load(out / "deconvolve" / "stamps.npy"), np.load(out / "deconvolve" / "psfs.npy")
    raw_stamps, raw_psfs = load_stamps_and_psfs(STAMPS, PSFS)
    np.testing.assert_array_equal(stamps, raw_stamps[:N].astype(np.float32))
    np.testing.assert_allclose(psfs, raw_psfs[:N], rtol=1e-6)
    direct, direct_diag = deconvolve_stack(stamps, psfs, **SOLVER)
    np.testing.assert_array_equal(one, direct)
    np.testing.assert_array_equal(diag["cost"].to_numpy(), direct_diag["cost"].to_numpy())

    assert one.shape == (N, 41, 41) and (one >= 0).all()
    assert list(diag.columns) == DIAG_COLUMNS and diag["stamp"].tolist() == list(range(N))
    finite = ["cost", "noise_sigma", "reduced_chi2", "e1", "e2", "e1_observed", "e2_observed"]
    assert np.isfinite(diag[finite].to_numpy()).all() and diag["iterations"].min() >= 1
    # the model leaves about the noise: reduced chi2 near 1 (stamps' noise measured by MAD)
    assert 0.5 < diag["reduced_chi2"].median() < 2.0
    assert (out / "deconvolved" / "examples.png").stat().st_size > 0
    with fits.open(out / "deconvolved" / "deconvolved.fits") as hdul:
        assert hdul["PSF"].data.shape == (N, 41, 41)


def test_lowrank_runs_as_one_shard(tmp_path):
    overlay = tmp_path / "lowrank.yaml"
    overlay.write_text(yaml.safe_dump({"experiment": "stacks", "deconvolve": {
        "source": "stacks", "stamps_path": str(STAMPS), "psfs_path": str(PSFS), "shards": 4, "mode": "lowrank"}}))
    proc = run_snakemake(tmp_path, "results/stacks/deconvolved/deconvolved.fits", "-n",
                         configfile=overlay)
    counts = {line.split()[0]: int(line.split()[1]) for line in proc.stdout.splitlines()
              if len(line.split()) == 2 and line.split()[1].isdigit()}
    assert counts.get("deconvolve_shard") == 1, proc.stdout
    stamps = np.zeros((4, 9, 9))
    cfg = {"mode": "lowrank", "n_scales": 4, "kappa": [3, 3, 4], "n_reweights": 1, "tol": 1e-4, "max_iter": 5,
           "dtype": "float32"}
    with pytest.raises(ValueError, match="lowrank couples all stamps: it needs one shard"):
        deconvolve_shard(stamps, stamps, np.ones(4), cfg, 0, 2)


def test_split_does_not_change_bits():
    """A stamp's result does not depend on which other stamps share its batch, even a batch of
    one (XLA computes one- and two-row batches differently; they are padded)."""
    stamps, psfs = load_stamps_and_psfs(STAMPS, PSFS)
    stamps, psfs = stamps[:10].astype(np.float32), psfs[:10].astype(np.float32)
    whole, diag = deconvolve_stack(stamps, psfs, max_iter=20)
    seen = []
    parts = [deconvolve_stack(stamps[a:b], psfs[a:b], max_iter=20, progress=lambda d, n: seen.append((d, n)))
             for a, b in ((0, 1), (1, 3), (3, 10))]
    np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), whole)
    np.testing.assert_array_equal(np.concatenate([p[1]["cost"] for p in parts]), diag["cost"])
    assert seen == [(1, 1), (2, 2), (7, 7)]
