"""What every entry point shares: bad input is one line on stderr and exit code 2;
a run that fails part-way (`RunFailed`) is one line and exit code 3, or 128 + the signal
for one a signal stopped (`preemption.Preempted`: 143 for SIGTERM), 141 when the reader of
stdout left (`| head`), without a traceback; the CPU allocator set
up for training (gsae_pl/allocator.py)."""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
from collections.abc import Callable

from gsae_pl import allocator
from gsae_pl.errors import RunFailed, UserError


def run_main(job: Callable[[], int]) -> int:
    # Here, not at import: a library user's process (say, a notebook calling load_sae)
    # keeps its allocator; a command sets it before its first large tensor.
    allocator.configure()
    try:
        return job()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RunFailed as err:
        # Under DDP every process stops with the same message; the extra ranks say who they are.
        print(f"{_rank_prefix()}error: {err}", file=sys.stderr)
        return getattr(err, "exit_code", 3)
    except BrokenPipeError:
        # The reader of stdout left (`... | head`): nothing more to say to anyone. Point
        # stdout at /dev/null so the interpreter's last flush cannot fail again, and exit as
        # a process SIGPIPE ended would (Python ignores SIGPIPE, so the write raised).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except Exception as err:
        disk = disk_error_in(err)
        if disk is None:
            raise
        print(f"{_rank_prefix()}error: {disk_error_line(disk, err)}", file=sys.stderr)
        return 3


# A disk that fills up or turns read-only under a running command: the user's to fix, not
# a bug, so one line (what and where) instead of a traceback. Writes are atomic
# (gsae_pl/io.py), so the checkpoints already on disk are whole.
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES)


def _chain(err: BaseException):
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def disk_error_in(err: BaseException) -> OSError | None:
    """The disk error behind `err`: torch.save, for one, turns ENOSPC into a RuntimeError
    raised while handling it, and Lightning's teardown may add more."""
    return next((e for e in _chain(err) if isinstance(e, OSError) and e.errno in DISK_ERRNOS),
                None)


def _path_being_written(err: BaseException) -> str | None:
    """The innermost `path`/`filepath` argument on the failing call stack (torch.save into
    an open file reports no file name of its own)."""
    for exc in _chain(err):
        tb, frames = exc.__traceback__, []
        while tb is not None:
            frames.append(tb.tb_frame)
            tb = tb.tb_next
        for frame in reversed(frames):
            for name in ("path", "filepath"):
                value = frame.f_locals.get(name)
                if isinstance(value, (str, os.PathLike)):
                    return os.fspath(value)
    return None


def disk_error_line(disk: OSError, err: BaseException) -> str:
    path = disk.filename or _path_being_written(err)
    where = f": {path}" if path else ""
    return (f"{disk.strerror or os.strerror(disk.errno)}{where}: the command stopped; free "
            "space or fix permissions there, then rerun it (fit resumes from its newest "
            "checkpoint)")


def _rank_prefix() -> str:
    local_rank = os.environ.get("LOCAL_RANK", "0")
    return f"local process {local_rank}: " if local_rank != "0" else ""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is a `UserError` (one line, exit 2) like any bad input."""

    def error(self, message: str):
        raise UserError(f"{message} (see python -m {self.prog.split()[-1]} --help)")


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """`--config FILE [FILE ...]` (merged in order, gsae_pl/config.py) and `key=value` overrides.

    `--config` may be given more than once (decision): every file given, in the order given,
    then every key=value, in the order given. argparse's default would keep only the last
    `--config` list and drop the files and the key=value written between them without a
    word (`--config gated.yaml sae.d_sae=64 --config baseline.yaml` trained d_sae 768).
    The key=value always win over the files, wherever they stand, as with one `--config`."""
    parser.add_argument("--config", required=True, nargs="+", action="extend", metavar="FILE",
                        help="YAML config(s), merged in order (e.g. configs/base.yaml); "
                        "repeating --config adds files, and key=value win over every file")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. sae.d_sae=2048")


def parse_config_arguments(parser: argparse.ArgumentParser,
                           argv: list[str] | None) -> argparse.Namespace:
    """Parse; a `key=value` written right after the config files belongs to the overrides
    (`--config a.yaml sae.d_sae=64`), which nargs="+" alone would take for a file."""
    args = parser.parse_intermixed_args(argv)
    files = [item for item in args.config if "=" not in item]
    args.overrides = [item for item in args.config if "=" in item] + args.overrides
    if not files:
        parser.error("--config needs at least one YAML file before any key=value")
    args.config = files
    return args
