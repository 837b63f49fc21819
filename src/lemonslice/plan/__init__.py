"""Placement plans: what fits where, for lemonslice and for llama.cpp, from the model's tensor
sizes and hyper-parameters alone (no weight is read).

`facts.model_facts` reads what a plan needs from an opened model; `ours.plan_lemonslice` and
`llama.plan_llama` turn it into resident weights, caches, flags and a predicted peak.
"""

from .facts import LayerFacts, ModelFacts, model_facts
from .llama import LlamaPlan, plan_llama
from .ours import OurPlan, plan_lemonslice

__all__ = ["LayerFacts", "LlamaPlan", "ModelFacts", "OurPlan", "model_facts", "plan_lemonslice", "plan_llama"]
