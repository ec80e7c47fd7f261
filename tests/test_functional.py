"""The engine's functional kernels on their own: plain tensor lists in, numbers out.

Each is checked in float64 against a direct computation, with the multi-tensor and the
per-tensor path (``foreach``), on a split of several dtypes and of small and large tensors
(the CPU flat-buffer path gathers tensors of at most 4,096 elements).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from torchsam._engine import _functional as F
from torchsam._engine._layout import GroupView, Layout


def make_view(foreach: bool, seed: int = 0) -> GroupView:
    torch.manual_seed(seed)
    shapes = [(3,), (70, 70), (4, 5), (6,), (5000,)]  # 1-D, large, small 2-D, 1-D, large 1-D
    params = [torch.randn(s, dtype=torch.float64) for s in shapes]
    params.append(torch.randn(7, dtype=torch.float32))  # a second dtype: two splits
    grads = [torch.randn_like(p) for p in params]
    return GroupView({"foreach": foreach}, params, grads, Layout.of(params))


@pytest.mark.parametrize("foreach", [True, False])
def test_norm_is_the_global_two_norm(foreach: bool) -> None:
    view = make_view(foreach)
    got = F.norm([view], [view.grads])
    want = math.sqrt(sum(float((g.double() ** 2).sum()) for g in view.grads))
    assert got.dim() == 0
    assert math.isclose(float(got), want, rel_tol=1e-6)  # the float32 tensor rounds


@pytest.mark.parametrize("foreach", [True, False])
def test_norm_of_float64_tensors_is_exact_to_rounding(foreach: bool) -> None:
    view = make_view(foreach)
    tensors = [g for g in view.grads if g.dtype == torch.float64]
    view64 = GroupView(view.group, tensors, tensors, Layout.of(tensors))
    got = float(F.norm([view64], [tensors]))
    want = float(torch.cat([t.reshape(-1) for t in tensors]).norm())
    assert math.isclose(got, want, rel_tol=1e-14)


def test_dot_is_the_inner_product_over_all_tensors() -> None:
    view = make_view(True)
    other = make_view(True, seed=1)
    got = F.dot([view.grads], [other.grads])
    pairs = zip(view.grads, other.grads, strict=True)
    want = sum(float((a.double() * b.double()).sum()) for a, b in pairs)
    assert got.dtype == torch.float64
    assert math.isclose(float(got), want, rel_tol=1e-6)


def test_addcmul_and_copy_restore_bit_exactly() -> None:
    for foreach in (True, False):
        view = make_view(foreach)
        saved = [p.clone() for p in view.params]
        scale = torch.tensor(0.3, dtype=torch.float64)
        for params, grads in zip(view.split(view.params), view.split(view.grads), strict=True):
            F.addcmul_(params, grads, scale.to(params[0].dtype), foreach)
        for p, w, g in zip(view.params, saved, view.grads, strict=True):
            # addcmul may fuse the multiply-add: equal up to the last rounding
            torch.testing.assert_close(p, w + g * scale.to(p.dtype), rtol=1e-6, atol=1e-7)
        for params, backup in zip(view.split(view.params), view.split(saved), strict=True):
            F.copy_(params, backup, foreach)
        assert all(torch.equal(p, w) for p, w in zip(view.params, saved, strict=True))


@pytest.mark.parametrize("foreach", [True, False])
def test_finite_direction_zeroes_only_non_finite_entries(foreach: bool) -> None:
    view = make_view(foreach)
    poisoned = [g.clone() for g in view.grads]
    poisoned[0][1] = math.nan
    poisoned[2][0, 0] = math.inf
    poisoned[4][7] = -math.inf
    want = [torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0) for g in poisoned]
    cleaned: list[Tensor] = []
    for i, part in enumerate(view.split(poisoned)):
        cleaned.extend(F.finite_direction_(view, i, part, normed=False))
    order = [i for idx in (view.layout.splits or [list(range(len(poisoned)))]) for i in idx]
    for i, t in zip(order, cleaned, strict=True):
        assert torch.equal(t, want[i])  # finite values bit-identical, the others 0


def test_all_zero() -> None:
    view = make_view(True)
    assert not F.all_zero([view])
    zeros = [torch.zeros_like(g) for g in view.grads]
    assert F.all_zero([GroupView(view.group, view.params, zeros, view.layout)])
