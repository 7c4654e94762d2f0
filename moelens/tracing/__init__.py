"""Causal tracing of factual recall: cases and datasets, noise protocol, layer/expert/coalition
tracing, the dataset protocol, and statistics."""

from moelens.tracing.cases import (
    FactCase, MultiTokenTargetWarning, SameTargetTokenWarning, TokenizedCase, tokenize_case,
)
from moelens.tracing.attribution import (
    ExpertAttributionResult, LayerAttributionResult, ScreenResult, attribute_experts, attribute_layers, screen_experts,
)
from moelens.tracing.datasets import load_facts
from moelens.tracing.trace import (
    CoalitionResult, ExpertGridResult, ExpertTraceResult, LayerTraceResult, TraceResult, TraceSetup, prepare,
    trace_coalitions, trace_expert_grid, trace_experts, trace_layers,
)

__all__ = [
    "ExpertAttributionResult", "LayerAttributionResult", "ScreenResult", "attribute_experts", "attribute_layers",
    "screen_experts",
    "CoalitionResult", "ExpertGridResult", "ExpertTraceResult", "FactCase", "LayerTraceResult", "MultiTokenTargetWarning",
    "SameTargetTokenWarning", "TokenizedCase", "TraceResult", "TraceSetup", "load_facts", "prepare",
    "tokenize_case", "trace_coalitions", "trace_expert_grid", "trace_experts", "trace_layers",
]
