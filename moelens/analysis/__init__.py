"""TransformerLens-style analyses with an expert axis: residual decompositions, direct logit
attribution and logit lens per expert, router-logit attribution (see docs/transformer_lens.md)."""

from moelens.analysis.expert_dla import expert_dla, expert_logit_lens, expert_weight_lens, expert_weight_lens_frame
from moelens.plotting.analysis import expert_dla_heatmap, router_attribution_heatmap
from moelens.analysis.router_attribution import RouterAttribution, router_attribution

__all__ = [
    "expert_dla", "expert_logit_lens", "expert_weight_lens", "expert_weight_lens_frame",
    "expert_dla_heatmap", "router_attribution_heatmap", "RouterAttribution", "router_attribution",
]
