"""A resumed trace or audit refuses a model whose weights were edited in memory: the fingerprint
checksums every weight's values (wherever in a tensor the edit is), not only the checkpoint files
or the first values of each tensor."""

import torch

from moelens import HookedMoETransformer
from moelens.audit.run import _model_fingerprint
from moelens.tracing.fingerprint import model_fingerprint, parameter_checksum


def test_an_edit_anywhere_changes_the_fingerprint():
    model = HookedMoETransformer.from_pretrained("moelens-tiny-facts")
    again = HookedMoETransformer.from_pretrained("moelens-tiny-facts")
    trace_fp, audit_fp = model_fingerprint(model), _model_fingerprint(model)
    assert model_fingerprint(again) == trace_fp and _model_fingerprint(again) == audit_fp  # deterministic
    W = model.blocks[2].mlp.experts.w_down  # the last expert's last weight: far past the first 512 values
    original = W.view(-1)[-1].clone()
    with torch.no_grad():
        W.view(-1)[-1] += 1e-3  # ~3e-5 of the tensor's sum: far above the checksum's 9 digits
    assert model_fingerprint(model)[1] != trace_fp[1]
    assert _model_fingerprint(model) != audit_fp
    with torch.no_grad():
        W.view(-1)[-1] = original  # restored exactly (subtracting 1e-3 again could leave an ulp)
    assert parameter_checksum(model) == parameter_checksum(again)  # the edit undone: the same model again


def test_checksum_is_computed_in_chunks_consistently():
    model = HookedMoETransformer.from_pretrained("moelens-tiny-facts")
    assert parameter_checksum(model, chunk=1000) == parameter_checksum(model)
