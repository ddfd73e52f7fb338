"""Figures for the report (matplotlib, Agg backend: no display needed). Each returns PNG bytes."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from vla_steer.core.analysis.stats import Estimate  # noqa: E402


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def trajectories(paths: Mapping[str, Sequence[np.ndarray]], dt: float | None = None) -> bytes:
    """End-effector height over time and the x-z path, for each setting's episodes (one colour per setting)."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(9.0, 3.4))
    for i, (label, eps) in enumerate(paths.items()):
        for j, p in enumerate(eps):
            t = np.arange(len(p)) * (dt or 1.0)
            kw = dict(color=f"C{i}", alpha=0.7, lw=1.0, label=label if j == 0 else None)
            a.plot(t, p[:, 2], **kw)
            b.plot(p[:, 0], p[:, 2], **kw)
    a.set_xlabel("time (s)" if dt else "step")
    a.set_ylabel("end-effector height (m)")
    b.set_xlabel("x (m)")
    b.set_ylabel("z (m)")
    b.set_title("end-effector path (side view)", fontsize=9)
    a.legend(fontsize=7)
    return _png(fig)


def speed_profiles(profiles: Mapping[str, Sequence[np.ndarray]], dt: float | None = None) -> bytes:
    fig, ax = plt.subplots(figsize=(6.0, 3.2))
    for i, (label, eps) in enumerate(profiles.items()):
        n = max(len(p) for p in eps)
        grid = np.full((len(eps), n), np.nan)
        for j, p in enumerate(eps):
            grid[j, : len(p)] = p
        t = np.arange(n) * (dt or 1.0)
        ax.plot(t, np.nanmean(grid, 0), color=f"C{i}", label=label)
    ax.set_xlabel("time (s)" if dt else "step")
    ax.set_ylabel("mean end-effector speed (m/s)")
    ax.legend(fontsize=7)
    return _png(fig)


def layer_counts(hist: Mapping[str, Sequence[int]]) -> bytes:
    fig, ax = plt.subplots(figsize=(6.0, 3.0))
    names = sorted(hist)
    n = max(len(v) for v in hist.values())
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        ax.bar(np.arange(n) + i * width, hist[name], width=width, label=name)
    ax.set_xlabel("layer")
    ax.set_ylabel("neurons")
    ax.set_xticks(np.arange(n) + 0.4 - width / 2, [str(i) for i in range(n)])
    ax.set_title("where each direction's neurons sit", fontsize=9)
    ax.legend(fontsize=8)
    return _png(fig)


def concept_dose(name: str, settings: Sequence, baseline, metrics: Sequence[str]) -> bytes:
    """One direction's dose-response: per metric its change vs baseline (%), then the success rate (%),
    against strength; the direction with 95% CIs (filled, baseline at 0), each random-control draw hollow and
    slightly offset so draws at one strength stay apart. `settings`: SettingSummary of the direction and of
    its controls; `baseline`: the baseline's SettingSummary or None."""
    concept = sorted((s for s in settings if not s.setting.control), key=lambda s: s.setting.strength)
    controls = [s for s in settings if s.setting.control]
    fig, axes = plt.subplots(
        1, len(metrics) + 1, figsize=(4.2 * (len(metrics) + 1), 3.4), layout="constrained"
    )
    spread = 0.02 * max([s.setting.strength for s in settings] + [1.0])

    def bars(ax, xs, ests, scale, **kw):
        ys = np.array([e.mean for e in ests]) * scale
        lo = np.nan_to_num(ys - np.array([e.low for e in ests]) * scale)
        hi = np.nan_to_num(np.array([e.high for e in ests]) * scale - ys)
        ax.errorbar(xs, ys, yerr=[np.maximum(lo, 0), np.maximum(hi, 0)], capsize=3, **kw)

    panels = [(m, lambda s, m=m: s.change.get(m), "change vs baseline (%)") for m in metrics]
    panels.append(("success rate", lambda s: s.success, "success (%)"))
    for ax, (title, get, ylabel) in zip(axes, panels, strict=True):
        xs = [s.setting.strength for s in concept]
        ests = [get(s) for s in concept]
        if baseline is not None:
            zero = Estimate(0.0, 0.0, 0.0, baseline.episodes) if title != "success rate" else baseline.success
            xs, ests = [0.0, *xs], [zero, *ests]
        pairs = [(x, e) for x, e in zip(xs, ests, strict=True) if e is not None]
        if pairs:
            bars(ax, [x for x, _ in pairs], [e for _, e in pairs], 100, marker="o", color="C0", label=name)
        for i, c in enumerate(sorted(controls, key=lambda s: (s.setting.strength, s.setting.draw))):
            est = get(c)
            if est is not None:
                off = (c.setting.draw - 2) * spread if c.setting.draw else 0.0
                bars(ax, [c.setting.strength + off], [est], 100, marker="o", mfc="none", color="C3",
                     linestyle="none", label="random draws" if i == 0 else None)  # fmt: skip
        if title != "success rate":
            ax.axhline(0, color="0.5", lw=0.8)
        else:
            ax.set_ylim(-5, 105)
        ax.set_xlabel("strength (clamp value)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{name}: {title}", fontsize=9)
    axes[0].legend(fontsize=7)
    return _png(fig)


def motion_strip(rows: Mapping[str, Sequence[np.ndarray]], every_s: float | None, every_steps: int) -> bytes:
    """A grid of frames: one row per setting, one column per time point (the same times in every row)."""
    n = max(len(v) for v in rows.values())
    fig, axes = plt.subplots(len(rows), n, figsize=(1.25 * n, 1.35 * len(rows)), squeeze=False)
    for r, (label, frames) in enumerate(rows.items()):
        for c in range(n):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(frames):
                ax.imshow(frames[c])
            else:
                ax.axis("off")
            if r == 0:
                ax.set_title(f"{c * every_s:.1f} s" if every_s else f"step {c * every_steps}", fontsize=7)
        axes[r][0].set_ylabel(label, fontsize=7, rotation=0, ha="right", va="center")
    return _png(fig)
