"""Quantized ``o_proj`` layouts of a safetensors folder: :mod:`.layouts` (the table of layouts, config parsing,
shape checks) and :mod:`.dequantize` (the unpackers, dequantizing only the touched heads' columns)."""
