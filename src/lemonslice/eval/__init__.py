"""Evaluation: probe suites (math, eq, reasoning), greedy chat generation, and RYS layer sweeps."""

from .generate import ChatPrompter, Generation, chat_template_for, greedy, stop_ids
from .probes import BUILTIN_SUITES, ProbeError, ProbeItem, ProbeSuite, load_suite, load_suites
from .sweep import Candidate, SweepConfig, SweepError, make_config, repeat_playlist, run_sweep

__all__ = [
    "BUILTIN_SUITES", "Candidate", "ChatPrompter", "Generation", "ProbeError", "ProbeItem", "ProbeSuite",
    "SweepConfig", "SweepError", "chat_template_for", "greedy", "load_suite", "load_suites", "make_config",
    "repeat_playlist", "run_sweep", "stop_ids",
]
