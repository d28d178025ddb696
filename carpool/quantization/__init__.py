"""Quantization: checkpoint formats (formats.py), the schemes a checkpoint's quantization_config asks for
(config.py), the linear methods that run them (methods.py) and the routed experts' FP8 method
(moe_methods.py). Kernels live in ops/triton/quant_*.py and ops/triton/moe.py with their torch twins in
ops/torch_ref/quant.py and ops/torch_ref/moe.py."""
