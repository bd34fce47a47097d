"""Atomic checkpoint saves: write into a sibling temporary directory, then swap it in.

The temporary directory ``.<name>.<random>.tmp`` is locked (``flock``) by its writer for as long
as it is written; a save killed midway leaves it unlocked (the kernel drops the lock of a dead
process), and the next save to the same directory removes every unlocked one.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import os
import re
import shutil
import tempfile
import time
from typing import Callable

from .card_data import ORIGINAL_CARD
from .cards import is_generated_card

_WEIGHT_FILE = re.compile(
    r"^(model|pytorch_model|tf_model|flax_model|adapter_model)(-\d{5}-of-\d{5})?"
    r"\.(safetensors|bin|h5|msgpack|pt)(\.index\.json)?$|\.(safetensors|bin)\.index\.json$")


_NEW = ".new"  # suffix of a temporary directory in the instant before its writer locks it
_NEW_STALE_S = 60.0  # an unlocked ``.new`` directory older than this was left by a killed save


def _exchange(a: str, b: str) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _carry_over_(old: str, new: str) -> None:
    """Keep what the previous directory held besides the checkpoint itself (tokenizer, notes,
    a hand-written card) unless the new save wrote a file of the same name."""
    for name in os.listdir(old):
        src, dst = os.path.join(old, name), os.path.join(new, name)
        if name.startswith(".") and name.endswith(".tmp") or _WEIGHT_FILE.search(name):
            continue
        if name == "README.md":
            if is_generated_card(src):
                continue
            dst = os.path.join(new, ORIGINAL_CARD)
        if os.path.lexists(dst):
            continue
        if os.path.isdir(src) and not os.path.islink(src):
            shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(src, dst)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _try_lock(path: str) -> int | None:
    """An exclusive non-blocking ``flock`` on a directory: its fd, or ``None`` if someone holds it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def remove_if_unlocked(path: str) -> bool:
    """Remove the directory ``path`` unless a live process holds it locked; True if removed."""
    fd = _try_lock(path)
    if fd is None:
        return False
    try:
        shutil.rmtree(path, ignore_errors=True)
    finally:
        os.close(fd)
    return True


def clean_stale_(directory: str | os.PathLike) -> list[str]:
    """Remove the temporary directories that killed saves to ``directory`` left beside it (those
    no live writer holds locked). Returns the removed paths."""
    parent, name = os.path.split(os.path.abspath(os.fspath(directory)))
    removed = []
    try:
        entries = os.listdir(parent)
    except OSError:
        return removed
    for entry in entries:
        young = entry.endswith(_NEW)  # made by a save that may not have locked it yet
        if not (entry.startswith(f".{name}.") and (entry.endswith(".tmp") or young)):
            continue
        path = os.path.join(parent, entry)
        if not os.path.isdir(path) or os.path.islink(path):
            continue
        if young:
            try:
                if time.time() - os.stat(path).st_mtime < _NEW_STALE_S:
                    continue
            except OSError:
                continue
        if remove_if_unlocked(path):  # else: a save in progress
            removed.append(path)
    return removed


def atomic_save(directory: str | os.PathLike, write: Callable[[str], None],
                finish: Callable[[str], None] | None = None) -> str:
    """Run ``write(tmp_dir)`` in a fresh sibling directory, then put it in place of ``directory``.

    ``finish(tmp_dir)`` runs after the files of the old directory were carried over (the
    card is written there, so it can see a kept ORIGINAL_README.md).
    An exception inside ``write`` leaves ``directory`` exactly as it was (or absent, if it did
    not exist) and removes the temporary directory. Files of the old directory that are not
    part of a checkpoint (tokenizer, other notes) are carried over; stale weight shards are not.
    """
    directory = os.path.abspath(os.fspath(directory))
    if os.path.isfile(directory):
        raise NotADirectoryError(f"save directory {directory} is a file; pass a directory path")
    parent, name = os.path.split(directory)
    os.makedirs(parent, exist_ok=True)
    clean_stale_(directory)
    # Made under a name the clean-up above ignores while young, locked, and only then renamed to
    # its ``.tmp`` name: a concurrent save's clean-up never sees it unlocked.
    fresh = tempfile.mkdtemp(prefix=f".{name}.", suffix=_NEW, dir=parent)
    lock = _try_lock(fresh)  # held until the swap: a concurrent save's clean-up leaves this one alone
    tmp = fresh[: -len(_NEW)] + ".tmp"
    try:
        os.rename(fresh, tmp)
    except OSError:
        if lock is not None:
            os.close(lock)
        shutil.rmtree(fresh, ignore_errors=True)
        raise
    try:
        return _write_and_swap(directory, tmp, write, finish)
    finally:
        if lock is not None:
            os.close(lock)


def _write_and_swap(directory: str, tmp: str, write, finish) -> str:
    parent, name = os.path.split(directory)
    try:
        write(tmp)
        if os.path.isdir(directory):
            _carry_over_(directory, tmp)
        if finish is not None:
            finish(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp made it private
    if not os.path.exists(directory):
        os.rename(tmp, directory)
        return directory
    cwd = os.getcwd()
    if _exchange(tmp, directory):  # tmp now holds the old checkpoint
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        old = tempfile.mkdtemp(prefix=f".{name}.old.", suffix=".tmp", dir=parent)
        os.rmdir(old)
        os.rename(directory, old)
        os.rename(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
    if cwd == directory or cwd.startswith(directory + os.sep):
        os.chdir(cwd)  # the process was inside the replaced directory: enter the new one
    return directory
