"""FSDP2 finds the tensors inside carpool's layer outputs.

A decoder layer returns its MLP output as `PartialSums` (a dataclass). FSDP2 registers the pre-backward
hook that all-gathers a layer's resharded weights on the layer's output tensors, and up to torch 2.12 it
finds them with `tree_flatten`, which yields an unregistered dataclass as one opaque leaf: the eager
step with reshard_after_forward then ran down_proj's backward on the freed weight. Newer torch walks
dataclasses itself, so the step test puts back the pytree walk those versions use (it is what the
torch 2.11 GPU image runs); with the installed torch already using it, it changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch.utils._pytree import tree_flatten, tree_unflatten
from training_fixtures import build_token_files, tiny_config

from carpool.distributed import PartialSums
from carpool.training.trainer import Trainer

TOL = dict(rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reduced, pushed", [(False, False), (True, False), (False, True)])
def test_partial_sums_flatten_to_their_tensor_and_back(reduced, pushed):
    value = torch.randn(3, 4, requires_grad=True)
    leaves, spec = tree_flatten((PartialSums(value, reduced, pushed), value * 2))
    assert leaves[0] is value
    rebuilt = tree_unflatten(leaves, spec)[0]
    assert isinstance(rebuilt, PartialSums)
    assert (rebuilt.value, rebuilt.reduced, rebuilt.pushed) == (value, reduced, pushed)


def _pytree_grad_tensors(structure: Any) -> tuple[torch.Tensor, ...]:
    return tuple(t for t in tree_flatten(structure)[0] if torch.is_tensor(t) and t.requires_grad)


def _pytree_replace_grad_tensors(structure: Any, tensors: Iterator[torch.Tensor]) -> Any:
    leaves, spec = tree_flatten(structure)
    return tree_unflatten([next(tensors) if torch.is_tensor(t) and t.requires_grad else t for t in leaves], spec)


@pytest.fixture
def pytree_fsdp_hooks(monkeypatch):
    """FSDP2's hooks find a module's input and output tensors with `tree_flatten` (torch <= 2.12)."""
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group, _fsdp_state

    for module in (_fsdp_state, _fsdp_param_group):
        if hasattr(module, "collect_grad_tensors"):
            monkeypatch.setattr(module, "collect_grad_tensors", _pytree_grad_tensors)
        if hasattr(module, "replace_grad_tensors"):
            monkeypatch.setattr(module, "replace_grad_tensors", _pytree_replace_grad_tensors)


def _gradients(cfg) -> tuple[float, dict[str, torch.Tensor]]:
    trainer = Trainer(cfg)
    try:
        loss, _ = trainer.accumulate_gradients()
        return float(loss), trainer.full_gradients()
    finally:
        trainer.close()


def test_eager_fsdp_step_resharding_after_forward_equals_the_unsharded_step(tmp_path, pytree_fsdp_hooks):
    paths = build_token_files(str(tmp_path / "data"))
    tied = {"tie_word_embeddings": True}
    ref_loss, ref = _gradients(tiny_config(paths, str(tmp_path / "plain"), micro_batch_size=2, model=tied))
    loss, grads = _gradients(tiny_config(paths, str(tmp_path / "fsdp"), micro_batch_size=2, model=tied,
                                         activation_checkpointing="off",
                                         parallel={"strategy": "fsdp", "reshard_after_forward": True}))
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    assert grads.keys() == ref.keys()
    for name in ref:
        torch.testing.assert_close(grads[name], ref[name], msg=name, **TOL)
