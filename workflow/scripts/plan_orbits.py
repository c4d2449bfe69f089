import json

from skystack import logs
from skystack.io import atomic_path, write_parquet
from skystack.tracking import plan_orbits

log = logs.setup(snakemake.log[0], "plan_orbits")
inp = snakemake.input
listed, plan = plan_orbits(snakemake.params.orbits, snakemake.params.seed, inp.known_objects,
                           truth_path=inp.get("truth"), file_path=inp.get("orbit_file"))
write_parquet(listed, snakemake.output.listed)
with atomic_path(snakemake.output.plan) as tmp:
    tmp.write_text(json.dumps(plan, indent=1))
log.info("%d listed + %d random orbits (%s), %d chunks of %d, %d search jobs per partition",
         plan["n_listed"], plan["n_random"], plan["preset"], plan["n_chunks"], plan["chunk_size"], plan["n_chunk_ranges"])
