"""The analysis of one run: `summary.json` (machine-readable) and `report.html` (self-contained, PNGs inline)."""

from __future__ import annotations

import base64
import html
import json
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vla_steer.core.analysis import plots
from vla_steer.core.analysis.metrics import EpisodeMetrics, Setting, by_setting, linear_speed, store_metrics
from vla_steer.core.analysis.probes import NeuronTrack, layer_histogram, neuron_tracks
from vla_steer.core.analysis.stats import Estimate, mean_ci, proportion_ci, relative_change
from vla_steer.core.analysis.stores import Stores
from vla_steer.core.discovery.direction import Direction, load_directions
from vla_steer.core.rollouts import Store, open_store

FORMAT = "vla-steer/analysis"
FORMAT_VERSION = 1
# Metrics with CIs per setting, and the ones compared with the baseline (relative change, paired by seed).
METRICS = (
    "moving_speed",
    "window_speed",
    "mean_speed",
    "displacement",
    "carry_height",
    "max_height",
    "length",
)
COMPARED = ("moving_speed", "window_speed", "displacement", "carry_height", "length")


@dataclass
class SettingSummary:
    setting: Setting
    episodes: int
    success_rate: float
    metrics: dict[str, Estimate]
    change: dict[str, Estimate] = field(default_factory=dict)  # vs baseline
    success: Estimate = Estimate(math.nan, math.nan, math.nan, 0)  # success rate with its Wilson 95% CI
    plans: dict[str, float] = field(default_factory=dict)  # plan words -> share of steps, most said first
    # axis -> target, tracking error and overshoot (means over episodes with 95% CIs) of a setpoint setting
    tracking: dict[str, dict] = field(default_factory=dict)

    def as_dict(self) -> dict:
        s = self.setting
        return {
            "label": s.label,
            "direction": s.direction,
            "mode": s.mode,
            "strength": s.strength,
            "control": s.control,
            "draw": s.draw,
            "episodes": self.episodes,
            "success_rate": None if math.isnan(self.success_rate) else self.success_rate,
            "success": self.success.as_dict(),
            **{k: v.as_dict() for k, v in self.metrics.items()},
            "change_vs_baseline": {k: v.as_dict() for k, v in self.change.items()},
            "plans": self.plans,
            "tracking": {
                axis: {
                    "target": t["target"],
                    "error": t["error"].as_dict(),
                    "overshoot": t["overshoot"].as_dict(),
                }
                for axis, t in self.tracking.items()
            },
        }


@dataclass
class Analysis:
    settings: list[SettingSummary]
    episodes: list[EpisodeMetrics]
    directions: dict[str, Direction]
    tracks: list[NeuronTrack]
    figures: dict[str, bytes]

    def setting(self, direction: str, strength: float | None = None, control: bool = False) -> SettingSummary:
        for s in self.settings:
            if (
                s.setting.direction == direction
                and s.setting.control == control
                and (strength is None or s.setting.strength == strength)
            ):
                return s
        raise KeyError(f"no setting {direction!r} (strength {strength}, control {control}) in this run")

    def controls(self, direction: str, strength: float) -> list[SettingSummary]:
        """Every random-control draw of `direction` run at `strength`."""
        return [s for s in self.settings if s.setting.direction == direction and s.setting.control
                and s.setting.strength == strength]  # fmt: skip

    def best(self, direction: str, metric: str, sign: float) -> SettingSummary | None:
        """The direction's strength with the largest change of `metric` in the direction of `sign`."""
        cands = [s for s in self.settings if s.setting.direction == direction and not s.setting.control
                 and metric in s.change and math.isfinite(s.change[metric].mean)]  # fmt: skip
        return max(cands, key=lambda s: sign * s.change[metric].mean, default=None)

    def summary(self) -> dict:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "metrics": {
                "moving_speed": "m/s, mean end-effector speed over steps where it moves (> 0.01 m/s)",
                "window_speed": "m/s, mean end-effector speed over the first 20 steps",
                "mean_speed": "m/s, mean end-effector speed over the episode",
                "displacement": "m per step, mean end-effector displacement",
                "carry_height": "m (world z), mean end-effector height from the first gripper-close command on "
                "(or while the task's success signal holds, when the gripper convention is unknown)",
                "max_height": "m (world z)",
                "length": "steps",
            },
            "settings": [s.as_dict() for s in self.settings],
            "directions": {
                name: {
                    "concept": d.concept,
                    "layers": d.layers,
                    "neurons": [
                        {"layer": n.layer, "index": n.index, "sign": n.sign, "tokens": n.tokens[:8]}
                        for n in d.neurons
                    ],
                }
                for name, d in self.directions.items()
            },  # fmt: skip
            "tracking_neurons": [
                {
                    "source": t.source,
                    "layer": t.layer,
                    "index": t.index,
                    "r_speed": t.r_speed,
                    "r_height": t.r_height,
                    "tokens": t.tokens[:8],
                }
                for t in self.tracks[:20]
            ],  # fmt: skip
        }


def summarise(rows: list[EpisodeMetrics]) -> list[SettingSummary]:
    groups = by_setting(rows)
    base = next((g for s, g in groups.items() if s.direction == "baseline"), None)

    def per_seed(group: list[EpisodeMetrics], metric: str) -> dict:
        return {(r.seed if r.seed is not None else r.episode): getattr(r, metric) for r in group}

    out = []
    order = sorted(
        groups, key=lambda s: (s.direction != "baseline", s.direction, s.control, s.strength, s.draw)
    )
    for s in order:
        g = groups[s]
        succ = [r.success for r in g if r.success is not None]
        summ = SettingSummary(
            s,
            len(g),
            float(np.mean(succ)) if succ else math.nan,
            {m: mean_ci([float(getattr(r, m)) for r in g]) for m in METRICS},
            success=proportion_ci(succ),
            plans=plan_shares(g),
            tracking=tracking(g),
        )
        if base is not None and s.direction != "baseline":
            summ.change = {m: relative_change(per_seed(g, m), per_seed(base, m)) for m in COMPARED}
        out.append(summ)
    return out


def tracking(group: list[EpisodeMetrics]) -> dict[str, dict]:
    """How a setting's episodes held each setpoint: the target, and the mean over episodes of each one's
    tracking error and overshoot, with 95% CIs."""
    out = {}
    for axis in sorted({a for r in group for a in r.tracking}):
        held = [r.tracking[axis] for r in group if axis in r.tracking]
        out[axis] = {
            "target": held[0].target,
            "error": mean_ci([t.error for t in held if math.isfinite(t.error)]),
            "overshoot": mean_ci([t.overshoot for t in held if math.isfinite(t.overshoot)]),
        }
    return out


def plan_shares(group: list[EpisodeMetrics]) -> dict[str, float]:
    """What a planning policy said over a setting's steps: plan words -> share, most said first."""
    said: Counter[str] = Counter()
    for r in group:
        said.update(r.plans)
    total = sum(said.values())
    return {plan: n / total for plan, n in said.most_common()}


def analyze(
    run_dir: str | Path | Sequence[str | Path],
    *,
    store: Store | Stores | None = None,
    directions: Mapping[str, Direction] | None = None,
    out: str | Path | None = None,
    control_hz: float | None = None,
    progress: Callable[[str], None] = lambda _: None,
) -> Analysis:
    """Analyse a run directory (a rollout store at `run_dir/rollouts` or `run_dir` itself, directions
    at `run_dir/directions` if present), or several read as one (the shards of a grid: `Stores`, `out`
    then required); writes summary.json and report.html into `out` (default run_dir)."""
    run_dirs = [Path(run_dir)] if isinstance(run_dir, (str, Path)) else [Path(d) for d in run_dir]
    if not run_dirs or (len(run_dirs) > 1 and out is None):
        raise ValueError("several run directories are analysed into one report: give --out")
    if store is None:
        store = Stores([open_store(d / "rollouts" if (d / "rollouts").is_dir() else d) for d in run_dirs])
    if directions is None:
        found = next((d / "directions" for d in run_dirs if (d / "directions").is_dir()), None)
        directions = load_directions(found) if found is not None else {}
    directions = dict(directions)
    progress(f"reading {len(store)} episodes")
    rows = store_metrics(store)
    if getattr(store, "duplicates", 0):
        progress(f"{store.duplicates} episodes recorded twice (same task, setting and seed) are counted once")
    if getattr(store, "damaged", 0):
        progress(
            f"{store.damaged} damaged episodes of a grid are left out (a rerun of the grid records them again)"
        )
    names = ", ".join(str(d) for d in run_dirs)
    if not rows:
        raise ValueError(f"{names}: no complete episodes to analyse")
    settings = summarise(rows)
    progress("correlating logged activations with speed and height")
    tracks = neuron_tracks(store, directions)
    analysis = Analysis(settings, rows, directions, tracks, {})
    progress("drawing figures")
    analysis.figures = _figures(analysis, store, control_hz)
    out = Path(out) if out is not None else run_dirs[0]
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(analysis.summary(), indent=2))
    title = "vla-steer analysis: " + " + ".join(d.name for d in run_dirs)
    (out / "report.html").write_text(render_html(analysis, title=title))
    return analysis


STRIP_FRAMES = 8  # frames per motion strip
STRIP_EVERY = 6  # steps between them


def _figures(a: Analysis, store: Store | Stores, control_hz: float | None) -> dict[str, bytes]:
    figs = {}
    base = next((s for s in a.settings if s.setting.direction == "baseline"), None)
    # One dose-response figure per direction: its effect and success rate against strength, beside every
    # random-control draw (the distribution the concept's effect must stand out of).
    for name in sorted({s.setting.direction for s in a.settings if s.setting.direction != "baseline"}):
        mine = [s for s in a.settings if s.setting.direction == name]
        if any(not s.setting.control for s in mine):
            figs[f"dose_{name}"] = plots.concept_dose(name, mine, base, ("moving_speed", "carry_height"))
    # Trajectories: the baseline and each direction's strongest setting, a few matched seeds each.
    chosen = [base] if base is not None else []
    for name in sorted({s.setting.direction for s in a.settings if s.setting.direction != "baseline"}):
        strongest = [s for s in a.settings if s.setting.direction == name and not s.setting.control]
        if strongest:
            chosen.append(max(strongest, key=lambda s: s.setting.strength))
    labels = {s.setting: s.setting.label for s in chosen}
    paths: dict[str, list[np.ndarray]] = {labels[s.setting]: [] for s in chosen}
    speeds: dict[str, list[np.ndarray]] = {labels[s.setting]: [] for s in chosen}
    for r in a.episodes:
        label = labels.get(r.setting)
        if label is not None and len(paths[label]) < 5:
            ep = store.load(r.episode, images=False, activations=False)
            paths[label].append(ep.arrays["ee_pos"])
            speeds[label].append(linear_speed(ep.arrays["ee_vel"]))
    dt = 1.0 / control_hz if control_hz else None
    if any(paths.values()):
        figs["trajectories"] = plots.trajectories({k: v for k, v in paths.items() if v}, dt)
        figs["speed_profiles"] = plots.speed_profiles({k: v for k, v in speeds.items() if v}, dt)
    strips = _strips(a, store, chosen)
    if strips:
        figs["motion"] = plots.motion_strip(strips, STRIP_EVERY * dt if dt else None, STRIP_EVERY)
    hist = layer_histogram(a.directions)
    if hist:
        figs["layers"] = plots.layer_counts(hist)
    return figs


def _strips(a: Analysis, store: Store | Stores, chosen: list[SettingSummary]) -> dict[str, list[np.ndarray]]:
    """Frames every STRIP_EVERY steps of one episode per chosen setting, all of one seed (the first seed every
    chosen setting ran), from the first camera recorded."""
    episodes: dict[Setting, dict] = {s.setting: {} for s in chosen}
    for r in a.episodes:
        if r.setting in episodes and r.seed is not None:
            episodes[r.setting].setdefault(r.seed, r.episode)
    shared = set.intersection(*(set(v) for v in episodes.values())) if episodes else set()
    if not shared:
        return {}
    seed = min(shared)
    out = {}
    for setting, by_seed in episodes.items():
        ep = store.load(by_seed[seed], images=True, activations=False)
        if not ep.images:
            return {}
        frames = next(iter(ep.images.values()))
        out[f"{setting.label} (seed {seed})"] = [frames[i] for i in range(0, len(frames), STRIP_EVERY)][
            :STRIP_FRAMES
        ]
    return out


def _fmt(e: Estimate, scale: float = 1.0, digits: int = 3) -> str:
    if not math.isfinite(e.mean):
        return "–"
    ci = f" [{e.low * scale:.{digits}f}, {e.high * scale:.{digits}f}]" if math.isfinite(e.low) else ""
    return f"{e.mean * scale:.{digits}f}{ci}"


def _plans(shares: dict[str, float], top: int = 3) -> str:
    return ", ".join(f"{plan} {share:.0%}" for plan, share in list(shares.items())[:top]) or "–"


def _pct(e: Estimate | None) -> str:
    if e is None or not math.isfinite(e.mean):
        return "–"
    ci = f" [{e.low:+.0%}, {e.high:+.0%}]" if math.isfinite(e.low) else ""
    return f"{e.mean:+.1%}{ci}"


def render_html(a: Analysis, title: str, preface: str = "") -> str:
    esc = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 7px;"
             "text-align:right}th{background:#f3f3f3}td.l{text-align:left}img{max-width:100%}"
             ".note{color:#555;font-size:13px}</style></head><body>", f"<h1>{esc(title)}</h1>", preface]  # fmt: skip
    parts.append("<h2>Settings</h2><p class='note'>Means with 95% bootstrap confidence intervals; changes are "
                 "relative to the baseline (all knobs off) over matched seeds.</p>")  # fmt: skip
    parts.append("<table><tr><th>setting</th><th>episodes</th><th>success</th><th>moving speed (m/s)</th>"
                 "<th>Δ moving speed</th><th>Δ first-20-step speed</th><th>carrying height (m)</th>"
                 "<th>Δ carrying height</th><th>length (steps)</th><th>Δ length</th>"
                 + ("<th>plans said (share of steps)</th>" if any(s.plans for s in a.settings) else "")
                 + "</tr>")  # fmt: skip
    for s in a.settings:
        succ = "–" if math.isnan(s.success_rate) else f"{s.success_rate:.0%}"
        parts.append(
            f"<tr><td class='l'>{esc(s.setting.label)}</td><td>{s.episodes}</td><td>{succ}</td>"
            f"<td>{_fmt(s.metrics['moving_speed'])}</td><td>{_pct(s.change.get('moving_speed'))}</td>"
            f"<td>{_pct(s.change.get('window_speed'))}</td><td>{_fmt(s.metrics['carry_height'])}</td>"
            f"<td>{_pct(s.change.get('carry_height'))}</td><td>{_fmt(s.metrics['length'], digits=1)}</td>"
            f"<td>{_pct(s.change.get('length'))}</td>"
            + (f"<td class='l'>{esc(_plans(s.plans))}</td>" if any(x.plans for x in a.settings) else "")
            + "</tr>"
        )
    parts.append("</table>")
    held = [(s, axis, t) for s in a.settings for axis, t in s.tracking.items()]
    if held:
        parts.append("<h2>Setpoints</h2><p class='note'>How each setpoint setting held its target: per episode, the "
                     "median |measured - target| / target after the first 20 steps, and the overshoot (how far "
                     "past the target it went, relative to it); means over episodes with 95% CIs.</p>"
                     "<table><tr><th>setting</th><th>target</th><th>tracking error</th><th>overshoot</th>"
                     "<th>success</th><th>moving speed (m/s)</th></tr>")  # fmt: skip

        def pct(e: Estimate, digits: int = 1) -> str:
            return _fmt(e, 100, digits) + ("%" if math.isfinite(e.mean) else "")

        for s, axis, t in held:
            parts.append(
                f"<tr><td class='l'>{esc(s.setting.label)}</td><td>{axis} {t['target']:g}</td>"
                f"<td>{pct(t['error'])}</td><td>{pct(t['overshoot'])}</td><td>{pct(s.success, 0)}</td>"
                f"<td>{_fmt(s.metrics['moving_speed'])}</td></tr>"
            )
        parts.append("</table>")
    captions = {
        **{
            f"dose_{d}": f"{d}: dose-response (change vs baseline and success rate against strength; "
            "hollow marks: random-neuron control draws)"
            for d in {s.setting.direction for s in a.settings}
        },
        "motion": "Side by side: the policy's camera every few steps, one matched seed per setting",
        "trajectories": "End-effector trajectories: baseline and each direction at its largest strength",
        "speed_profiles": "Mean end-effector speed over time",
        "layers": "Concept neurons per layer",
    }
    parts.append("<h2>Figures</h2>")
    for key, png in a.figures.items():
        data = base64.b64encode(png).decode()
        parts.append(f"<h3>{esc(captions.get(key, key))}</h3><img src='data:image/png;base64,{data}'>")
    if a.directions:
        parts.append("<h2>Concept neurons and their top tokens</h2>")
        for name, d in sorted(a.directions.items()):
            parts.append(f"<h3>{esc(name)} ({esc(d.concept)}): {len(d.neurons)} neurons in layers "
                         f"{esc(str(d.layers))}</h3><table><tr><th>neuron</th><th>sign</th><th>score</th>"
                         "<th>top tokens</th></tr>")  # fmt: skip
            for n in d.neurons:
                toks = ", ".join(n.tokens[:10])
                parts.append(f"<tr><td class='l'>L{n.layer}.{n.index}</td><td>{n.sign:+g}</td>"
                             f"<td>{n.score:.3f}</td><td class='l'>{esc(toks)}</td></tr>")  # fmt: skip
            parts.append("</table>")
    if a.tracks:
        parts.append("<h2>Logged neurons that track the motion</h2><p class='note'>Pearson correlation over "
                     "all logged steps of each neuron's activation (before steering) with the end-effector "
                     "speed and height after the step.</p><table><tr><th>logged as</th><th>neuron</th>"
                     "<th>r (speed)</th><th>r (height)</th><th>top tokens</th></tr>")  # fmt: skip
        for t in a.tracks[:20]:
            nid = f"L{t.layer}.{t.index}" if t.layer is not None else f"column {t.column}"
            parts.append(f"<tr><td class='l'>{esc(t.source)}</td><td class='l'>{nid}</td><td>{t.r_speed:+.2f}"
                         f"</td><td>{t.r_height:+.2f}</td><td class='l'>{esc(', '.join(t.tokens[:8]))}</td></tr>")  # fmt: skip
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)
