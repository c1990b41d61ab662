# ZCA whitening: fit on a dataset's train split, apply to train, val and test.


rule zca_whiten:
    input:
        expand("results/data/{{dataset}}/{split}_images.npy", split=SPLITS),
    output:
        expand("results/zca/{{dataset}}/{split}_images.npy", split=SPLITS),
        "results/zca/{dataset}/transform.npz",
        "results/zca/{dataset}/zca.json",
    log:
        "results/logs/zca_whiten/{dataset}.log",
    benchmark:
        "results/benchmarks/zca_whiten/{dataset}.tsv"
    conda:
        CONDA_ENV
    threads: job_threads
    resources:
        mem_mb=32000,
        runtime=240,
        gpu=job_gpus,
    params:
        args=zca_args,
        out=output_dir,
    shell:
        "python -m neural_kernels zca {input:q} --out-dir {params.out:q}"
        " {params.args} > {log:q} 2>&1"
