# ZCA whitening: fit on a dataset's train split, apply to train, val and test.


rule zca_whiten:
    input:
        files(layout.data_dir(), [split_files(split)[0] for split in SPLITS]),
    output:
        files(layout.zca_dir(), layout.zca_files()),
    log:
        log_file("zca_whiten", "{dataset}"),
    benchmark:
        benchmark_file("zca_whiten", layout.zca_dir())
    conda:
        CONDA_ENV
    threads: PLAN.job_threads
    resources:
        mem_mb=PLAN.job_mem_mb("zca_whiten", PLAN.zca_estimate),
        runtime=PLAN.job_runtime("zca_whiten"),
        gpu=PLAN.job_gpus,
    params:
        args=PLAN.zca_args,
        out=output_dir,
    shell:
        "python -m neural_kernels zca {input:q} --out-dir {params.out:q}"
        " {params.args} > {log:q} 2>&1"
