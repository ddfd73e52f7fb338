"""Several rollout stores read as one: the shards of a grid (`vla-steer eval --shard`), each written alone.

`Stores` offers what the analysis reads of a `Store` (`episodes`, `load`, `len`). With more than one store,
episode ids are qualified by the store's position (`1:000003-1a2b3c4d`), since each store numbers its own.
An episode recorded twice (a complete episode whose task, setting and seed, as `vla-steer eval` records
them, another complete one already has: a shard run into two stores, a grid rerun into a fresh one) is
counted once, the first usable one (complete and undamaged) in store order, so pooled statistics do not
weigh it double; a damaged one of a grid is left out, as the grid's `eval.json` leaves it out (a rerun of
the grid records it again). `EpisodeInfo.grid_key` and `usable` say both, for the grid and for this.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from vla_steer.core.rollouts import Episode, EpisodeInfo, Store


class Stores:
    def __init__(self, stores: Sequence[Store]):
        if not stores:
            raise ValueError("no rollout store to read")
        self.stores = list(stores)
        self.duplicates = 0  # episodes left out by the last `episodes()` as recorded already
        self.damaged = 0  # grid episodes left out by the last `episodes()` as damaged

    def _qualify(self, i: int, episode_id: str) -> str:
        return episode_id if len(self.stores) == 1 else f"{i}:{episode_id}"

    def episodes(self) -> list[EpisodeInfo]:
        seen: set[tuple[str, str, int]] = set()
        out, self.duplicates, self.damaged = [], 0, 0
        for i, store in enumerate(self.stores):
            for info in store.episodes():
                key = info.grid_key
                if info.complete and key is not None:
                    if not info.usable:
                        self.damaged += 1
                        continue
                    if key in seen:
                        self.duplicates += 1
                        continue
                    seen.add(key)
                out.append(dataclasses.replace(info, id=self._qualify(i, info.id)))
        return out

    def load(self, episode_id: str, **kwargs) -> Episode:
        i, raw = 0, episode_id
        if len(self.stores) > 1:
            head, _, raw = episode_id.partition(":")
            if not head.isdigit() or int(head) >= len(self.stores):
                raise KeyError(f"{episode_id!r} names no store of these {len(self.stores)}")
            i = int(head)
        ep = self.stores[i].load(raw, **kwargs)
        ep.id = episode_id
        return ep

    def __len__(self) -> int:
        return sum(len(s) for s in self.stores)
