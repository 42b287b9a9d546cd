"""Quantized variants of an fp32 export (int8, int4, fp16), each with a quality report; no torch."""
