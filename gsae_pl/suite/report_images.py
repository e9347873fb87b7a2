"""The report's plots in TensorBoard: every PNG the report wrote (gsae_pl/suite/plots.py) also
goes, as an image summary `pareto/<file stem>`, into one event file under
`<output_dir>/report/`, so `tensorboard --logdir <output_dir>` shows the Pareto plots
under IMAGES (run `report`) beside the runs' own curves.

The report is rewritten whole each time, so the folder holds only the newest event file:
it is written in a temporary folder inside, then renamed into place, and older event
files are deleted (otherwise TensorBoard would show every earlier state of the suite).
The PNG bytes go in as they are, with no decoding or re-encoding.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from PIL import Image
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.summary.writer.event_file_writer import EventFileWriter

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
    if not pngs:
        for old in folder.glob(EVENTS):
            old.unlink()
        return None
    folder.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".tmp-") as tmp:
        writer = EventFileWriter(tmp)
        for png in pngs:
            writer.add_event(Event(wall_time=time.time(), step=0,
                                   summary=image_summary(f"pareto/{png.stem}", png)))
        writer.close()
        [written] = Path(tmp).glob(EVENTS)
        for old in folder.glob(EVENTS):
            old.unlink()
        path = folder / written.name
        os.replace(written, path)
    return path
