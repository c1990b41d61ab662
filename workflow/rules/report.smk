# The report: every thesis table and timing beside ours, from the results of the run.
# Re-render from existing (e.g. copied) results without Snakemake: neural-kernels report


rule report:
    input:
        results=PLAN.report_inputs(),
        thesis="report/thesis.yaml",
        templates=expand("report/templates/report.{kind}.j2", kind=["html", "md"]),
    output:
        "report/report.html",
        "report/report.md",
    log:
        log_file("report", "report"),
    benchmark:
        benchmark_file("report", "report")
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=PLAN.job_mem_mb("report", PLAN.small_job),
        runtime=PLAN.job_runtime("report"),
    params:
        config=json.dumps(config, sort_keys=True),
        templates=lambda wildcards, input: os.path.dirname(input.templates[0]),
    shell:
        f"python -m neural_kernels report --results {layout.RESULTS} --out-dir report"
        " --thesis {input.thesis:q} --templates {params.templates:q}"
        " --config-json {params.config:q} > {log:q} 2>&1"
