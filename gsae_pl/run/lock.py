"""One process at a time in a run folder (fit) or a suite folder (ablate).

Two `fit` on one run would both train into it (two event streams, checkpoints and a
metrics.json from either); two `ablate` on one suite would train every run twice. The lock
is an exclusive `fcntl.flock` on a file in the folder: the kernel drops it when its holder
exits however it exits, SIGKILL included, so a killed run never leaves a lock behind that
blocks its rerun. The file holds the holder's pid, for the refusal's message.

The holder deletes the file when done, and the folders it had to create if they are still
empty: a command refused before writing anything leaves nothing behind. Deleting a lock
file that another process may have just opened is the classic race; `acquire` closes it
by checking, once it holds the lock, that the path still names the file it locked.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from gsae_pl.errors import UserError
from gsae_pl.processes import is_first_process

RUN_LOCK = ".fit.lock"  # in <output.dir>/<output.name>/
SUITE_LOCK = ".ablate.lock"  # in the suite's output_dir: another file, so ablate's fits run


def takes_run_lock() -> bool:
    """Whether this process is the one a launcher started first, which alone locks the run.

    Lightning's DDP launcher reruns the command for local ranks > 0 with LOCAL_RANK set;
    torchrun and SLURM start every rank with its rank set (gsae_pl/suite/rendezvous.py reads them
    all). The others belong to the same run and must not be refused by their own rank 0's
    lock.
    """
    return is_first_process()


class FolderLock:
    """`with FolderLock(folder, name, setting, advice):` holds `folder/name` exclusively."""

    def __init__(self, folder: Path, name: str, setting: str, advice: str):
        self.folder, self.path = Path(folder), Path(folder) / name
        self.setting, self.advice = setting, advice  # for the messages
        self.fd: int | None = None
        self.created: list[Path] = []  # folders this lock made, outermost first

    def __enter__(self) -> FolderLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        for _ in range(100):  # a retry each time a holder deleted the file we had opened
            fd = self._open()
            if fd is None:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = _read_pid(fd)
                os.close(fd)
                self._remove_folders()
                raise UserError(f"{self.folder} is in use by another process (pid {pid}); "
                                f"wait for it or {self.advice}") from None
            if _names(self.path, fd):
                self.fd = fd
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                return
            os.close(fd)
        self._remove_folders()
        raise UserError(f"{self.folder}: its lock file {self.path.name} keeps being replaced; "
                        "stop the other processes using the folder and retry")

    def _open(self) -> int | None:
        """The lock file, created if need be; None if its folder vanished meanwhile (a
        holder that had made it removed it on exit): the caller tries again."""
        try:
            self._make_folders()
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except FileNotFoundError:
            return None
        except OSError as err:
            self._remove_folders()
            raise self._cannot_write(err) from None

    def release(self) -> None:
        if self.fd is None:
            return
        # Unlink before unlocking: a process that opened this file meanwhile sees, once it
        # gets the lock, that the path no longer names it, and starts over.
        self.path.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = None
        self._remove_folders()

    def _make_folders(self) -> None:
        missing, folder = [], self.folder
        while not folder.exists() and folder != folder.parent:
            missing.append(folder)
            folder = folder.parent
        for folder in reversed(missing):
            try:
                folder.mkdir()
                self.created.append(folder)
            except FileExistsError:
                if not folder.is_dir():
                    self._remove_folders()
                    raise self._cannot_write(OSError(errno.ENOTDIR, "")) from None
            except FileNotFoundError as err:
                if not folder.parent.is_dir():
                    raise  # a parent vanished meanwhile (its maker's exit): _open retries
                self._remove_folders()
                raise self._cannot_write(err) from None
            except OSError as err:
                self._remove_folders()
                raise self._cannot_write(err) from None

    def _remove_folders(self) -> None:
        """The folders this lock made, innermost first, while they are empty."""
        for folder in reversed(self.created):
            try:
                folder.rmdir()
            except OSError:
                break  # something was written there: keep it and every folder above
        self.created = []

    def _cannot_write(self, err: OSError) -> UserError:
        if err.errno in (errno.ENOTDIR, errno.EEXIST):
            blocker = next((p for p in [self.folder, *self.folder.parents] if p.is_file()),
                           self.folder)
            return UserError(f"{self.setting}: {blocker} is a file, not a folder: set "
                             f"{self.setting} to a folder (or move the file)")
        reason = err.strerror or type(err).__name__
        return UserError(f"{self.setting}: cannot write in {self.folder} ({reason}): set "
                         f"{self.setting} to a folder you can write to")


def _read_pid(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode().strip()
    except OSError:
        return "unknown"
    return text if text.isdigit() else "unknown"  # empty: its holder is just starting


def _names(path: Path, fd: int) -> bool:
    """Whether `path` still names the open file `fd` (it was not deleted or replaced)."""
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (on_disk.st_dev, on_disk.st_ino) == (held.st_dev, held.st_ino)
