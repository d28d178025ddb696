"""Mixture-of-experts layers: routing (which experts a token goes to, with what weight) and the expert
MLPs that consume it. The grouped expert computation itself lives in `ops` (torch_ref/moe.py is the
oracle, triton/fused_moe.py the GPU path)."""

from carpool.layers.moe.routing import Routing

__all__ = ["Routing"]
