"""Slurm launcher: one deployment config becomes one Slurm job.

render.py (config → sbatch script, template in templates/), supervise.py (the job's one
supervisor call), job_prepare.py (at job start: node slicing, resolved config, the plan's
argv), slicing.py (which nodes run which worker group), steps.py and srun.py (each process as
an srun step), state.py (the job's state.json), jobs.py (sbatch/submitit, status, logs,
cancel), lifecycle.py (time limit, preemption, removal), benchmark.py (the sweep step),
deployment.py, successor.py, worker_job.py and gateway.py (a deployment across jobs),
allocation.py (`up --in-allocation`), testing/ (the namespace test cluster, for the tests).
"""
