"""Claiming an output folder that a command fills and later resumes (the demo, a benchmark grid).

Both commands reuse what they find in their folder, so pointed at someone else's folder they could overwrite
its files or resume its runs. A folder is theirs when it is new or empty, holds their marker file, or holds
nothing but the entries they write (folders made before markers existed).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from mnseg.errors import MnsegError

__all__ = ["claim_output_folder"]


def claim_output_folder(out: Path, marker: str, own_entries: Iterable[str], what: str, option: str) -> None:
    """Create ``out`` if needed and mark it as ``what``'s; MnsegError (naming ``option``) for a folder that is not."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MnsegError(f"{out}: exists and is not a folder; give a new or empty folder to {option}")
    entries = {p.name for p in out.iterdir()} if out.exists() else set()
    if entries and marker not in entries and not entries <= {marker, *own_entries}:
        shown = ", ".join(sorted(entries)[:5]) + (", ..." if len(entries) > 5 else "")
        raise MnsegError(f"{out}: not empty and not a {what} folder (holds {shown}); give a new or empty folder to "
                         f"{option} (a {what} folder is reused: running the same command again continues it)")
    out.mkdir(parents=True, exist_ok=True)
    (out / marker).touch()
