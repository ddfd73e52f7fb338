"""`vla-steer store check|repair`: find damaged episode logs in a rollout store, and rewrite them."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

_RUN_DIR_HELP = "a rollout store, or a run directory holding one in rollouts/"


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "store",
        help="check or repair the episode logs of a rollout store",
        description="Check every episode log of a rollout store record by record (crc included), or repair "
        "the damaged ones.",
    )
    cmds = p.add_subparsers(dest="store_command", required=True)
    check = cmds.add_parser(
        "check",
        help="report each episode: ok, incomplete, damaged (what was lost, where) or steps lost",
        description="Report each episode: ok, incomplete (no end record: a crash or abort), damaged "
        "(unreadable bytes: where, and which steps were lost) or steps lost (a repaired log that misses "
        "recorded steps). Exit status 1 if any episode is damaged.",
    )
    check.add_argument("run_dir", type=Path, help=_RUN_DIR_HELP)
    check.set_defaults(func=cmd_check)
    repair = cmds.add_parser(
        "repair",
        help="rewrite damaged logs with every intact record, keeping the originals as backups",
        description="Rewrite each damaged episode log with every intact record (byte for byte), atomically, "
        "keeping the original beside it as log.bin.damaged-<time>-<hex>. Lost steps stay lost: the listing "
        "keeps reporting them. Episodes being recorded are left alone (exit status 1).",
    )
    repair.add_argument("run_dir", type=Path, help=_RUN_DIR_HELP)
    repair.set_defaults(func=cmd_repair)


def cmd_check(args) -> int:
    from vla_steer.core.rollouts.files import is_being_written
    from vla_steer.core.rollouts.format import LOG

    store = _open(args.run_dir)
    counts: Counter[str] = Counter()
    for info in store.episodes():
        counts[info.status] += 1
        live = " (being recorded now)" if is_being_written(info.path / LOG) else ""
        print(f"{info.id}  {info.describe()}{live}")
    total = sum(counts.values())
    names = {"steps lost": "with steps lost"}
    print(f"{total} episodes" + "".join(f", {n} {names.get(s, s)}" for s, n in sorted(counts.items())))
    if counts["damaged"]:
        print(f"run `vla-steer store repair {args.run_dir}` to rewrite the damaged logs")
        return 1
    return 0


def cmd_repair(args) -> int:
    from vla_steer.core.rollouts import repair_episode

    store = _open(args.run_dir)
    repaired, refused = 0, 0
    for episode_id in store.episode_ids():
        try:
            r = repair_episode(store, episode_id)
        except RuntimeError as e:  # being recorded: leave it, repair the others
            print(f"{episode_id}  not repaired: {e}")
            refused += 1
            continue
        if r is not None:
            print(f"{episode_id}  {r.describe()}")
            repaired += 1
    print(f"{len(store)} episodes checked, {repaired} repaired" + (f", {refused} refused" if refused else ""))
    return 1 if refused else 0


def _open(run_dir: Path):
    from vla_steer.core.rollouts import open_store

    return open_store(run_dir / "rollouts" if (run_dir / "rollouts").is_dir() else run_dir)
