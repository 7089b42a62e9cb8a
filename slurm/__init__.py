"""Slurm launcher: renders contract.plan into sbatch/srun steps; not built yet."""
