"""The job's time limit: Slurm's time formats, and the partition's limit when ``--time`` is not given.

submitit always writes a ``#SBATCH --time`` line (5 minutes when it is not told a value), so a job
cannot be left to the partition's default by saying nothing. Without ``--time``, ``largemim-submit``
asks ``sinfo`` for the partition's DefaultTime and passes that; a partition without one needs ``--time``.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass

from largemim.config import ConfigError

SINFO = ["sinfo", "--noheader", "--all", "--format=%P %L %l"]  # partition ('*': the default), DefaultTime, MaxTime
ASK_FOR_TIME = "give --time (minutes, or D-HH:MM:SS)"

# submitit's own signal handler (only in place for the start-up second or two, see job.py) computes with
# its ``time`` parameter, so it must stay a number: a year stands for "no limit" there, while the
# #SBATCH line says UNLIMITED.
SUBMITIT_UNLIMITED_MIN = 365 * 24 * 60


@dataclass(frozen=True)
class TimeLimit:
    minutes: int | None  # None: no limit
    source: str  # where it came from, shown by --dry-run and at submission

    @property
    def sbatch(self) -> str:
        return "UNLIMITED" if self.minutes is None else str(self.minutes)

    def describe(self) -> str:
        value = "UNLIMITED" if self.minutes is None else f"{self.minutes} min"
        return f"{value} ({self.source})"


def parse_slurm_time(text: str) -> int | None:
    """Minutes from Slurm's time formats, seconds rounded up as Slurm does; None for no limit.

    ``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM``, ``D-HH:MM:SS``; ``infinite``/``unlimited`` (any case).
    Raises ValueError for anything else, ``n/a`` (sinfo's "not set") included.
    """
    s = text.strip()
    if s.lower() in ("infinite", "unlimited", "-1"):
        return None
    days = hours = minutes = seconds = 0
    if m := re.fullmatch(r"(\d+)-(\d+)(?::(\d+))?(?::(\d+))?", s):
        days, hours, minutes, seconds = (int(g or 0) for g in m.groups())
    elif m := re.fullmatch(r"(\d+)(?::(\d+))?(?::(\d+))?", s):
        parts = [int(g) for g in m.groups() if g is not None]
        if len(parts) == 3:
            hours, minutes, seconds = parts
        else:
            minutes, seconds = (parts + [0])[:2]
    else:
        raise ValueError(f"{text!r} is not a Slurm time (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS, UNLIMITED)")
    total = ((days * 24 + hours) * 60 + minutes) * 60 + seconds
    return -(-total // 60)


def partition_time_limit(sinfo_out: str, partition: str | None) -> TimeLimit:
    """The limit a job gets in ``partition`` (None: the default one, marked '*') from ``sinfo`` output.

    ``sinfo_out`` has one ``NAME[*] DEFAULTTIME MAXTIME`` line per partition (:data:`SINFO`). A partition
    without a DefaultTime is an error asking for ``--time``. For a list (``--partition a,b``, the job runs in whichever
    starts it first) the shortest limit is taken, so it is valid in each.
    """
    table: dict[str, tuple[str, str]] = {}
    default = []
    for line in sinfo_out.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        name = fields[0].rstrip("*")
        if fields[0].endswith("*"):
            default.append(name)
        table.setdefault(name, (fields[1], fields[2]))
    known = ", ".join(table) or "none"
    if partition:
        names = [p.strip() for p in partition.split(",") if p.strip()]
        how = "partition"
    else:
        names, how = default[:1], "default partition"
        if not names:
            raise ConfigError(
                f"--time not given and sinfo marks no default partition (partitions: {known}); "
                f"give --partition, or {ASK_FOR_TIME}"
            )
    limits = []
    for name in names:
        if name not in table:
            raise ConfigError(
                f"--time not given and partition {name!r} is not in sinfo's list ({known}): "
                f"check --partition, or {ASK_FOR_TIME}"
            )
        default_time, max_time = table[name]
        if default_time.lower() == "n/a":
            # sbatch would give such a job the smaller of the partition's MaxTime and its QOS's MaxWall;
            # asking for MaxTime outright can exceed the QOS and leave the job pending for ever.
            raise ConfigError(
                f"--time not given and {how} {name!r} has no DefaultTime (MaxTime {max_time}); without one "
                f"sbatch takes the QOS's or the partition's maximum, which largemim cannot read reliably: "
                f"{ASK_FOR_TIME}"
            )
        try:
            minutes, what = parse_slurm_time(default_time), f"DefaultTime {default_time}"
        except ValueError:
            raise ConfigError(
                f"--time not given and sinfo gives {how} {name!r} no usable time limit "
                f"(DefaultTime {default_time}, MaxTime {max_time}): {ASK_FOR_TIME}"
            ) from None
        limits.append((float("inf") if minutes is None else minutes, minutes, f"{how} {name}: {what}"))
    _, minutes, what = min(limits, key=lambda limit: limit[0])
    return TimeLimit(minutes, f"{what}, from sinfo; --time not given")


def job_time_limit(time_arg: str | None, partition: str | None) -> TimeLimit:
    """The limit to pass to sbatch: ``--time``, else SBATCH_TIMELIMIT, else the partition's (``sinfo``)."""
    # sbatch reads these from the environment and they win over the script's #SBATCH lines.
    env_time = os.environ.get("SBATCH_TIMELIMIT")
    if time_arg is not None:
        if env_time:
            raise ConfigError(
                f"--time {time_arg} and SBATCH_TIMELIMIT={env_time} are both set, and sbatch would take "
                "SBATCH_TIMELIMIT: unset it, or leave out --time"
            )
        try:
            return TimeLimit(parse_slurm_time(time_arg), "--time")
        except ValueError as e:
            raise ConfigError(f"--time: {e}") from None
    if env_time:
        try:
            return TimeLimit(parse_slurm_time(env_time), "SBATCH_TIMELIMIT in the environment; --time not given")
        except ValueError as e:
            raise ConfigError(f"SBATCH_TIMELIMIT: {e}") from None
    env_partition = os.environ.get("SBATCH_PARTITION")
    if partition and env_partition and env_partition != partition:
        raise ConfigError(
            f"--partition {partition} and SBATCH_PARTITION={env_partition} are both set, and sbatch would "
            "take SBATCH_PARTITION: unset it, or leave out --partition"
        )
    partition = partition or env_partition or None
    try:
        proc = subprocess.run(SINFO, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ConfigError(
            f"--time not given and '{' '.join(SINFO)}' could not run ({e}) to read the "
            f"partition's time limit: {ASK_FOR_TIME}"
        ) from None
    if proc.returncode != 0:
        raise ConfigError(
            f"--time not given and '{' '.join(SINFO)}' failed ({proc.returncode}: "
            f"{proc.stderr.strip()}) reading the partition's time limit: {ASK_FOR_TIME}"
        )
    return partition_time_limit(proc.stdout, partition)
