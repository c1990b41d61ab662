# Datasets: download (checksum-verified) -> prepared train/val/test .npy -> subsets.
# On a cluster, downloads run where snakemake runs (compute nodes are often offline).


localrules:
    download_archive,


rule download_archive:
    output:
        layout.archive_file(),
    log:
        log_file("download_archive", "{dataset}/{archive}"),
    benchmark:
        benchmark_file("download_archive", layout.archive_file())
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=1024,
        runtime=240,
    params:
        url=PLAN.dataset_url,
        checksum=PLAN.dataset_checksum,
        retries=config["download"]["retries"],
        timeout=config["download"]["timeout"],
    shell:
        "python -m neural_kernels download --url {params.url:q} --checksum {params.checksum}"
        " --retries {params.retries} --timeout {params.timeout}"
        " --out {output:q} > {log:q} 2>&1"


rule prepare_dataset:
    input:
        unpack(PLAN.prepare_inputs),
    output:
        files(layout.data_dir(), prepared_files()),
    log:
        log_file("prepare_dataset", "{dataset}"),
    benchmark:
        benchmark_file("prepare_dataset", layout.data_dir())
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=PLAN.job_mem_mb("prepare_dataset", PLAN.prepare_estimate),
        runtime=PLAN.job_runtime("prepare_dataset"),
    params:
        args=PLAN.prepare_args,
        out=output_dir,
    shell:
        "python -m neural_kernels prepare {params.args} --out {params.out:q} > {log:q} 2>&1"


rule subset:
    input:
        files(layout.data_dir(), [layout.DATA_META, *split_files("train")]),
    output:
        files(layout.subset_dir(view=layout.subset_view()), subset_files()),
    log:
        log_file("subset", f"{{dataset}}/{layout.subset_view()}"),
    benchmark:
        benchmark_file("subset", layout.subset_dir(view=layout.subset_view()))
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=PLAN.job_mem_mb("subset", PLAN.small_job),
        runtime=PLAN.job_runtime("subset"),
    params:
        data=input_dir,
        out=output_dir,
    shell:
        "python -m neural_kernels subset --data {params.data:q} --size {wildcards.size}"
        " --seed {wildcards.seed} --out {params.out:q} > {log:q} 2>&1"
