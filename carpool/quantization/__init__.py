"""Quantization: checkpoint formats (formats.py), the schemes a checkpoint's quantization_config asks for
(config.py) and the linear methods that run them (fp8.py, int4.py). Kernels live in ops/triton/quant_*.py
with their torch twins in ops/torch_ref/quant.py."""
