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
    got = F.dot([view], [view.grads], [other.grads])
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


def test_dot_of_float64_tensors_is_exact_to_rounding_and_foreach_free() -> None:
    """The products (in each tensor's dtype, at least float32) are summed in one float64
    reduction: the per-tensor loop gives the same bits, both equal that sum to float64
    rounding, and a second call (the cached buffer) gives the same value again."""
    values = []
    for foreach in (True, False):
        view = make_view(foreach)
        other = make_view(foreach, seed=1)
        values += [F.dot([view], [view.grads], [other.grads]) for _ in range(2)]
    assert all(torch.equal(v, values[0]) for v in values)
    view, other = make_view(True), make_view(True, seed=1)
    pairs = zip(view.grads, other.grads, strict=True)
    want = torch.cat([(a * b).reshape(-1).double() for a, b in pairs])
    want = want.sort().values.sum()  # another order of summation
    assert math.isclose(float(values[0]), float(want), rel_tol=1e-14)


def test_dot_of_complex_tensors_is_the_real_inner_product() -> None:
    torch.manual_seed(0)
    xs = [torch.randn(4, dtype=torch.complex128), torch.randn(3, 2, dtype=torch.complex128)]
    ys = [torch.randn_like(x) for x in xs]
    view = GroupView({}, xs, xs, Layout.of(xs))
    want = sum(float((x * y.conj()).real.sum()) for x, y in zip(xs, ys, strict=True))
    assert math.isclose(float(F.dot([view], [xs], [ys])), want, rel_tol=1e-14)


def perturb_case(dtype: torch.dtype, transposed: bool) -> tuple[list[Tensor], list[Tensor]]:
    """Weights and directions: small and large, 1-D, 2-D, channels-last 4-D, and (where
    ``transposed``) a direction whose strides are not its weight's."""
    torch.manual_seed(0)
    shapes = [(3,), (70, 70), (4, 5), (6,), (5000,), (8, 3, 20, 20)]
    params = [torch.randn(s, dtype=dtype) for s in shapes]
    params[5] = params[5].to(memory_format=torch.channels_last)
    dirs = [torch.randn_like(p) for p in params]  # channels-last like its weight
    if transposed:
        dirs[1] = dirs[1].t().contiguous().t()  # the same values, column-major
        dirs[2] = dirs[2].t().contiguous().t()
        dirs[5] = dirs[5].contiguous()
    return params, dirs


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("foreach", [True, False])
def test_perturb_is_addcmul_when_the_norm_is_finite(
    foreach: bool, dtype: torch.dtype, transposed: bool
) -> None:
    """The fused kernel gives the bits of addcmul_, whatever the directions' strides."""
    params, dirs = perturb_case(dtype, transposed)
    view = GroupView({"foreach": foreach}, params, dirs, Layout.of(params))
    scale = torch.tensor(0.0123)
    want = [p.clone() for p in params]
    F.addcmul_(want, dirs, scale, foreach)
    for normed in (False, True):  # a first call fills the flat buffer, a second reuses it
        got = [p.clone() for p in params]
        view = GroupView({"foreach": foreach}, got, dirs, view.layout)
        F.norm([view], [dirs])
        F.perturb_(view, 0, got, dirs, scale, F.nonfinite_flag(torch.tensor(1.0)), normed=normed)
        for g, w in zip(got, want, strict=True):
            assert torch.equal(g, w)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("where", [0, 1, 4, 5])  # small, large 2-D, large 1-D, channels-last
@pytest.mark.parametrize("transposed", [False, True])
def test_perturb_leaves_the_weights_alone_when_the_norm_is_not_finite(
    bad: float, where: int, transposed: bool
) -> None:
    params, dirs = perturb_case(torch.float32, transposed)
    dirs[where][(0,) * dirs[where].dim()] = bad
    view = GroupView({"foreach": True}, params, dirs, Layout.of(params))
    norm = F.norm([view], [dirs])
    assert not torch.isfinite(norm)
    start = [p.clone() for p in params]
    scale = 0.05 / torch.nan_to_num(norm + 1e-12, nan=math.inf, posinf=math.inf)
    F.perturb_(view, 0, params, dirs, scale, F.nonfinite_flag(norm), normed=True)
    for p, p0 in zip(params, start, strict=True):
        assert torch.equal(p, p0)


def test_nonfinite_flag() -> None:
    for value, flag in ((0.0, 0.0), (3.5, 0.0), (math.inf, 1.0), (math.nan, 1.0)):
        for dtype in (torch.float32, torch.float64):
            got = F.nonfinite_flag(torch.tensor(value, dtype=dtype))
            assert got.dtype == torch.float32
            assert float(got) == flag


@pytest.mark.parametrize(
    ("dtype", "device", "fused"),
    [
        (torch.float32, "cpu", True),
        (torch.float64, "cpu", True),
        (torch.float32, "meta", True),  # stands for a GPU: any device but the CPU
        (torch.float64, "meta", False),  # torch's CUDA kernel reads a tensor lr as float32
        (torch.bfloat16, "cpu", False),
    ],
)
def test_the_fused_perturbation_takes_float64_on_the_cpu_only(
    dtype: torch.dtype, device: str, fused: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[torch.dtype] = []

    def fused_sgd(params: list[Tensor], *args: object, lr: Tensor, **kwargs: object) -> None:
        calls.append(lr.dtype)  # the weights stay as they are: only the route is checked

    monkeypatch.setattr(torch, "_fused_sgd_", fused_sgd)
    params = [torch.zeros(s, dtype=dtype, device=device) for s in [(70, 70), (5000,)]]
    dirs = [torch.ones_like(p) for p in params]
    view = GroupView({"foreach": True}, params, dirs, Layout.of(params))
    scale = torch.tensor(0.5, dtype=dtype, device=device)
    F.perturb_(view, 0, params, dirs, scale, torch.zeros((), device=device), normed=False)
    assert calls == ([dtype] if fused else [])
    if device == "cpu" and not fused:
        assert all(torch.equal(p, d * 0.5) for p, d in zip(params, dirs, strict=True))


def test_the_fused_perturbation_takes_its_factor_in_the_weights_dtype(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A norm over float32 and float64 tensors is float64; torch's CUDA kernel reads its
    learning rate as float32, so the float32 weights get the factor in float32 (the bits
    addcmul_ gives, also on the CPU)."""
    kernel = torch._fused_sgd_
    seen: list[tuple[torch.dtype, torch.dtype]] = []

    def fused_sgd(params: list[Tensor], *args: object, lr: Tensor, **kwargs: object) -> None:
        seen.append((params[0].dtype, lr.dtype))
        kernel(params, *args, lr=lr, **kwargs)

    monkeypatch.setattr(torch, "_fused_sgd_", fused_sgd)
    params = [torch.randn(70, 70), torch.randn(5000, dtype=torch.float64)]
    dirs = [torch.randn_like(p) for p in params]
    want = [p.clone() for p in params]
    scale = torch.tensor(0.0123, dtype=torch.float64)
    F.addcmul_(want[:1], dirs[:1], scale, True)
    F.addcmul_(want[1:], dirs[1:], scale, True)
    view = GroupView({"foreach": True}, params, dirs, Layout.of(params))
    flag = torch.zeros(())
    for i, (ps, ds) in enumerate(zip(view.split(params), view.split(dirs), strict=True)):
        F.perturb_(view, i, ps, ds, scale, flag, normed=False)
    assert sorted(seen, key=str) == sorted(
        [(torch.float32, torch.float32), (torch.float64, torch.float64)], key=str
    )
    for got, w in zip(params, want, strict=True):
        assert torch.equal(got, w)


def test_cast_like_moves_a_coefficient_and_off_the_cpu_matches_the_dtype() -> None:
    c = torch.tensor(0.3, dtype=torch.float64)
    assert F.cast_like(c, torch.zeros(3)) is c  # on the CPU: no operator spent
    for dtype, want in [
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.bfloat16),  # CUDA's one-kernel path wants the lists' dtype
        (torch.float64, torch.float64),
        (torch.complex64, torch.float32),  # a real coefficient stays real
    ]:
        got = F.cast_like(c, torch.zeros(3, dtype=dtype, device="meta"))  # stands for a GPU
        assert (got.device.type, got.dtype) == ("meta", want)
    on_meta = torch.tensor(0.3, device="meta")
    assert F.cast_like(on_meta, torch.zeros(3, device="meta")) is on_meta
