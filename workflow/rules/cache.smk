# One tiled, memory-mapped image cache per partition.


rule build_tile_cache:
    input:
        images=result("images.parquet"),
    output:
        cache=CACHE / "partition_{partition}.tiles",
    log:
        log_path("build_tile_cache", "_{partition}"),
    benchmark:
        bench_path("build_tile_cache", "_{partition}")
    conda:
        CONDA_ENV
    params:
        tile_px=config["cache"]["tile_px"],
    script:
        "../scripts/build_tile_cache.py"
