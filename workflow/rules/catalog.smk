# Per-region Bayesian catalogs: detect -> plan_regions (checkpoint) -> fit_region per region -> merge.


rule detect_sources:
    input:
        unpack(candidate_inputs),
    output:
        candidates=result("catalog", "candidates.parquet"),
    log:
        log_path("detect_sources"),
    benchmark:
        bench_path("detect_sources")
    conda:
        CONDA_ENV
    params:
        source=config["catalog"]["source"],
        detect_thresh_sigma=config["catalog"]["detect_thresh_sigma"],
        match_radius_arcsec=config["catalog"]["match_radius_arcsec"],
    script:
        "../scripts/detect_sources.py"


checkpoint plan_regions:
    input:
        candidates=result("catalog", "candidates.parquet"),
    output:
        regions=result("catalog", "regions.parquet"),
        plan=result("catalog", "regions.json"),
    log:
        log_path("plan_regions"),
    benchmark:
        bench_path("plan_regions")
    conda:
        CONDA_ENV
    params:
        max_sources_per_region=config["catalog"]["max_sources_per_region"],
    script:
        "../scripts/plan_regions.py"


rule fit_region:
    input:
        regions=result("catalog", "regions.parquet"),
        images=result("images.parquet"),
    output:
        catalog=result("catalog", "regions", "region_{region}.parquet"),
    log:
        log_path("fit_region", "_{region}"),
    benchmark:
        bench_path("fit_region", "_{region}")
    conda:
        gpu_env("fit_region")
    # Batches of sources are fitted side by side, one per thread (a region's batches keep two
    # cores busy; Snakemake gives fewer where --cores is smaller); more with set-threads.
    threads: 2
    params:
        margin_arcsec=config["catalog"]["margin_arcsec"],
        patch_px=config["catalog"]["patch_px"],
        tol=config["catalog"]["tol"],
        max_iter=config["catalog"]["max_iter"],
        max_images=config["catalog"]["max_images"],
        detect_residuals=config["catalog"]["detect_residuals"],
    script:
        "../scripts/fit_region.py"


rule merge_catalog:
    input:
        regions=region_catalogs,
    output:
        catalog=result("catalog.parquet"),
        fits=result("catalog.fits"),
        figure=report(
            result("catalog", "uncertainties.png"),
            caption="../report/catalog.rst",
            category="Catalog",
        ),
    log:
        log_path("merge_catalog"),
    benchmark:
        bench_path("merge_catalog")
    conda:
        CONDA_ENV
    script:
        "../scripts/merge_catalog.py"
