"""Layer surgery: plans (playlists of blocks) and writing them out as models."""

from .mtp import MTPResult, inject_mtp, strip_mtp
from .plan import Entry, PatternReport, Plan, PlanError, load_plan, pattern_report, playlist_for
from .write import SurgeryResult, surgery

__all__ = [
    "Entry", "PatternReport", "Plan", "PlanError", "SurgeryResult", "load_plan", "pattern_report", "playlist_for",
    "surgery",
    "MTPResult", "inject_mtp", "strip_mtp",
]
