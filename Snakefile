# skystack: survey FITS images -> tile caches, catalogs, deconvolved stamps, detections.
# Run: snakemake --profile profiles/default  (or profiles/slurm on a cluster)
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/survey.smk"
include: "workflow/rules/cache.smk"
include: "workflow/rules/catalog.smk"
include: "workflow/rules/search.smk"
include: "workflow/rules/deconvolve.smk"


rule all:
    default_target: True
    input:
        all_targets(),
