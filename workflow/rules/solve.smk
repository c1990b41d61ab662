# Kernel regression on every kernel: gradient flow, kernel ridge and batched boosting,
# hyperparameters chosen on the validation split. Layout: neural_kernels.solvers.stage.


rule solve:
    input:
        unpack(solve_inputs),
    output:
        "results/solve/{dataset}/{view}/{kernel}/{solver}/predictions.npz",
        "results/solve/{dataset}/{view}/{kernel}/{solver}/metrics.json",
    log:
        "results/logs/solve/{dataset}/{view}/{kernel}/{solver}.log",
    benchmark:
        "results/benchmarks/solve/{dataset}/{view}/{kernel}/{solver}.tsv"
    conda:
        CONDA_ENV
    threads: job_threads
    resources:
        mem_mb=solve_mem_mb,
        runtime=720,
        gpu=job_gpus,
    params:
        args=solve_args,
        out=output_dir,
    shell:
        "python -m neural_kernels solve {params.args} --out-dir {params.out:q} > {log:q} 2>&1"
