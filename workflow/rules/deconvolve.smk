# Space-variant PSF deconvolution of galaxy stamps: extract -> deconvolve_shard per shard -> merge.
# Shards are contiguous stamp ranges solved independently (sparse mode), so the merged cube is
# the same for any deconvolve.shards; low-rank mode couples the stamps and runs as one shard.
# Stage switch, shard list and input choice: deconvolve_targets, DECONV_SHARDS, stamp_sources
# (common.smk).


rule extract_stamps:
    input:
        unpack(stamp_sources),
    output:
        stamps=result("deconvolve", "stamps.npy"),
        psfs=result("deconvolve", "psfs.npy"),
        meta=result("deconvolve", "stamps.parquet"),
    log:
        log_path("extract_stamps"),
    benchmark:
        bench_path("extract_stamps")
    conda:
        CONDA_ENV
    params:
        deconvolve={k: DECONV[k] for k in ("source", "band", "stamp_px", "max_stamps")},
    script:
        "../scripts/extract_stamps.py"


rule deconvolve_shard:
    input:
        stamps=result("deconvolve", "stamps.npy"),
        psfs=result("deconvolve", "psfs.npy"),
        meta=result("deconvolve", "stamps.parquet"),
    output:
        deconvolved=result("deconvolve", "shards", "shard_{shard}.npy"),
        diagnostics=result("deconvolve", "shards", "shard_{shard}.parquet"),
    log:
        log_path("deconvolve_shard", "_{shard}"),
    benchmark:
        bench_path("deconvolve_shard", "_{shard}")
    conda:
        gpu_env("deconvolve_shard")
    params:
        deconvolve={k: DECONV[k] for k in DECONV_SOLVER_KEYS},
        n_shards=len(DECONV_SHARDS),
    script:
        "../scripts/deconvolve_shard.py"


rule merge_deconvolved:
    input:
        stamps=result("deconvolve", "stamps.npy"),
        psfs=result("deconvolve", "psfs.npy"),
        meta=result("deconvolve", "stamps.parquet"),
        deconvolved=expand(
            result("deconvolve", "shards", "shard_{shard}.npy"), shard=DECONV_SHARDS
        ),
        diagnostics=expand(
            result("deconvolve", "shards", "shard_{shard}.parquet"),
            shard=DECONV_SHARDS,
        ),
    output:
        cube=result("deconvolved", "deconvolved.fits"),
        diagnostics=result("deconvolved", "diagnostics.parquet"),
        figure=report(
            result("deconvolved", "examples.png"),
            caption="../report/deconvolve.rst",
            category="Deconvolution",
        ),
    log:
        log_path("merge_deconvolved"),
    benchmark:
        bench_path("merge_deconvolved")
    conda:
        CONDA_ENV
    params:
        mode=DECONV["mode"],
    script:
        "../scripts/merge_deconvolved.py"
