"""Offline analysis of logged rollouts: behaviour metrics, dose-response with bootstrap CIs and random-neuron
controls, activation probes, figures, and a self-contained HTML report with a machine-readable summary."""

from vla_steer.core.analysis.metrics import EpisodeMetrics, Setting, episode_metrics, store_metrics
from vla_steer.core.analysis.report import Analysis, SettingSummary, analyze, render_html
from vla_steer.core.analysis.stats import Estimate, mean_ci, relative_change
from vla_steer.core.analysis.stores import Stores

__all__ = [
    "Analysis",
    "EpisodeMetrics",
    "Estimate",
    "Setting",
    "SettingSummary",
    "Stores",
    "analyze",
    "episode_metrics",
    "mean_ci",
    "relative_change",
    "render_html",
    "store_metrics",
]
