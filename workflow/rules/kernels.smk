# Myrtle kernels of the whitened images: estimated from random networks (sharded,
# then merged) or computed exactly (analytic). Layout: see neural_kernels.kernels.stage.
# A full split's kernel is one symmetric block over train + val (the solve selects on
# val, then refits on both) with the test rows against it; a subset's kernel fits its
# train rows only and scores val and test against them: the *_subset rules are the
# same rules with that output layout.
# An analytic job outlasting its time limit (full CIFAR-10: hundreds of GPU-hours)
# resumes from its finished blocks when rerun (or retried: the slurm profile's retries).


rule kernel_estimate_shard:
    input:
        unpack(PLAN.kernel_inputs),
    output:
        temp(files(layout.shard_dir(), shard_files(fits_val=True))),
    log:
        log_file("kernel_estimate_shard", "{dataset}/{view}/{kernel}/{shard}"),
    benchmark:
        benchmark_file("kernel_estimate_shard", layout.shard_dir())
    wildcard_constraints:
        view=FULL_VIEW,
        kernel=PLAN.kernels_of("estimate", crops=False),
    conda:
        CONDA_ENV
    threads: PLAN.job_threads
    resources:
        mem_mb=PLAN.job_mem_mb("kernel_estimate_shard", PLAN.estimate_shard_estimate),
        runtime=PLAN.job_runtime("kernel_estimate_shard"),
        gpu=PLAN.job_gpus,
    params:
        args=PLAN.estimate_args,
        out=output_dir,
    shell:
        "python -m neural_kernels kernel-shard {params.args} --out-dir {params.out:q}"
        " > {log:q} 2>&1"


use rule kernel_estimate_shard as kernel_estimate_shard_subset with:
    output:
        temp(files(layout.shard_dir(), shard_files(fits_val=False))),
    wildcard_constraints:
        view=SUBSET_VIEW,
        kernel=PLAN.kernels_of("estimate"),


rule kernel_merge:
    input:
        PLAN.kernel_shard_files,
    output:
        files(layout.kernel_dir(), kernel_files(fits_val=True)),
    log:
        log_file("kernel_merge", "{dataset}/{view}/{kernel}"),
    benchmark:
        benchmark_file("kernel_merge", layout.kernel_dir())
    wildcard_constraints:
        view=FULL_VIEW,
        kernel=PLAN.kernels_of("estimate", crops=False),
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=PLAN.job_mem_mb("kernel_merge", PLAN.merge_estimate),
        runtime=PLAN.job_runtime("kernel_merge"),
    params:
        shards=PLAN.kernel_shard_dirs,
        dtype=PLAN.storage_arg,
        out=output_dir,
    shell:
        "python -m neural_kernels kernel-merge {params.shards}{params.dtype}"
        " --out-dir {params.out:q} > {log:q} 2>&1"


use rule kernel_merge as kernel_merge_subset with:
    output:
        files(layout.kernel_dir(), kernel_files(fits_val=False)),
    wildcard_constraints:
        view=SUBSET_VIEW,
        kernel=PLAN.kernels_of("estimate"),


rule kernel_analytic:
    input:
        unpack(PLAN.kernel_inputs),
    output:
        files(layout.kernel_dir(), kernel_files(fits_val=True)),
    log:
        log_file("kernel_analytic", "{dataset}/{view}/{kernel}"),
    benchmark:
        benchmark_file("kernel_analytic", layout.kernel_dir())
    wildcard_constraints:
        view=FULL_VIEW,
        kernel=PLAN.kernels_of("analytic", crops=False),
    conda:
        CONDA_ENV
    threads: PLAN.job_threads
    resources:
        mem_mb=PLAN.job_mem_mb("kernel_analytic", PLAN.analytic_estimate),
        runtime=PLAN.job_runtime("kernel_analytic"),
        gpu=PLAN.job_gpus,
    params:
        args=PLAN.analytic_args,
        out=output_dir,
    shell:
        "python -m neural_kernels kernel-analytic {params.args} --out-dir {params.out:q}"
        " > {log:q} 2>&1"


use rule kernel_analytic as kernel_analytic_subset with:
    output:
        files(layout.kernel_dir(), kernel_files(fits_val=False)),
    wildcard_constraints:
        view=SUBSET_VIEW,
        kernel=PLAN.kernels_of("analytic"),


# A full split's kernel augmented by crops: the same rules, with val's centre crops as
# an eval block too (the selection scores them; the fitted val rows are random crops).


use rule kernel_estimate_shard as kernel_estimate_shard_crops with:
    output:
        temp(files(layout.shard_dir(), shard_files(fits_val=True, crops=True))),
    wildcard_constraints:
        view=FULL_VIEW,
        kernel=PLAN.kernels_of("estimate", crops=True),


use rule kernel_merge as kernel_merge_crops with:
    output:
        files(layout.kernel_dir(), kernel_files(fits_val=True, crops=True)),
    wildcard_constraints:
        view=FULL_VIEW,
        kernel=PLAN.kernels_of("estimate", crops=True),


use rule kernel_analytic as kernel_analytic_crops with:
    output:
        files(layout.kernel_dir(), kernel_files(fits_val=True, crops=True)),
    wildcard_constraints:
        view=FULL_VIEW,
        kernel=PLAN.kernels_of("analytic", crops=True),
