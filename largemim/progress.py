"""Progress of the long steps (scanning an image folder, checking finished shards, writing shards, decoding
the eval images): tqdm bars on stderr.

On a terminal a bar redraws ten times a second. Elsewhere (a Slurm log, a pipe) every redraw stays in the
file, so there it redraws at most once a minute: a log gets a line a minute and the final count, not
thousands of lines.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

from tqdm import tqdm

LOG_INTERVAL_S = 60.0  # seconds between redraws when stderr is not a terminal


def progress_bar(iterable: Iterable | None = None, *, enabled: bool = True, **kwargs) -> tqdm:
    """A tqdm bar on stderr, shown only where ``enabled`` (e.g. on rank 0); ``kwargs`` go to tqdm."""
    stderr = sys.stderr  # looked up now: a test's captured stderr, or the real one
    if not stderr.isatty():
        # maxinterval too: tqdm's monitor thread would otherwise force a redraw every 10 s.
        kwargs = {"mininterval": LOG_INTERVAL_S, "maxinterval": LOG_INTERVAL_S, **kwargs}
    return tqdm(iterable, file=stderr, disable=not enabled, dynamic_ncols=True, **kwargs)
