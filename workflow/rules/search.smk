# Non-linear digital tracking: orbit chunks x image partitions -> partial sums -> detections.


checkpoint plan_orbits:
    input:
        unpack(orbit_plan_inputs),
    output:
        listed=result("search", "orbits_listed.parquet"),
        plan=result("search", "plan.json"),
    log:
        log_path("plan_orbits"),
    benchmark:
        bench_path("plan_orbits")
    conda:
        CONDA_ENV
    params:
        orbits=config["orbits"],
        search=region_search_settings(),
        seed=config["seed"],
    script:
        "../scripts/plan_orbits.py"


# The tile caches of one partition group of a work-sized plan, listed (see shard_caches).
rule cache_group:
    input:
        caches=group_caches,
    output:
        listed=result("search", "cache_groups", "group{group}.txt"),
    log:
        log_path("cache_group", "_{group}"),
    localrule: True
    run:
        Path(output.listed).write_text("".join(f"{c}\n" for c in input.caches))


# {chunk}: an orbit chunk range; {partition}: a group of partitions (one partition unless the
# plan is work-sized, search.intersections_per_job).
rule search_shard:
    input:
        images=result("images.parquet"),
        cache=shard_caches,
        listed=result("search", "orbits_listed.parquet"),
        plan=result("search", "plan.json"),
        stars=shard_stars(),
    output:
        partials=result("search", "partials", "chunk{chunk}_p{partition}.parquet"),
    log:
        log_path("search_shard", "_{chunk}_{partition}"),
    benchmark:
        bench_path("search_shard", "_{chunk}_{partition}")
    group:
        "search"
    conda:
        gpu_env("search_shard")
    params:
        images=config["search"]["images"],
        smoothing_sigma_px=config["search"]["smoothing_sigma_px"],
        max_batch_mb=config["search"]["max_batch_mb"],
        staging_dir=config["search"]["staging_dir"],
        without_zero_point=config["search"]["without_zero_point"],
        partitions=shard_partitions,
        caches=shard_cache_paths,
        reduce=reduced_partials(),
        star_mask_radius_arcsec=config["search"]["star_mask_radius_arcsec"],
    script:
        "../scripts/search_shard.py"


rule star_mask:
    input:
        catalog=result("catalog.parquet"),
    output:
        stars=result("search", "star_mask.parquet"),
    log:
        log_path("star_mask"),
    benchmark:
        bench_path("star_mask")
    conda:
        CONDA_ENV
    params:
        star_mask_mag=config["search"]["star_mask_mag"],
    script:
        "../scripts/star_mask.py"


rule combine_chunk:
    input:
        unpack(research_inputs),
        partials=chunk_partials,
        images=result("images.parquet"),
        stars=star_mask_input(),
    output:
        combined=result("search", "combined", "chunk{chunk}.parquet"),
        candidates=result("search", "combined", "chunk{chunk}_candidates.parquet"),
    log:
        log_path("combine_chunk", "_{chunk}"),
    benchmark:
        bench_path("combine_chunk", "_{chunk}")
    group:
        "search"
    conda:
        CONDA_ENV
    params:
        sigma_g_clip=config["search"]["sigma_g_clip"],
        snr_threshold=config["search"]["snr_threshold"],
        min_images=config["search"]["min_images"],
        star_mask_radius_arcsec=config["search"]["star_mask_radius_arcsec"],
        research=research_settings(),
    script:
        "../scripts/combine_chunk.py"


rule merge_detections:
    input:
        combined=combined_chunks,
        images=result("images.parquet"),
        listed=result("search", "orbits_listed.parquet"),
        plan=result("search", "plan.json"),
        caches=[cache_file(p) for p in PARTITIONS],
        stars=star_mask_input(),
    output:
        detections=result("detections.parquet"),
        ecsv=result("detections.ecsv"),
        light_curves=result("light_curves.ecsv"),
        all_orbits=result("search", "all_orbits.parquet"),
        plots=directory(result("detections")),
    log:
        log_path("merge_detections"),
    benchmark:
        bench_path("merge_detections")
    conda:
        CONDA_ENV
    params:
        snr_threshold=config["search"]["snr_threshold"],
        min_images=config["search"]["min_images"],
        smoothing_sigma_px=config["search"]["smoothing_sigma_px"],
        sigma_g_clip=config["search"]["sigma_g_clip"],
        star_mask_radius_arcsec=config["search"]["star_mask_radius_arcsec"],
        refined_snr_threshold=config["search"]["refined_snr_threshold"],
        max_noise_detections=config["search"]["max_noise_detections"],
    script:
        "../scripts/merge_detections.py"


rule search_report:
    input:
        all_orbits=result("search", "all_orbits.parquet"),
        detections=result("detections.parquet"),
        listed=result("search", "orbits_listed.parquet"),
        plan=result("search", "plan.json"),
        truth=truth_input(),
        light_curves=result("light_curves.ecsv"),
        images=result("images.parquet"),
        rejected=result("rejected_images.parquet"),
        catalog=catalog_targets()[:1],
    output:
        summary=report(
            result("report", "run_summary.html"),
            caption="../report/run_summary.rst",
            category="1. Run summary",
        ),
        histogram=report(
            result("report", "snr_histogram.png"),
            caption="../report/snr_histogram.rst",
            category="Orbit search",
        ),
        completeness=report(
            result("report", "completeness.png"),
            caption="../report/completeness.rst",
            category="Orbit search",
        ),
        grid=report(
            result("report", "snr_grid.png"),
            caption="../report/snr_grid.rst",
            category="Orbit search",
        ),
        recovered=result("report", "recovered.parquet"),
    log:
        log_path("search_report"),
    benchmark:
        bench_path("search_report")
    conda:
        CONDA_ENV
    params:
        snr_threshold=config["search"]["snr_threshold"],
    script:
        "../scripts/search_report.py"
