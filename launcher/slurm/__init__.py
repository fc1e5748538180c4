"""Slurm, all in one place: what baton submits, how it asks Slurm about its jobs, and how a job starts a stage.

- `driver`: `baton submit`, `baton job` (the body of a stage's job) and `baton cancel`.
- `sbatch`: a stage's job script, a pure function of its settings (golden files pin it).
- `srun`: the back-end that starts one torchrun per node inside a job or an allocation.
- `jobs`: what Slurm says about a run's jobs (squeue, scontrol, sacct), requeue and cancel.
- `calls`: every call to a Slurm command: a timeout, bounded tries while the controller is out of reach, and
  sbatch never twice for one job.
- `allocation.sbatch`: a whole manifest inside one allocation (`baton run` under srun).

Empty on purpose: `launcher.pipeline` imports `srun` and `launcher.report` imports `jobs` without loading the
driver, which sits above them both.
"""
