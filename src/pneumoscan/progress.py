"""Progress bars, drawn on a terminal only: a log file that stderr goes to gets no bar lines."""

from __future__ import annotations


def progress_bar(total: int, desc: str, unit: str, *, enabled: bool = True):
    from tqdm import tqdm  # here: building the command line must not wait for it

    # disable=None is tqdm's "only when stderr is a terminal"; True turns it off regardless.
    return tqdm(total=total, desc=desc, unit=unit, disable=None if enabled else True, leave=False)
