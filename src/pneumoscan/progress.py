"""Progress bars, drawn on a terminal only: a log file that stderr goes to gets no bar lines."""

from __future__ import annotations


def progress_bar(total: int, desc: str, unit: str, *, enabled: bool = True):
    from tqdm import tqdm  # here: building the command line must not wait for it

    # disable=None is tqdm's "only when stderr is a terminal"; True turns it off regardless.
    return tqdm(total=total, desc=desc, unit=unit, disable=None if enabled else True, leave=False)


def format_duration(seconds: float) -> str:
    """A duration as people say it: "45 s", "6 min 11 s", "5 h 20 min"."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds} s" if seconds else f"{minutes} min"
    hours, minutes = divmod(minutes + (seconds >= 30), 60)
    return f"{hours} h {minutes} min" if minutes else f"{hours} h"


def time_left(epoch_seconds: list[float], epochs_left: int) -> float:
    """Seconds the remaining epochs should take, from the ones done.

    The first epoch carries one-time costs (compilation, cuDNN's choice of algorithms, warm
    caches), so once later epochs exist it is left out of the average.
    """
    if not epoch_seconds or epochs_left <= 0:
        return 0.0
    typical = epoch_seconds[1:] or epoch_seconds
    return sum(typical) / len(typical) * epochs_left
