# Per-region Bayesian catalogs: detect -> plan_regions (checkpoint) -> fit_region per region -> merge.


rule detect_sources:
    input:
        unpack(candidate_inputs),
    output:
        candidates=result("catalog", "candidates.parquet"),
    params:
        catalog=config["catalog"],
    conda:
        CONDA_ENV
    log:
        log_path("detect_sources"),
    benchmark:
        bench_path("detect_sources")
    script:
        "../scripts/detect_sources.py"


checkpoint plan_regions:
    input:
        candidates=result("catalog", "candidates.parquet"),
    output:
        regions=result("catalog", "regions.parquet"),
        plan=result("catalog", "regions.json"),
    params:
        catalog=config["catalog"],
    conda:
        CONDA_ENV
    log:
        log_path("plan_regions"),
    benchmark:
        bench_path("plan_regions")
    script:
        "../scripts/plan_regions.py"


rule fit_region:
    input:
        regions=result("catalog", "regions.parquet"),
        images=result("images.parquet"),
    output:
        catalog=result("catalog", "regions", "region_{region}.parquet"),
    params:
        catalog=config["catalog"],
    conda:
        CONDA_ENV
    log:
        log_path("fit_region", "_{region}"),
    benchmark:
        bench_path("fit_region", "_{region}")
    script:
        "../scripts/fit_region.py"


rule merge_catalog:
    input:
        regions=region_catalogs,
    output:
        catalog=result("catalog.parquet"),
        fits=result("catalog.fits"),
        stars=result("catalog", "star_mask.parquet"),
        figure=report(result("catalog", "uncertainties.png"), caption="../report/catalog.rst", category="Catalog"),
    params:
        search=config["search"],
    conda:
        CONDA_ENV
    log:
        log_path("merge_catalog"),
    benchmark:
        bench_path("merge_catalog")
    script:
        "../scripts/merge_catalog.py"
