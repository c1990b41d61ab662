# Datasets: download (checksum-verified) -> prepared train/val/test .npy -> subsets.
# On a cluster, downloads run where snakemake runs (compute nodes are often offline).


localrules:
    download_archive,


rule download_archive:
    output:
        "resources/{dataset}/{archive}",
    log:
        "results/logs/download_archive/{dataset}/{archive}.log",
    benchmark:
        "results/benchmarks/download_archive/{dataset}/{archive}.tsv"
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=1024,
        runtime=240,
    params:
        url=dataset_url,
        checksum=dataset_checksum,
        retries=config["download"]["retries"],
        timeout=config["download"]["timeout"],
    shell:
        "python -m neural_kernels download --url {params.url:q} --checksum {params.checksum}"
        " --retries {params.retries} --timeout {params.timeout}"
        " --out {output:q} > {log:q} 2>&1"


rule prepare_dataset:
    input:
        unpack(prepare_inputs),
    output:
        expand("results/data/{{dataset}}/{file}", file=prepared_files()),
    log:
        "results/logs/prepare_dataset/{dataset}.log",
    benchmark:
        "results/benchmarks/prepare_dataset/{dataset}.tsv"
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=8000,
        runtime=180,
    params:
        args=prepare_args,
        out=output_dir,
    shell:
        "python -m neural_kernels prepare {params.args} --out {params.out:q} > {log:q} 2>&1"


rule subset:
    input:
        "results/data/{dataset}/meta.json",
        "results/data/{dataset}/train_images.npy",
        "results/data/{dataset}/train_labels.npy",
    output:
        expand(
            "results/data/{{dataset}}/subsets/n{{size}}-seed{{seed}}/{file}",
            file=subset_files(),
        ),
    log:
        "results/logs/subset/{dataset}/n{size}-seed{seed}.log",
    benchmark:
        "results/benchmarks/subset/{dataset}/n{size}-seed{seed}.tsv"
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        data=input_dir,
        out=output_dir,
    shell:
        "python -m neural_kernels subset --data {params.data:q} --size {wildcards.size}"
        " --seed {wildcards.seed} --out {params.out:q} > {log:q} 2>&1"
