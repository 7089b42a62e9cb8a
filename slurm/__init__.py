"""Slurm launcher: one deployment config becomes one Slurm job.

render.py (config → sbatch script, template in templates/), job_prepare.py (at job start:
node slicing, resolved config, the plan's argv per step), wait_ready.py (bounded readiness
polls), state.py (the job's state.json), jobs.py (sbatch/submitit, status, logs, cancel),
slicing.py (which nodes run which worker group), testing/ (the namespace test cluster).
"""
