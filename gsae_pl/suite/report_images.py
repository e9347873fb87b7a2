"""The report's plots in TensorBoard: every PNG the report wrote (gsae_pl/suite/plots.py) also
goes, as an image summary `pareto/<file stem>`, into one event file under
`<output_dir>/report/`, so `tensorboard --logdir <output_dir>` shows the Pareto plots
under IMAGES (run `report`) beside the runs' own curves.

The report is rewritten whole each time, so the folder holds only the newest event file:
it is written to a temporary name in the folder (`.report.tmp<pid>`: no `tfevents` in it,
so TensorBoard ignores it, and a killed report's is swept by the next), then renamed into
place, and older event files are deleted (otherwise TensorBoard would show every earlier
state of the suite).
The PNG bytes go in as they are, with no decoding or re-encoding.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import socket
import time
from pathlib import Path

from PIL import Image
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.summary.writer.record_writer import RecordWriter

from gsae_pl.io import atomic_write, sweep_stale_temporaries

FOLDER = "report"
EVENTS = "events.out.tfevents.*"
CHANNELS = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}


def image_summary(tag: str, png: Path) -> Summary:
    with Image.open(png) as image:
        width, height, mode = image.width, image.height, image.mode
    picture = Summary.Image(height=height, width=width, colorspace=CHANNELS.get(mode, 4),
                            encoded_image_string=png.read_bytes())
    return Summary(value=[Summary.Value(tag=tag, image=picture)])


def write_images(suite_dir: Path, pngs: list[Path]) -> Path | None:
    """One event file under `<suite_dir>/report/` holding `pngs`; its path (None: no PNG)."""
    folder = Path(suite_dir) / FOLDER
    _sweep(folder)
    if not pngs:
        for old in folder.glob(EVENTS):
            old.unlink()
        return None
    events = [Event(wall_time=time.time(), file_version="brain.Event:2")]
    events += [Event(wall_time=time.time(), step=0,
                     summary=image_summary(f"pareto/{png.stem}", png)) for png in pngs]
    # TensorBoard's own file name (its readers want `events.out.tfevents.<time>...`).
    path = folder / f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}." \
                    f"{os.getpid()}.gsae_pl"
    atomic_write(path, lambda fh: _write_records(fh, events), temporary=_temporary(folder))
    for old in folder.glob(EVENTS):
        if old != path:
            old.unlink()
    return path


def _write_records(fh, events: list[Event]) -> None:
    records = RecordWriter(fh)
    for event in events:
        records.write(event.SerializeToString())


def _temporary(folder: Path) -> Path:
    """The write's temporary: in report/ itself, so TensorBoard never lists it as a run
    of its own, and with no `tfevents` in its name, so it never reads it as report's."""
    return folder / f".report.tmp{os.getpid()}"


def _sweep(folder: Path) -> None:
    """What a killed report left: its temporary, and the `.tmp-*` folders in which reports
    before this one wrote (each held one event file, which TensorBoard listed as a run)."""
    if not folder.is_dir():
        return
    sweep_stale_temporaries(folder, ".report.tmp*")
    for old in folder.glob(".tmp-*"):
        if old.is_dir() and not old.is_symlink() and \
                all(fnmatch.fnmatch(e.name, EVENTS) for e in old.iterdir()):
            shutil.rmtree(old)
