"""Scratch directories in the system temporary folder that a killed process cannot leak.

A push saves the checkpoint into a scratch directory before uploading it, an export of a model in
memory saves it there first, a load pins the files it reads with links there. Each scratch
directory is ``<tmp>/hfcompress-<purpose>-<random>.scratch``, locked (``flock``) by its owner for
as long as it is in use; a process killed meanwhile loses the lock (the kernel drops it), and the
next scratch directory made by any hfcompress process of the same user removes every unlocked one.

The directory is created under a private name (``.hfcompress-new-...``), locked, and only then
renamed to its public name, so a concurrent clean-up never sees it unlocked.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
import time
from typing import Callable, Iterator

from .atomic import _try_lock, remove_if_unlocked

PREFIX = "hfcompress-"
SUFFIX = ".scratch"
_NEW = ".hfcompress-new-"
_NEW_STALE_S = 600  # a private name lives for microseconds; one this old was left by a kill


def clean_stale_scratch() -> list[str]:
    """Remove the scratch directories that killed hfcompress processes of this user left in the
    temporary folder (those nobody holds locked). Returns the removed paths."""
    root = tempfile.gettempdir()
    removed = []
    try:
        entries = os.listdir(root)
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        public = entry.startswith(PREFIX) and entry.endswith(SUFFIX)
        if not public and not entry.startswith(_NEW):
            continue
        path = os.path.join(root, entry)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if not os.path.isdir(path) or os.path.islink(path) or st.st_uid != os.getuid():
            continue
        if not public and now - st.st_mtime < _NEW_STALE_S:
            continue
        if remove_if_unlocked(path):  # else: in use
            removed.append(path)
    return removed


def make_scratch(purpose: str) -> tuple[str, Callable[[], None]]:
    """A fresh, locked scratch directory and the function that removes it (and drops the lock).
    Stale ones left by killed processes are removed first."""
    clean_stale_scratch()
    private = tempfile.mkdtemp(prefix=_NEW)
    fd = _try_lock(private)
    if fd is None:  # cannot happen for a directory we just made, unless flock is unsupported
        shutil.rmtree(private, ignore_errors=True)
        raise OSError(f"cannot lock the scratch directory {private}")
    path = os.path.join(os.path.dirname(private), f"{PREFIX}{purpose}-{secrets.token_hex(8)}{SUFFIX}")
    try:
        os.rename(private, path)
    except OSError:
        os.close(fd)
        shutil.rmtree(private, ignore_errors=True)
        raise

    def release() -> None:
        try:
            shutil.rmtree(path, ignore_errors=True)
        finally:
            os.close(fd)

    return path, release


@contextlib.contextmanager
def scratch_dir(purpose: str) -> Iterator[str]:
    """``with scratch_dir("push") as tmp:`` a locked scratch directory, removed on exit."""
    path, release = make_scratch(purpose)
    try:
        yield path
    finally:
        release()
