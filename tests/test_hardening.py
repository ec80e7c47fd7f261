"""Every documented path works for every variant, and mistakes get clear errors (issue 10).

The rows of the family table (tests/test_family.py) run here over every variant: the AMP and
clipping recipes, a DCP round trip, the reference-implementation closure port, a dtype change,
``load_state_dict`` validation, deepcopy and pickle, global hook counts and profiler events,
exception safety, and the checks of PyTorch's own ``test/test_optim.py`` that apply (state-dict
and step hooks, deepcopy, compile, no-grad steps, ``differentiable``).
"""

from __future__ import annotations

import copy
import pickle
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

import torchsam
from tests.test_family import VARIANTS, Net, build, setup, step, weights

TWO_CALL = [n for n, v in VARIANTS.items() if v.two_call]
CLOSURE = [n for n, v in VARIANTS.items() if not v.per_sample]
ONE_PASS = ["looksam", "intermittent"]  # variants with steps without a second pass


def two_call_step(
    opt: Any,
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    scaler: torch.amp.GradScaler | None = None,
    max_norm: float | None = None,
) -> None:
    """The README's two-call recipe, with the AMP and clipping lines when asked for."""

    def backward() -> None:
        loss = F.cross_entropy(model(x), y)
        (loss if scaler is None else scaler.scale(loss)).backward()

    backward()
    if opt.first_step(zero_grad=True, grad_scaler=scaler):
        backward()
    if max_norm is not None:
        if scaler is not None:
            raise AssertionError("the recipes clip without a scaler here")
        nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    opt.second_step(zero_grad=True, grad_scaler=scaler)
    if scaler is not None:
        scaler.update()


def _assert_same(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    for p, q in zip(a, b, strict=True):
        assert torch.equal(p, q)


# --------------------------------------------------------------------------- 1. AMP
TWO_PASS_ONLY = [n for n in TWO_CALL if n not in ONE_PASS]


@pytest.mark.parametrize(
    ("name", "recipe"),
    [(n, "argument") for n in TWO_CALL] + [(n, "unscale_ first") for n in TWO_PASS_ONLY],
)
def test_grad_scaler_recipe_matches_unscaled_training(name: str, recipe: str) -> None:
    model, data = setup()
    plain = copy.deepcopy(model)
    opt, ref = build(name, model), build(name, plain)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=1000)
    for x, y in data[:5]:
        if recipe == "argument":
            two_call_step(opt, model, x, y, scaler)
        else:  # the older recipe: unscale_ before a first_step() without scaler
            scaler.scale(F.cross_entropy(model(x), y)).backward()
            scaler.unscale_(opt)
            opt.first_step(zero_grad=True)
            scaler.scale(F.cross_entropy(model(x), y)).backward()
            opt.second_step(zero_grad=True, grad_scaler=scaler)
            scaler.update()
        two_call_step(ref, plain, x, y)
    for a, b in zip(weights(model), weights(plain), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert scaler.get_scale() == 2.0**12  # no overflow was seen


@pytest.mark.parametrize("name", ONE_PASS)
def test_a_one_pass_step_needs_the_scaler_in_first_step(name: str) -> None:
    model, data = setup()
    opt = build(name, model, **({"k": 2} if name == "looksam" else {"seed": 0}))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    for x, y in data:
        scaler.scale(F.cross_entropy(model(x), y)).backward()
        scaler.unscale_(opt)
        start = weights(model)
        if not opt.first_step(zero_grad=True):
            with pytest.raises(ValueError, match=r"no second pass.*first_step\(grad_scaler="):
                opt.second_step(zero_grad=True, grad_scaler=scaler)
            _assert_same(weights(model), start)
            assert not opt.perturbed
            return
        scaler.scale(F.cross_entropy(model(x), y)).backward()
        opt.second_step(zero_grad=True, grad_scaler=scaler)
        scaler.update()
    pytest.fail("no step without a second pass")


def test_second_step_needs_the_scaler_first_step_got() -> None:
    model, data = setup()
    opt = build("sam", model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    x, y = data[0]
    start = weights(model)
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    assert opt.first_step(zero_grad=True, grad_scaler=scaler)
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    with pytest.raises(ValueError, match=r"different grad_scaler.*weights are back at w"):
        opt.second_step(zero_grad=True)
    _assert_same(weights(model), start)
    assert not opt.perturbed


# --------------------------------------------------------------------------- 2. clipping
@pytest.mark.parametrize("name", TWO_CALL)
def test_clipping_recipe_works_for_every_variant(name: str) -> None:
    runs = {}
    for max_norm in (None, 1e9, 0.05):
        model, data = setup()
        opt = build(name, model)
        for x, y in data[:4]:
            two_call_step(opt, model, x, y, max_norm=max_norm)
        runs[max_norm] = weights(model)
    _assert_same(runs[1e9], runs[None])  # clipping that changes nothing changes nothing
    assert any(not torch.equal(a, b) for a, b in zip(runs[0.05], runs[None], strict=True))


@pytest.mark.parametrize("name", ONE_PASS)
def test_a_second_backward_on_a_one_pass_step_still_raises(name: str) -> None:
    model, data = setup()
    opt = build(name, model, **({"k": 2} if name == "looksam" else {"seed": 0}))
    for x, y in data:
        F.cross_entropy(model(x), y).backward()
        if not opt.first_step(zero_grad=True):
            F.cross_entropy(model(x), y).backward()  # the trap: doubles the kept gradients
            with pytest.raises(RuntimeError, match="a backward pass ran before second_step"):
                opt.second_step(zero_grad=True)
            return
        F.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)
    pytest.fail("no step without a second pass")


# --------------------------------------------------------------------------- 3. DCP
@pytest.mark.parametrize("name", VARIANTS)
def test_distributed_checkpoint_round_trip(name: str, tmp_path: Path) -> None:
    dcp = pytest.importorskip("torch.distributed.checkpoint")
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    model, data = setup()
    opt = build(name, model, "adamw")
    for x, y in data[:3]:
        step(name, opt, model, x, y)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*single process.*")
        dcp.save({"optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=tmp_path)
        fresh_model, _ = setup(seed=5)
        fresh_model.load_state_dict(model.state_dict())
        fresh = build(name, fresh_model, "adamw")
        target = {"optim": get_optimizer_state_dict(fresh_model, fresh)}
        # the fresh optimizer's state also covers the parameter that never had a gradient
        # (DCP initialises it with a zero-gradient step, as for any torch.optim optimizer)
        planner = dcp.DefaultLoadPlanner(allow_partial_load=True)
        dcp.load(target, checkpoint_id=tmp_path, planner=planner)
        set_optimizer_state_dict(fresh_model, fresh, target["optim"])
    assert fresh.param_groups[0]["sam_step"] == 3
    for x, y in data[3:6]:
        step(name, opt, model, x, y)
        step(name, fresh, fresh_model, x, y)
    _assert_same(weights(fresh_model), weights(model))


# --------------------------------------------------------------------------- user traps
@pytest.mark.parametrize("name", CLOSURE)
def test_reference_closure_port_fails_loudly(name: str) -> None:
    model, data = setup()
    opt = build(name, model)
    x, y = data[0]

    def closure() -> torch.Tensor:  # the reference implementation's closure: no zero_grad
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    start = weights(model)
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="reference implementation's loop"):
        opt.step(closure)
    _assert_same(weights(model), start)
    assert not opt.perturbed


@pytest.mark.parametrize("name", TWO_CALL)
def test_forgotten_backward_is_named(name: str) -> None:
    model, data = setup()
    opt = build(name, model)
    x, y = data[0]
    with pytest.warns(RuntimeWarning, match=r"loss\.backward\(\) before first_step"):
        opt.first_step(zero_grad=True)
    opt.second_step()
    start = weights(model)
    for _ in range(4):  # reach a step with a second pass
        F.cross_entropy(model(x), y).backward()
        if opt.first_step(zero_grad=True):
            with pytest.raises(RuntimeError, match="run the second forward/backward pass"):
                opt.second_step()  # no second backward: no gradient at w + e
            _assert_same(weights(model), start)
            return
        opt.second_step(zero_grad=True)
        start = weights(model)
    pytest.fail("no step with a second pass")


def test_closure_without_backward_warns() -> None:
    model, data = setup()
    opt = build("sam", model)
    x, y = data[0]
    F.cross_entropy(model(x), y).backward()
    with (
        pytest.warns(RuntimeWarning, match=r"did it call loss\.backward"),
        pytest.raises(RuntimeError, match="second forward/backward"),
    ):
        opt.step(lambda: F.cross_entropy(model(x), y))


@pytest.mark.parametrize("clearing", ["optimizer", "model"])
def test_closure_that_zeroes_in_place_is_accepted(clearing: str) -> None:
    model, data = setup()
    opt = build("sam", model)
    x, y = data[0]
    twin = copy.deepcopy(model)
    twin_opt = build("sam", twin)
    F.cross_entropy(model(x), y).backward()  # gradients left over from elsewhere
    F.cross_entropy(twin(x), y).backward()

    def closure() -> torch.Tensor:
        (opt if clearing == "optimizer" else model).zero_grad(set_to_none=False)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    def twin_closure() -> torch.Tensor:
        twin_opt.zero_grad()
        loss = F.cross_entropy(twin(x), y)
        loss.backward()
        return loss

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step(closure)
    twin_opt.step(twin_closure)
    _assert_same(weights(model), weights(twin))


def test_closure_that_accumulates_and_clips_is_refused() -> None:
    """A reference port that also clips inside its closure: the gradients are added to the
    stale ones and then changed in place (a version-counter check saw 2 changes and let it
    through)."""
    model, data = setup()
    opt = build("sam", model)
    x, y = data[0]

    def closure() -> torch.Tensor:
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
        return loss

    F.cross_entropy(model(x), y).backward()
    start = weights(model)
    with pytest.raises(RuntimeError, match="reference implementation's loop"):
        opt.step(closure)
    _assert_same(weights(model), start)


def test_the_closure_hooks_are_removed() -> None:
    model, data = setup()
    opt = build("sam", model)
    x, y = data[0]
    params = list(model.parameters())

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    def failing() -> torch.Tensor:
        raise ValueError("boom")

    F.cross_entropy(model(x), y).backward()
    opt.step(closure)
    with pytest.raises(ValueError, match="boom"):
        opt.step(failing)
    assert all(not p._backward_hooks for p in params)
    copy.deepcopy(opt)
    opt.step(closure)  # still checked: no stale state from the failed call
    assert all(not p._backward_hooks for p in params)


def test_messages_name_what_to_change() -> None:
    model, _ = setup()
    with pytest.raises(TypeError, match=r"'kk'.*neither an argument of LookSAM.*nor of .*SGD"):
        torchsam.LookSAM(model.parameters(), torch.optim.SGD, kk=5, lr=0.1)
    with pytest.raises(TypeError, match=r"torch\.nn\.modules\.linear\.Linear, which is not an"):
        torchsam.SAM(model.parameters(), nn.Linear, lr=0.1)
    with pytest.raises(TypeError, match=r"model\.parameters\(\)"):
        torchsam.SAM(model, torch.optim.SGD, lr=0.1)
    opt = torchsam.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    x, y = setup()[1][0]
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    with pytest.raises(RuntimeError, match=r"second_step\(grad_scaler=scaler\) instead of"):
        scaler.step(opt)


def test_import_prints_no_numpy_warning() -> None:
    code = "import sys; sys.modules['numpy'] = None; import torchsam"
    result = subprocess.run(
        [sys.executable, "-W", "error::UserWarning", "-c", code], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "NumPy" not in result.stderr


# --------------------------------------------------------------------------- 4. dtype change
@pytest.mark.parametrize("name", VARIANTS)
def test_dtype_change_keeps_the_restore_exact(name: str) -> None:
    model, data = setup()
    model.float()
    opt = build(name, model)
    x, y = data[0]
    step(name, opt, model, x.float(), y)
    model.double()
    with torch.no_grad():  # values a float32 copy would round
        for p in model.parameters():
            p.add_(torch.randn_like(p), alpha=1e-9)
    for g in opt.param_groups:
        g["lr"] = 0.0
    start = weights(model)
    for x, y in data[1:4]:
        step(name, opt, model, x, y)
    _assert_same(weights(model), start)
    for own in opt.own_state.values():  # torchsam's own state follows the parameters' dtype
        assert all(v.dtype == torch.float64 for v in own.values() if torch.is_tensor(v))


# --------------------------------------------------------------------------- 6. load_state_dict
def test_load_state_dict_validates_fills_and_runs_hooks() -> None:
    model, data = setup()
    opt = build("gsam", model)
    step("gsam", opt, model, *data[0])
    sd = opt.state_dict()
    bad = {**sd, "param_groups": [{**g, "rho": -5.0} for g in sd["param_groups"]]}
    fresh = build("gsam", model)
    with pytest.raises(ValueError, match="Invalid rho"):
        fresh.load_state_dict(bad)
    assert fresh.param_groups[0]["sam_step"] == 0  # nothing was loaded
    old = {  # a checkpoint without alpha, with the step counter in the old place
        "state": {**sd["state"], "sam": {"step": 7}},
        "param_groups": [
            {k: v for k, v in g.items() if k not in ("alpha", "sam_step")}
            for g in sd["param_groups"]
        ],
    }
    fresh.load_state_dict(old)
    assert fresh.param_groups[0]["alpha"] == 0.3
    assert fresh.param_groups[1]["sam_step"] == 7
    with pytest.raises(ValueError, match=r"alpha.*belong to .*GSAM"):
        build("sam", model).load_state_dict(sd)
    looksam = build("looksam", model)
    lsd = looksam.state_dict()
    lsd["param_groups"][1]["k"] = 4
    with pytest.raises(ValueError, match="k is an option of the whole LookSAM"):
        looksam.load_state_dict(lsd)
    calls: list[str] = []
    fresh.register_state_dict_pre_hook(lambda o: calls.append("sd_pre"))
    fresh.register_state_dict_post_hook(lambda o, s: calls.append("sd_post"))
    fresh.register_load_state_dict_pre_hook(lambda o, s: calls.append("load_pre"))
    fresh.register_load_state_dict_post_hook(lambda o: calls.append("load_post"))
    fresh.load_state_dict(fresh.state_dict())
    assert calls == ["sd_pre", "sd_post", "load_pre", "load_post"]


def test_loaded_own_state_takes_the_parameter_dtype() -> None:
    model, data = setup()
    opt = build("friendly", model)
    for x, y in data[:2]:
        step("friendly", opt, model, x, y)
    sd = opt.state_dict()
    model32 = Net().float()
    opt32 = build("friendly", model32)
    opt32.load_state_dict(sd)
    assert opt32.state[model32.l1.weight]["sam.grad_ema"].dtype == torch.float32


def test_options_live_in_the_param_groups() -> None:
    model, _ = setup()
    opt = build("looksam", model)
    assert [g["k"] for g in opt.param_groups] == [3, 3]
    opt.k = 4
    assert opt.k == 4
    assert [g["k"] for g in opt.state_dict()["param_groups"]] == [4, 4]
    with pytest.raises(TypeError, match="Invalid k"):
        opt.k = 2.5
    with pytest.raises(ValueError, match="cannot differ between param groups"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(1))], "k": 2})


# --------------------------------------------------------------------------- 14. copies
@pytest.mark.parametrize("name", VARIANTS)
def test_copies_step_like_the_original(name: str) -> None:
    model, data = setup()
    opt = build(name, model)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for x, y in data[:2]:
        step(name, opt, model, x, y)
        sched.step()
    model_copy, opt_copy = copy.deepcopy((model, opt))
    model_pickled, opt_pickled = pickle.loads(pickle.dumps((model, opt)))
    for x, y in data[2:5]:
        for m, o in [(model, opt), (model_copy, opt_copy), (model_pickled, opt_pickled)]:
            step(name, o, m, x, y)
    _assert_same(weights(model_copy), weights(model))
    _assert_same(weights(model_pickled), weights(model))
    assert opt_copy.param_groups is opt_copy.base_optimizer.param_groups


# --------------------------------------------------------------------------- 15. hooks
@pytest.mark.parametrize("style", ["closure", "two_call"])
@pytest.mark.parametrize("name", ["sam", "looksam"])
def test_global_hooks_and_profiler_see_the_base_step_nested(name: str, style: str) -> None:
    """The base step is a plain ``base_optimizer.step()``: global hooks and the profiler see it
    inside the sharpness-aware step; hooks on either optimizer run once per step."""
    model, data = setup()
    opt = build(name, model)
    calls: list[tuple[str, str]] = []
    handles = [
        register_optimizer_step_pre_hook(lambda o, *_: calls.append(("pre", type(o).__name__))),
        register_optimizer_step_post_hook(lambda o, *_: calls.append(("post", type(o).__name__))),
    ]
    own_calls: list[str] = []
    opt.register_step_pre_hook(lambda *_: own_calls.append("pre"))
    opt.register_step_post_hook(lambda *_: own_calls.append("post"))
    base_calls: list[str] = []
    opt.base_optimizer.register_step_post_hook(lambda *_: base_calls.append("base"))
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for x, y in data[:3]:
                if style == "closure":
                    step(name, opt, model, x, y)
                else:
                    two_call_step(opt, model, x, y)
    finally:
        for handle in handles:
            handle.remove()
    sam = type(opt).__name__
    nested = [("pre", sam), ("pre", "SGD"), ("post", "SGD"), ("post", sam)]
    assert calls == nested * 3
    assert own_calls == ["pre", "post"] * 3
    assert base_calls == ["base"] * 3
    events = [e.name for e in prof.events() if e.name.startswith("Optimizer.step#")]
    assert sorted(set(events)) == sorted({f"Optimizer.step#{sam}.step", "Optimizer.step#SGD.step"})
    assert len(events) == 6


@pytest.mark.parametrize(
    "watcher", ["profiler", "base_pre", "base_post", "global_pre", "global_post"]
)
def test_each_watcher_alone_sees_the_base_step(watcher: str) -> None:
    """Without any watcher the base step is called without torch's step wrapper (it costs a
    profiler range a step); each watcher alone brings the plain ``base.step()`` back: the
    profiler sees the nested step, and a hook on the base optimizer or a global one runs."""
    model, data = setup()
    opt = build("sam", model)
    base = opt.base_optimizer
    seen: list[str] = []
    record = lambda o, *_: seen.append(type(o).__name__)  # noqa: E731
    handles = []
    if watcher == "base_pre":
        handles.append(base.register_step_pre_hook(record))
    elif watcher == "base_post":
        handles.append(base.register_step_post_hook(record))
    elif watcher == "global_pre":
        handles.append(register_optimizer_step_pre_hook(record))
    elif watcher == "global_post":
        handles.append(register_optimizer_step_post_hook(record))
    try:
        if watcher == "profiler":
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                step("sam", opt, model, *data[0])
            names = [e.name for e in prof.events() if e.name.startswith("Optimizer.step#")]
            assert sorted(names) == ["Optimizer.step#SAM.step", "Optimizer.step#SGD.step"]
        else:
            step("sam", opt, model, *data[0])
            assert "SGD" in seen
    finally:
        for handle in handles:
            handle.remove()


def test_the_base_step_runs_bare_when_nothing_watches_and_gives_the_same_weights() -> None:
    """Nothing watching: torch's wrapper is skipped (``_bare_step`` returns the class's own
    step); the weights are those of the plain call. An LR scheduler built on the base
    optimizer replaces its ``step``: then it is called."""
    from torchsam._engine import _construct

    def train(bare: bool) -> list[torch.Tensor]:
        model, data = setup()
        opt = build("sam", model)
        assert _construct._bare_step(opt.base_optimizer) is not None
        with pytest.MonkeyPatch.context() as patch:
            if not bare:
                patch.setattr(_construct, "_bare_step", lambda base: None)
            for x, y in data[:3]:
                step("sam", opt, model, x, y)
        return weights(model)

    _assert_same(train(bare=True), train(bare=False))
    model, data = setup()
    opt = build("sam", model)
    torch.optim.lr_scheduler.StepLR(opt.base_optimizer, step_size=1)
    assert _construct._bare_step(opt.base_optimizer) is None
    step("sam", opt, model, *data[0])


def test_code_of_the_users_around_the_base_step_always_runs() -> None:
    """A subclass's ``step`` decorated with ``functools.wraps`` (which copies torch's
    ``hooked`` mark, so torch does not wrap it again), a class-level patch of ``step``, and an
    overridden ``_optimizer_step_code`` (class or instance) all run: the bare call is taken
    only when ``step`` is torch's own wrapper and nothing else was changed."""
    import functools

    from torchsam._engine import _construct

    calls: list[str] = []
    torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)  # SGD.step hooked already

    class Logged(torch.optim.SGD):
        @functools.wraps(torch.optim.SGD.step)
        def step(self, *args: Any, **kwargs: Any) -> Any:
            calls.append("step")
            return torch.optim.SGD.step(self, *args, **kwargs)

    class Traced(torch.optim.SGD):
        def _optimizer_step_code(self) -> None:
            calls.append("code")

    model, data = setup()
    for cls, expected in [(Logged, "step"), (Traced, "code")]:
        calls.clear()
        opt = torchsam.SAM(model.parameters(), cls, rho=0.05, lr=0.1, momentum=0.9)
        assert _construct._bare_step(opt.base_optimizer) is None
        step("sam", opt, model, *data[0])
        assert calls == [expected]
    opt = torchsam.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    opt.base_optimizer._optimizer_step_code = lambda: calls.append("instance")  # type: ignore[method-assign]
    calls.clear()
    step("sam", opt, model, *data[0])
    assert calls == ["instance"]
    original = torch.optim.SGD.step
    patched = functools.wraps(original)(
        lambda *a, **k: (calls.append("patched"), original(*a, **k))[1]
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.optim.SGD, "step", patched)
        opt = torchsam.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
        calls.clear()
        step("sam", opt, model, *data[0])
    assert calls == ["patched"]


# --------------------------------------------------------------------------- 10. exceptions
@pytest.mark.parametrize("name", [n for n in TWO_CALL if n not in ONE_PASS])
def test_exception_inside_the_perturbation_restores_w(name: str) -> None:
    model, data = setup()
    opt = build(name, model)
    x, y = data[0]
    step(name, opt, model, x, y)
    start = weights(model)
    radius = opt.radius
    seen: list[int] = []

    def failing_radius(group: dict[str, Any]) -> float:
        seen.append(1)
        if len(seen) == 2:  # the first group is already perturbed
            raise KeyboardInterrupt
        return radius(group)

    opt.radius = failing_radius
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(KeyboardInterrupt):
        opt.first_step(zero_grad=True)
    _assert_same(weights(model), start)
    assert not opt.perturbed
    del opt.radius
    step(name, opt, model, x, y)  # usable again


# --------------------------------------------------------------------------- 8. refused bases
def test_unusable_base_optimizers_are_refused_at_construction() -> None:
    model, _ = setup()
    with pytest.raises(TypeError, match=r"cannot wrap torch\.optim\.LBFGS"):
        torchsam.SAM(model.parameters(), torch.optim.LBFGS, lr=0.1)
    with pytest.raises(TypeError, match=r"cannot wrap torch\.optim\.LBFGS"):
        torchsam.SAM(model.parameters(), torch.optim.LBFGS(model.parameters()))
    with pytest.raises(ValueError, match="differentiable=True"):
        torchsam.GSAM(model.parameters(), torch.optim.SGD, lr=0.1, differentiable=True)


# --------------------------------------------------------------------------- test_optim checks
@pytest.mark.parametrize("name", CLOSURE)
def test_step_is_noop_without_gradients(name: str) -> None:
    params = [torch.randn(2, 3, dtype=torch.float64) for _ in range(2)]
    old = [p.clone() for p in params]
    opt = VARIANTS[name].cls(params, torch.optim.SGD, lr=0.1, **VARIANTS[name].kwargs)
    with pytest.warns(RuntimeWarning, match="no parameter has a gradient"):
        opt.step(lambda: torch.ones(()))
    _assert_same(params, old)


@pytest.mark.parametrize("name", ["sam", "looksam"])
def test_compiled_training_step_matches_eager(name: str) -> None:
    runs = []
    for compiled in (False, True):
        torch._dynamo.reset()
        model, data = setup()
        opt = build(name, model)

        def train_step(x: torch.Tensor, y: torch.Tensor, model: Net = model, opt: Any = opt) -> Any:
            return step(name, opt, model, x, y)

        fn = torch.compile(train_step, backend="eager") if compiled else train_step
        for x, y in data[:4]:
            fn(x, y)
            assert not opt.perturbed
        runs.append(weights(model))
        assert opt.param_groups[0]["sam_step"] == 4
    _assert_same(runs[1], runs[0])


@pytest.mark.parametrize("name", VARIANTS)
def test_step_without_closure_is_noop_for_zero_grads(name: str) -> None:
    """test_optim's zero-gradient step, which is also how DCP creates a fresh state."""
    model, _ = setup()
    opt = build(name, model, weight_decay=0.0)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    start = weights(model)
    opt.step()
    _assert_same(weights(model), start)
    assert opt.param_groups[0]["sam_step"] == 1
    model.l1.bias.grad[0] = 1.0  # any nonzero gradient: a closure is needed
    with pytest.raises(RuntimeError, match=r"needs (a )?closure"):
        opt.step()


@pytest.mark.parametrize("name", ["sam", "looksam", "esam"])
def test_deepcopy_copies_all_public_attributes(name: str) -> None:
    """test_optim's check: the public attributes of a copy equal the original's."""
    model, data = setup()
    opt = build(name, model)
    step(name, opt, model, *data[0])
    public = {k for k in opt.__dict__ if not k.startswith("_")}
    assert {"base_optimizer", "defaults", "param_groups", "state"} <= public
    clone = copy.deepcopy(opt)
    assert public == {k for k in clone.__dict__ if not k.startswith("_")}
    assert repr(clone) == repr(opt)
