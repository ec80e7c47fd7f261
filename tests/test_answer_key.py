"""The engine reproduces the answer key recorded before its redesign, bit for bit.

``tests/answer_keys/engine_v1.pt`` (written by ``tests/make_answer_key.py``) holds, for every
variant, base optimizer and call style, the weights and ``state_dict()`` after each of three
float64 steps. Any change of the engine that moves a single rounding fails here.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

import torchsam
from tests.make_answer_key import KEY, VARIANTS, cases, run


@pytest.fixture(scope="module")
def key() -> dict[str, Any]:
    return torch.load(KEY, weights_only=True)


def assert_identical(got: Any, want: Any, where: str) -> None:
    """``got`` equals ``want`` exactly: same structure, same types, tensors ``torch.equal``."""
    assert type(got) is type(want), f"{where}: {type(got).__name__} != {type(want).__name__}"
    if isinstance(want, torch.Tensor):
        assert got.dtype == want.dtype, where
        assert got.shape == want.shape, where
        assert torch.equal(got, want), f"{where}: tensors differ"
    elif isinstance(want, dict):
        assert list(got) == list(want), f"{where}: keys {list(got)} != {list(want)}"
        for k in want:
            assert_identical(got[k], want[k], f"{where}[{k!r}]")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), f"{where}: length {len(got)} != {len(want)}"
        for i, (a, b) in enumerate(zip(got, want, strict=True)):
            assert_identical(a, b, f"{where}[{i}]")
    elif isinstance(want, float) and math.isnan(want):
        assert math.isnan(got), where
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


def test_key_covers_every_optimizer(key: dict[str, Any]) -> None:
    variants = {VARIANTS[name.split("/")[0]][0].__name__ for name in key}
    exported = {
        name
        for name in torchsam.__all__
        if isinstance(getattr(torchsam, name), type)
        and issubclass(getattr(torchsam, name), torchsam.SAM)
    }
    assert variants == exported
    assert set(key) == {"/".join(case) for case in cases()}


@pytest.mark.parametrize("case", cases(), ids="/".join)
def test_reproduces_answer_key(case: tuple[str, str, str], key: dict[str, Any]) -> None:
    assert_identical(run(*case), key["/".join(case)], "/".join(case))


def test_comparison_is_strict(key: dict[str, Any]) -> None:
    """The comparison fails on the smallest change of one weight (it can fail)."""
    want = key["SAM/sgd/closure"]
    got = run("SAM", "sgd", "closure")
    first = got[-1]["weights"][-1].view(-1)
    first[0] = torch.nextafter(first[0], torch.tensor(math.inf, dtype=torch.float64))
    with pytest.raises(AssertionError):
        assert_identical(got, want, "SAM/sgd/closure")
