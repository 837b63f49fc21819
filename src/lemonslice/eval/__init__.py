"""Evaluation: probe suites (math, eq, reasoning), greedy chat generation, and RYS layer sweeps.

The names below load their modules on first use (PEP 562), so a light submodule such as
`eval.bench`, whose llama.cpp worker process measures its own memory, does not pull in torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "ChatPrompter": "generate", "Generation": "generate", "chat_template_for": "generate", "greedy": "generate",
    "stop_ids": "generate", "BUILTIN_SUITES": "probes", "ProbeError": "probes", "ProbeItem": "probes",
    "ProbeSuite": "probes", "load_suite": "probes", "load_suites": "probes", "Candidate": "sweep",
    "SweepConfig": "sweep", "SweepError": "sweep", "make_config": "sweep", "repeat_playlist": "sweep",
    "run_sweep": "sweep",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
