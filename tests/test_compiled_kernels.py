"""The engine's functional kernels run under ``torch.compile(fullgraph=True)``: no graph
break, and the same numbers as eager (``aot_eager`` runs the traced ATen graph as is).

One function chains what a step of SAM and GSAM computes (the norm, the guarded perturbation,
the inner product, the combined gradient, the average, the restore) on a group of two dtypes
with small (flat-buffer) and large tensors, after a first eager call has built the layout's
cached buffers.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
from torch import Tensor

from torchsam._engine import _functional as F
from torchsam._engine._layout import GroupView, Layout

pytest.importorskip("torch._dynamo")


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Iterator[None]:
    """Leave dynamo as found: its caches and its counters (other tests count graphs)."""
    import torch._dynamo

    yield
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()


def make_view() -> tuple[GroupView, list[Tensor], list[Tensor], list[Tensor]]:
    torch.manual_seed(0)
    shapes = [(16, 3, 3, 3), (16,), (16,), (32, 16, 3, 3), (5000,)]
    params = [torch.randn(s, dtype=torch.float64) for s in shapes]
    params.append(torch.randn(7, 3))  # float32: a second split
    grads = [torch.randn_like(p) for p in params]
    view = GroupView({"foreach": True}, params, grads, Layout.of(params))
    backup = [torch.empty_like(p) for p in params]
    first = [torch.randn_like(p) for p in params]
    out = [torch.empty_like(p) for p in params]
    return view, backup, first, out


def step_math(
    view: GroupView, backup: list[Tensor], first: list[Tensor], out: list[Tensor]
) -> tuple[Tensor, Tensor]:
    norm = F.norm([view], [view.grads])
    denominator = torch.nan_to_num(norm + 1e-12, nan=math.inf, posinf=math.inf)
    nonfinite = F.nonfinite_flag(norm)
    F.copy_(backup, view.params, True)
    splits = zip(view.split(view.params), view.split(view.grads), strict=True)
    for i, (params, grads) in enumerate(splits):
        scale = (0.05 / denominator).to(params[0].dtype)
        F.perturb_(view, i, params, grads, scale, nonfinite, normed=True)
    coef = F.dot([view], [first], [view.grads])
    for o, g, f in zip(view.split(out), view.split(view.grads), view.split(first), strict=True):
        F.combine_(o, g, 1.0 + 0.2 * coef.to(g[0].dtype), f, -0.2, True)
        F.lerp_(f, g, 0.1, True)
    F.copy_(view.params, backup, True)
    return norm, coef


def test_the_kernels_compile_without_graph_breaks() -> None:
    import torch._dynamo

    view, backup, first, out = make_view()
    step_math(view, backup, first, out)  # eager: builds the cached buffers
    torch._dynamo.reset()
    explained = torch._dynamo.explain(step_math)(view, backup, first, out)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def test_compiled_kernels_give_the_eager_numbers() -> None:
    results = []
    for compiled in (False, True):
        view, backup, first, out = make_view()
        step_math(view, backup, first, out)  # eager: builds the cached buffers
        fn = step_math
        if compiled:
            fn = torch.compile(step_math, fullgraph=True, backend="aot_eager")
        norm, coef = fn(view, backup, first, out)
        results.append((norm, coef, out, first, view.params))
    (n0, c0, *lists0), (n1, c1, *lists1) = results
    assert torch.equal(n0, n1)
    assert torch.equal(c0, c1)
    for a, b in zip(lists0, lists1, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
