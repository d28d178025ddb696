"""Mixture-of-experts layers: routing (which experts a token goes to, with what weight) and the stacked
expert weights that consume it. The grouped expert computation itself lives in `ops` (torch_ref/moe.py is
the oracle, triton/moe.py the GPU path)."""

from carpool.layers.moe.experts import FusedExperts
from carpool.layers.moe.routing import Routing

__all__ = ["FusedExperts", "Routing"]
