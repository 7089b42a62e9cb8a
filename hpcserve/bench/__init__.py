"""`hpcserve bench`: load sweeps over concurrency with aiperf, validated, tabled and plotted.

- `sweep.py`: the orchestration: the target (a config started here and stopped after, a
  Slurm job, a URL), one aiperf run per concurrency, progress, the run folder.
- `aiperf_run.py`: aiperf's command line for one point, running it, reading its exports.
- `results.py`: the records (one per point, one per run), the validity rules, the pareto
  frontier, JSON/CSV in and out.
- `plots.py`: the PNGs (pareto of tok/s/GPU against tok/s/user, latency against concurrency),
  one run or several overlaid (`hpcserve bench compare`).

aiperf is the optional extra `bench` (`pip install 'hpcserve[bench]'`), imported by nothing
here: it runs as a process, so only a sweep needs it installed.
"""
