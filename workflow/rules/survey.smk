# The survey: simulate it (default) or take FITS files, then index every image HDU.


rule simulate_survey:
    input:
        known_objects=KNOWN_OBJECTS,
    output:
        images=directory(result("survey", "images")),
        orbits=result("survey", "orbits.parquet"),
        sources=result("survey", "sources.parquet"),
        injected=result("survey", "injected.parquet"),
    log:
        log_path("simulate_survey"),
    benchmark:
        bench_path("simulate_survey")
    conda:
        CONDA_ENV
    threads: 1
    params:
        simulate=lambda wc: {**config["survey"]["simulate"], "seed": config["seed"]},
    script:
        "../scripts/simulate_survey.py"


rule index_survey:
    input:
        unpack(lambda wc: survey_inputs()),
    output:
        images=result("images.parquet"),
        rejected=result("rejected_images.parquet"),
    log:
        log_path("index_survey"),
    benchmark:
        bench_path("index_survey")
    conda:
        CONDA_ENV
    params:
        site=config["survey"]["site"],
        sites=config["survey"]["sites"],
        conventions=config["survey"]["conventions"],
        ccd_tables=config["survey"]["ccd_tables"],
        on_bad_image=config["survey"]["on_bad_image"],
        partitions=config["partitions"],
        refused=survey_refused,
    script:
        "../scripts/index_survey.py"
