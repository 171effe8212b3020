"""Progress bars that suit where the output goes: a live tqdm bar on a terminal, a plain line now and then elsewhere.

tqdm redraws its bar with carriage returns; in a log file (nohup, sbatch, CI) those merge into one huge line.
Off a terminal the bar is therefore written as whole lines, at most one per ``LINE_INTERVAL`` seconds.
"""

from __future__ import annotations

import sys

LINE_INTERVAL = 30.0  # seconds between two progress lines in a log file
LINE_FORMAT = "{desc}: {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"


class _LineStream:
    """What tqdm writes, as whole lines: its ``\\r`` redraws become one line each, its blank clears nothing."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").strip()
        if text:
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def progress_bar(iterable=None, *, desc: str, disable: bool = False, stream=None, **kwargs):
    """``tqdm(iterable, desc=..., **kwargs)`` on ``stream`` (default stderr), in line mode when it is no terminal."""
    from tqdm import tqdm

    stream = sys.stderr if stream is None else stream
    if disable or _is_terminal(stream):
        return tqdm(iterable, desc=desc, disable=disable, file=stream, **kwargs)
    kwargs.pop("dynamic_ncols", None)

    class LineBar(tqdm):
        """Postfix and description changes wait for the next timed line instead of printing one each."""

        def set_postfix(self, ordered_dict=None, refresh=True, **kwargs):
            super().set_postfix(ordered_dict, refresh=False, **kwargs)

        def set_description(self, desc=None, refresh=True):
            super().set_description(desc, refresh=False)

    return LineBar(iterable, desc=desc, file=_LineStream(stream), mininterval=LINE_INTERVAL, delay=LINE_INTERVAL,
                   bar_format=LINE_FORMAT, ascii=True, **kwargs)
