# Trained network baselines (ResNet18 from scratch, finite Myrtle networks) on the
# prepared (not whitened) images. Layout: see neural_kernels.networks. An interrupted
# job resumes from its per-epoch checkpoint in results/networks/<dataset>/.<name>.resume/.


rule train_network:
    input:
        PLAN.network_inputs,
    output:
        files(layout.network_dir(), layout.NETWORK_FILES),
    log:
        log_file("train_network", "{dataset}/{network}"),
    benchmark:
        benchmark_file("train_network", layout.network_dir())
    conda:
        CONDA_ENV
    threads: PLAN.job_threads
    resources:
        mem_mb=PLAN.job_mem_mb("train_network", PLAN.train_estimate),
        runtime=PLAN.job_runtime("train_network"),
        gpu=PLAN.job_gpus,
    params:
        args=PLAN.network_args,
        data=input_dir,
        out=output_dir,
    shell:
        "python -m neural_kernels train --data {params.data:q} {params.args}"
        " --out-dir {params.out:q} > {log:q} 2>&1"
