"""TransformerLens-style analyses with an expert axis: residual decompositions, direct logit
attribution and logit lens per expert, router-logit attribution (see docs/transformer_lens.md)."""
