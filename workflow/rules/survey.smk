# The survey: simulate it (default) or take FITS files, then index every image HDU.


rule simulate_survey:
    output:
        images=directory(result("survey", "images")),
        orbits=result("survey", "orbits.parquet"),
        sources=result("survey", "sources.parquet"),
        injected=result("survey", "injected.parquet"),
    input:
        known_objects=KNOWN_OBJECTS,
    params:
        simulate=lambda wc: {**config["survey"]["simulate"], "seed": config["seed"]},
    conda:
        CONDA_ENV
    log:
        log_path("simulate_survey"),
    benchmark:
        bench_path("simulate_survey")
    threads: 1
    script:
        "../scripts/simulate_survey.py"


rule index_survey:
    input:
        unpack(lambda wc: survey_inputs()),
    output:
        images=result("images.parquet"),
        rejected=result("rejected_images.parquet"),
    params:
        site=config["survey"]["site"],
        on_bad_image=config["survey"]["on_bad_image"],
        partitions=config["partitions"],
    conda:
        CONDA_ENV
    log:
        log_path("index_survey"),
    benchmark:
        bench_path("index_survey")
    script:
        "../scripts/index_survey.py"
