# Trained network baselines (ResNet18 from scratch, finite Myrtle networks) on the
# prepared (not whitened) images. Layout: see neural_kernels.networks. An interrupted
# job resumes from its per-epoch checkpoint in results/networks/<dataset>/.<name>.resume/.


rule train_network:
    input:
        network_inputs,
    output:
        "results/networks/{dataset}/{network}/model.pt",
        "results/networks/{dataset}/{network}/metrics.json",
    log:
        "results/logs/train_network/{dataset}/{network}.log",
    benchmark:
        "results/benchmarks/train_network/{dataset}/{network}.tsv"
    conda:
        CONDA_ENV
    threads: job_threads
    resources:
        mem_mb=32000,
        runtime=720,
        gpu=job_gpus,
    params:
        args=network_args,
        data=input_dir,
        out=output_dir,
    shell:
        "python -m neural_kernels train --data {params.data:q} {params.args}"
        " --out-dir {params.out:q} > {log:q} 2>&1"
