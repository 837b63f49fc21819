"""Pipelines across machines: playlist positions cut into contiguous stages, each an Engine
limited to its range in a Ray actor, with only hidden states passed between them.

`stages` (no Ray): parsing and balancing --stages. `stage`: the actor. `driver`: `Pipeline`,
the Engine look-alike that `TextGenerator` and `run` use.
"""

from .stages import balanced, layer_bytes, parse_stages, resolve_stages

__all__ = ["Pipeline", "balanced", "layer_bytes", "parse_stages", "resolve_stages"]


def __getattr__(name: str):  # noqa: ANN202
    # Ray is imported only by what runs a pipeline, not by parsing a spec.
    if name == "Pipeline":
        from .driver import Pipeline

        return Pipeline
    raise AttributeError(name)
