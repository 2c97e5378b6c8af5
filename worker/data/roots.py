"""Where a worker may read data files: its data roots (`psctl worker --data-root DIR`).

A job names its data (`npz:PATH`, `idx:DIR`) and any client of the
scheduler can submit a job, so a worker reads only under the directories
its operator gave it. A path is allowed when its real path (`~` expanded,
symlinks resolved, `..` removed: os.path.realpath) lies inside the real
path of one of the roots (os.path.commonpath, not a string prefix). A
relative path is looked up in each root in turn: the first root in which it
names an existing file or directory is used; if it exists in none, the first
root it stays inside is used (so the error says it is missing there); if it
escapes every root, it is refused. With no roots only the built-in sources
(sklearn:digits, synthetic:...) work.

A refusal is one sentence that names the source as the job wrote it and the
worker's roots, and nothing else: the same text whether the path exists or
not, no OS error text, and nothing outside the roots is opened or stat'ed
before the check (resolving symlinks is all realpath does). The loaders then
open the resolved real path, never the text of the job.

`roots=None` means no restriction: `psctl train-local` reads the user's own
files in the user's own process, relative paths from the current directory.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from worker.data.base import DataError

ENV_VAR = "PSCLUSTER_DATA_ROOTS"
BUILT_IN = "sklearn:digits and synthetic:..."


def roots_from_env(value: str | None) -> tuple[str, ...]:
    """The directories in a PSCLUSTER_DATA_ROOTS value (os.pathsep-separated; empty entries skipped)."""
    if not value:
        return ()
    return tuple(part.strip() for part in value.split(os.pathsep) if part.strip())


def _real(path: str) -> str:
    return os.path.realpath(os.path.expanduser(path))


def real_roots(dirs: Iterable[str]) -> tuple[str, ...]:
    """The real paths of `dirs`, each once, in the order given (nothing is checked to exist)."""
    out: list[str] = []
    for d in dirs:
        real = _real(str(d))
        if real not in out:
            out.append(real)
    return tuple(out)


def check_roots(dirs: Iterable[str]) -> tuple[str, ...]:
    """real_roots(dirs), or ValueError naming the first one that is not a directory (for the CLI)."""
    dirs = list(dirs)
    for d in dirs:
        if not os.path.isdir(_real(str(d))):
            raise ValueError(f"data root {d}: expected a directory, found none")
    return real_roots(dirs)


def is_within(path: str, root: str) -> bool:
    """True if the real path `path` is `root` or lies below it (both real and absolute)."""
    try:
        return os.path.commonpath([root, path]) == root
    except ValueError:  # different drives, or one relative
        return False


def outside_message(source: str, roots: Sequence[str], member: str | None = None) -> str:
    """The one sentence of a refusal: the source as written, which file in it (idx), the roots."""
    what = f"data.source {source}" + (f" ({member})" if member else "")
    where = ", ".join(roots) if roots else f"none: only {BUILT_IN} are built in"
    return f"{what} is outside this worker's data roots ({where}); start workers with --data-root"


class PathGuard:
    """The paths of one data source, checked against the roots (None: anywhere) before anything opens them."""

    def __init__(self, source: str, roots: Sequence[str] | None):
        self.source = source
        self.roots = None if roots is None else real_roots(roots)

    def _refused(self, member: str | None = None) -> DataError:
        return DataError(outside_message(self.source, self.roots or (), member))

    def _inside(self, path: str) -> str | None:
        """The real path of `path` if it lies inside a root, else None (ValueError: a NUL byte)."""
        try:
            real = _real(path)
        except (OSError, ValueError):
            return None
        return real if any(is_within(real, r) for r in self.roots) else None

    def resolve(self, path_str: str) -> Path:
        """The path a source names, to open: its real path inside a root, or DataError (the refusal)."""
        if self.roots is None:
            return Path(path_str).expanduser()
        expanded = os.path.expanduser(path_str)
        if os.path.isabs(expanded):
            real = self._inside(expanded)
            if real is None:
                raise self._refused()
            return Path(real)
        first = None
        for root in self.roots:
            try:
                real = _real(os.path.join(root, expanded))
            except (OSError, ValueError):
                continue
            if not is_within(real, root):
                continue
            if os.path.exists(real):  # inside this root: stat'ing it reveals nothing outside
                return Path(real)
            first = first or real
        if first is None:
            raise self._refused()
        return Path(first)

    def member(self, path: Path) -> Path:
        """A file inside an allowed directory (idx): its real path if that is inside a root too, else DataError."""
        if self.roots is None:
            return path
        real = self._inside(str(path))
        if real is None:
            raise self._refused(path.name)
        return Path(real)
