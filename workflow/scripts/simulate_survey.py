from pathlib import Path

from skystack.core import logs
from skystack.sim.survey import simulate_survey

log = logs.setup(snakemake.log[0], snakemake.rule)
out_dir = Path(snakemake.output.orbits).parent
summary = simulate_survey(snakemake.params.simulate, out_dir, snakemake.input.known_objects, progress=log.info)
log.info("wrote %d images of %d exposures, %d static sources, %d moving objects to %s",
         summary["n_images"], summary["n_exposures"], summary["n_sources"], summary["n_movers"], out_dir)
