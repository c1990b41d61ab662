# Kernel regression on every kernel: gradient flow, kernel ridge (Cholesky or pcg) and
# batched boosting, hyperparameters chosen on the validation split. Layout:
# neural_kernels.solvers.stage; memory: what the solver holds (neural_kernels.resources).


rule solve:
    input:
        unpack(PLAN.solve_inputs),
    output:
        files(layout.solve_dir(), layout.SOLVE_FILES),
    log:
        log_file("solve", "{dataset}/{view}/{kernel}/{solver}"),
    benchmark:
        benchmark_file("solve", layout.solve_dir())
    conda:
        CONDA_ENV
    threads: PLAN.job_threads
    resources:
        mem_mb=PLAN.job_mem_mb("solve", PLAN.solve_estimate),
        runtime=PLAN.job_runtime("solve"),
        gpu=PLAN.job_gpus,
    params:
        args=PLAN.solve_args,
        out=output_dir,
    shell:
        "python -m neural_kernels solve {params.args} --out-dir {params.out:q} > {log:q} 2>&1"
