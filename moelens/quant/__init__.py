"""Quantised checkpoint formats, dequantised at load time (see :mod:`moelens.quant.mxfp4`)."""
