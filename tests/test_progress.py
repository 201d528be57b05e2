"""Progress bars in a log file: a redraw at most once a minute, not ten a second."""

from __future__ import annotations

import time

from largemim.progress import LOG_INTERVAL_S, progress_bar


def test_a_bar_in_a_log_file_redraws_at_most_once_a_minute(capsys):
    """On a terminal each redraw overwrites the last; in a Slurm log each one stays (a line in ``less``),
    so there a bar shows its start and its end, and a line a minute between."""
    assert LOG_INTERVAL_S >= 30
    with progress_bar(total=1000, desc="work", unit="img") as bar:  # capsys' stderr is not a terminal
        deadline = time.monotonic() + 0.5  # five of tqdm's default 0.1 s intervals
        while time.monotonic() < deadline:
            bar.update(1)
            time.sleep(0.002)
    err = capsys.readouterr().err
    assert err.count("\r") == 2, err  # the start and the end
    assert "work:" in err and f"{bar.n}/1000" in err, err
    with progress_bar(total=10, enabled=False) as bar:
        bar.update(10)
    assert capsys.readouterr().err == ""
