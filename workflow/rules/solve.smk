# Kernel regression on every kernel: gradient flow, kernel ridge (Cholesky or pcg) and
# batched boosting, hyperparameters chosen on the validation split. Layout:
# neural_kernels.solvers.stage; memory: what the solver holds (neural_kernels.resources).


rule solve:
    input:
        unpack(solve_inputs),
    output:
        files(layout.solve_dir(), layout.SOLVE_FILES),
    log:
        log_file("solve", "{dataset}/{view}/{kernel}/{solver}"),
    benchmark:
        benchmark_file("solve", "{dataset}/{view}/{kernel}/{solver}")
    conda:
        CONDA_ENV
    threads: job_threads
    resources:
        mem_mb=job_mem_mb("solve", solve_estimate),
        runtime=job_runtime("solve"),
        gpu=job_gpus,
    params:
        args=solve_args,
        out=output_dir,
    shell:
        "python -m neural_kernels solve {params.args} --out-dir {params.out:q} > {log:q} 2>&1"
