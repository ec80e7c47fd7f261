"""``optimizer.state`` presents the whole optimizer, as torch.optim's contract expects.

The cases of PyTorch's own optimizer tests (``test/test_optim.py``) that a wrapper used to
fail, re-stated for every torchsam optimizer: state-dict hooks that add keys to
``optimizer.state``; state that is non-empty after a step and holds the base optimizer's
entries next to torchsam's own; loading an older state dict whose groups lack the newer flags;
and ``torch.distributed.checkpoint`` with ``flatten_optimizer_state_dict=True``, which rebuilds
the entries from ``optimizer.state``.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)

from tests.make_answer_key import BASES, VARIANTS, N, Net, _one_step

NAMES = list(VARIANTS)


def build(name: str, base: str = "adamw", seed: int = 0) -> tuple[Net, Any]:
    cls, kwargs, per_group, _ = VARIANTS[name]
    base_cls, base_kwargs = BASES[base]
    torch.manual_seed(seed)
    model = Net()
    groups = [
        {"params": list(model.l1.parameters()), **per_group[0]},
        {"params": [model.l2.weight, model.l2.bias, model.unused, model.frozen], **per_group[1]},
    ]
    return model, cls(groups, base_cls, **base_kwargs, **kwargs)


def train(name: str, model: Net, opt: Any, steps: int = 3) -> None:
    torch.manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(N, 3, dtype=torch.float64), torch.randn(N, 2, dtype=torch.float64)
        _one_step(model, opt, x, y, name, VARIANTS[name][3][-1])


def assert_step_alike(name: str, *runs: tuple[Net, Any]) -> None:
    """One more step of each (model, optimizer) leaves the same weights, bit for bit."""
    for model, opt in runs:
        train(name, model, opt, steps=1)
    first = list(runs[0][0].parameters())
    for model, _ in runs[1:]:
        for p, q in zip(first, model.parameters(), strict=True):
            assert torch.equal(p, q)


def assert_same_state_dict(loaded: dict[str, Any], saved: dict[str, Any]) -> None:
    """``loaded`` holds every entry of ``saved``, equal. (DCP creates the state of a fresh
    optimizer with a step on zero gradients of every trainable parameter, as it does for
    torch.optim: a parameter that never had a gradient may then hold zero state.)"""
    assert loaded["state"].keys() >= saved["state"].keys()
    for key, entry in saved["state"].items():
        assert entry.keys() == loaded["state"][key].keys(), key
        for name, value in entry.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(loaded["state"][key][name]))
    assert loaded["param_groups"] == saved["param_groups"]


@pytest.mark.parametrize("name", NAMES)
def test_state_holds_the_whole_optimizer_after_a_step(name: str) -> None:
    model, opt = build(name)
    assert len(opt.state) == 0
    train(name, model, opt)
    assert len(opt.state) > 0
    packed = opt.state_dict()["state"]
    index = {id(p): i for i, p in enumerate(p for g in opt.param_groups for p in g["params"])}
    assert {index[id(p)] for p in opt.state} == set(packed)
    for p, entry in opt.state.items():
        assert set(entry) == set(packed[index[id(p)]])  # base keys and "sam." keys alike
        for key in opt.base_optimizer.state[p]:
            assert entry[key] is opt.base_optimizer.state[p][key]
        for key, value in opt.own_state.get(p, {}).items():
            assert entry["sam." + key] is value
    assert model.unused not in opt.state
    assert len(opt.state[model.unused]) == 0  # read like a defaultdict, nothing created
    assert model.unused not in opt.base_optimizer.state


def test_state_writes_reach_the_optimizer_that_owns_the_key() -> None:
    model, opt = build("FriendlySAM")
    train("FriendlySAM", model, opt)
    w = model.l1.weight
    entry = opt.state[w]
    entry["sam.probe"] = torch.ones(1)
    entry["probe"] = torch.zeros(1)
    assert opt.own_state[w]["probe"] is entry["sam.probe"]
    assert opt.base_optimizer.state[w]["probe"] is entry["probe"]
    del entry["sam.probe"], entry["probe"]
    assert "probe" not in opt.own_state[w]
    assert "probe" not in opt.base_optimizer.state[w]
    opt.state[w] = {"exp_avg": torch.zeros_like(w), "sam.grad_ema": torch.ones_like(w)}
    assert set(opt.base_optimizer.state[w]) == {"exp_avg"}
    assert set(opt.own_state[w]) == {"grad_ema"}


def _add_key(optimizer: Any) -> None:
    optimizer.state["test"] = 1


def _pop_key(optimizer: Any, state_dict: dict[str, Any]) -> dict[str, Any]:
    state_dict["ran_state_dict_pre_hook"] = state_dict["state"].pop("test", None) == 1
    return state_dict


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_hooks_that_add_keys_to_state(name: str) -> None:
    model, opt = build(name)
    train(name, model, opt, steps=1)
    opt.register_state_dict_pre_hook(_add_key)
    assert opt.state_dict()["state"]["test"] == 1
    opt.register_state_dict_post_hook(_pop_key)
    packed = opt.state_dict()
    assert packed["ran_state_dict_pre_hook"]
    assert "test" not in packed["state"]

    def after_load(optimizer: Any) -> None:
        optimizer.state["ran_load_state_dict_post_hook"] = True

    _, fresh = build(name)
    fresh.register_load_state_dict_post_hook(after_load)
    fresh.load_state_dict({**packed, "state": {**packed["state"], "kept": 2}})
    assert fresh.state["ran_load_state_dict_post_hook"] is True
    assert fresh.state["kept"] == 2  # keys that are not parameters load as they are
    assert fresh.state_dict()["state"]["kept"] == 2


@pytest.mark.parametrize("name", NAMES)
def test_older_state_dict_without_the_newer_flags_loads_and_steps(name: str) -> None:
    model, opt = build(name)
    train(name, model, opt, steps=2)
    old = copy.deepcopy(opt.state_dict())
    for group in old["param_groups"]:
        for flag in ("maximize", "foreach", "fused", "capturable", "differentiable"):
            group.pop(flag, None)
    fresh_model, fresh = build(name)
    fresh_model.load_state_dict(model.state_dict())
    fresh.load_state_dict(old)
    for group in fresh.param_groups:
        assert group["maximize"] is False  # filled by the base optimizer, as torch.optim does
    assert_step_alike(name, (model, opt), (fresh_model, fresh))


@pytest.mark.parametrize("name", NAMES)
def test_dcp_flattened_optimizer_state_dict_round_trips(name: str) -> None:
    model, opt = build(name, base="sgd")
    train(name, model, opt)
    options = StateDictOptions(flatten_optimizer_state_dict=True)
    # a copy: loading keeps the tensors it is given, which would alias the two optimizers
    model_state, optim_state = copy.deepcopy(get_state_dict(model, opt, options=options))
    assert any(key.endswith("momentum_buffer") for key in optim_state)  # the base's state too
    fresh_model, fresh = build(name, base="sgd", seed=3)
    set_state_dict(
        fresh_model,
        fresh,
        model_state_dict=model_state,
        optim_state_dict=optim_state,
        options=options,
    )
    assert_same_state_dict(fresh.state_dict(), opt.state_dict())
    assert_step_alike(name, (model, opt), (fresh_model, fresh))


@pytest.mark.parametrize("name", NAMES)
def test_older_pickle_without_the_newer_flags_unpickles_and_steps(name: str) -> None:
    """The state of an older pickle (groups without the flags newer torch versions added)
    unpickles into an optimizer that steps like the original."""
    model, opt = build(name)
    train(name, model, opt, steps=2)
    state = copy.deepcopy({"model": model, "opt": opt})
    old = state["opt"].__getstate__()
    for group in old["param_groups"]:
        for flag in ("maximize", "foreach", "capturable", "fused"):
            group.pop(flag, None)
    unpickled = type(opt).__new__(type(opt))
    unpickled.__setstate__(old)
    assert unpickled.param_groups is unpickled.base_optimizer.param_groups
    assert all(group["maximize"] is False for group in unpickled.param_groups)
    assert_step_alike(name, (model, opt), (state["model"], unpickled))
