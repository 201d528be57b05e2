"""Launching runs on a Slurm cluster.

- ``largemim.launch.submit``: the ``largemim-submit`` CLI (submitit): submit, ``--dry-run``, ``--status``,
  ``--cancel``.
- ``largemim.launch.job``: what runs in each Slurm task; requeues the same job on the requeue signal.
- ``largemim.launch.slurm_env``: the process-group variables of a task, from SLURM's.
- ``largemim.launch.chain``: the run's record of its jobs (``RUN_DIR/slurm/chain.jsonl``) and the status view.
- ``largemim.launch.time_limit``: Slurm's time formats; the partition's time limit when ``--time`` is not given.

The sbatch templates for ``srun`` + ``torchrun`` and for the ``deepspeed`` CLI are in ``slurm/``.
"""
