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
    threads: 2
    resources:
        mem_mb=16000,
        runtime=120,
    params:
        args=zca_args,
        out=output_dir,
    shell:
        "python -m neural_kernels zca {input:q} --out-dir {params.out:q}"
        " {params.args} > {log:q} 2>&1"
