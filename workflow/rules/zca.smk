# ZCA whitening: fit on a dataset's train split, apply to train, val and test.


rule zca_whiten:
    input:
        files(layout.data_dir(), [split_files(split)[0] for split in SPLITS]),
    output:
        files(layout.zca_dir(), layout.zca_files()),
    log:
        log_file("zca_whiten", "{dataset}"),
    benchmark:
        benchmark_file("zca_whiten", "{dataset}")
    conda:
        CONDA_ENV
    threads: job_threads
    resources:
        mem_mb=job_mem_mb("zca_whiten", zca_estimate),
        runtime=job_runtime("zca_whiten"),
        gpu=job_gpus,
    params:
        args=zca_args,
        out=output_dir,
    shell:
        "python -m neural_kernels zca {input:q} --out-dir {params.out:q}"
        " {params.args} > {log:q} 2>&1"
