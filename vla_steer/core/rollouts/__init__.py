"""The rollout store: every simulator/robot node writes its episodes here, every offline analysis reads them.

Torch-free on purpose (the LIBERO node writes rollouts from its own environment): the writer and reader need
only the standard library, numpy and msgpack. `Store.to_pandas` needs pandas, `write_video` PyAV, and
`export_lerobot` pyarrow, pandas and PyAV. Nothing is ever pickled.

    format    the framed record (magic + lengths + crc32, msgpack header, raw arrays) and value checks
    files     the store's marker, atomic JSON, directory fsync, the id-claiming lock, the live-log lock
    writer    Recorder (claims episode ids) -> EpisodeWriter (appends one episode as it happens)
    damage    walk: every intact record of a log, resynchronising after damage; Damage (where, why)
    episode   EpisodeInfo and Episode, what the reader gives back (with what damage cost)
    reader    open_store -> Store: list and load (checked against the log, damage reported), to_pandas
    repair    repair_episode / repair_store: rewrite damaged logs with their intact records, keep a backup
    export    export_lerobot: the LeRobot v3.0 layout
    video     write_video and the mp4 encoder export uses
    recorder  EpisodeRecorder: the one recorder of sim and robot nodes, `Step`s in, episodes and events out

Images are stored raw: two 224x224 RGB cameras are ~300 KB per step (~90 MB for a 300-step episode).
"""

from vla_steer.core.rollouts.damage import Damage
from vla_steer.core.rollouts.episode import Episode, EpisodeInfo
from vla_steer.core.rollouts.export import export_lerobot
from vla_steer.core.rollouts.format import SchemaError
from vla_steer.core.rollouts.reader import Store, open_store
from vla_steer.core.rollouts.recorder import EpisodeRecorder, Event
from vla_steer.core.rollouts.repair import Repair, repair_episode, repair_store
from vla_steer.core.rollouts.video import write_video
from vla_steer.core.rollouts.writer import EpisodeWriter, Recorder

__all__ = [
    "Damage",
    "Episode",
    "EpisodeInfo",
    "EpisodeRecorder",
    "EpisodeWriter",
    "Event",
    "Recorder",
    "Repair",
    "SchemaError",
    "Store",
    "export_lerobot",
    "open_store",
    "repair_episode",
    "repair_store",
    "write_video",
]
