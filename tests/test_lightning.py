"""torchsam in PyTorch Lightning: trained by ``lightning.Trainer`` against a plain loop.

Every comparison trains a tiny model (float64; float32 under bfloat16 autocast) for a few steps
on CPU, once with the Trainer and once with torchsam's closure style written out here, from the
same seed and data. The examples of docs/integrations/lightning.md are run as written.
Lightning's ``strategy="ddp"`` runs on two CPU processes from ``tests/_lightning_ddp.py``.
"""

from __future__ import annotations

import functools
import importlib
import re
import subprocess
import sys
import types
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("lightning")

import lightning as L
import torch
from lightning.pytorch.callbacks import GradientAccumulationScheduler
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy
from torch import Tensor, nn
from torch.utils.data import DataLoader

import torchsam
import torchsam.lightning
from tests import _lightning_ddp

LIGHTNING_PAGE = Path(__file__).resolve().parent.parent / "docs" / "integrations" / "lightning.md"
BATCHES, BATCH = 6, 8
Factory = Callable[[Any], torch.optim.Optimizer]


def make_model(batchnorm: bool = False) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(5, 8), *([nn.BatchNorm1d(8)] if batchnorm else []), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(8, 3)).double()


def make_batches(dtype: torch.dtype = torch.float64) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(BATCH, 5, generator=g).to(dtype), torch.randint(0, 3, (BATCH,), generator=g))
        for _ in range(BATCHES)
    ]


def loss_fn(out: Tensor, y: Tensor) -> Tensor:
    return nn.functional.cross_entropy(out, y)


def sam(params: Any) -> torch.optim.Optimizer:
    return torchsam.SAM(params, torch.optim.SGD, rho=0.1, lr=0.2, momentum=0.9)


def asam(params: Any) -> torch.optim.Optimizer:
    return torchsam.SAM(params, torch.optim.SGD, rho=0.5, adaptive=True, lr=0.2, momentum=0.9)


def looksam(params: Any) -> torch.optim.Optimizer:
    return torchsam.LookSAM(params, torch.optim.SGD, rho=0.1, k=2, lr=0.2, momentum=0.9)


def intermittent(params: Any) -> torch.optim.Optimizer:
    return torchsam.IntermittentSAM(params, torch.optim.SGD, rho=0.1, every=2, lr=0.2)


def scheduled(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)


class Lit(L.LightningModule):
    """A LightningModule around ``model`` with the optimizer ``factory`` and a per-step
    scheduler; it records ``optimizer.perturbed`` and the base optimizer's learning rate at
    every ``training_step``."""

    def __init__(self, model: nn.Module, factory: Factory) -> None:
        super().__init__()
        self.model = model
        self.factory = factory
        self.perturbed: list[bool] = []
        self.lrs: list[float] = []

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        optimizer = self.optimizers()
        self.perturbed.append(bool(getattr(optimizer, "perturbed", False)))
        base = getattr(optimizer, "base_optimizer", optimizer)
        self.lrs.append(base.param_groups[0]["lr"])  # the base optimizer's learning rate
        return loss_fn(self.model(x), y)

    def configure_optimizers(self) -> Any:
        optimizer = self.factory(self.parameters())
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduled(optimizer), "interval": "step"},
        }


def fit(
    module: L.LightningModule,
    batches: list[Any] | None = None,
    ckpt_path: Path | None = None,
    **trainer: Any,
) -> L.Trainer:
    trainer.setdefault("max_epochs", 1)
    run = L.Trainer(
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        enable_checkpointing=False,
        **trainer,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*LeafSpec.*")  # Lightning's, on new torch
        loader = DataLoader(make_batches() if batches is None else batches, batch_size=None)
        run.fit(module, loader, ckpt_path=ckpt_path)
    return run


def closure_loop(
    model: nn.Module,
    factory: Factory,
    *,
    clip: float | None = None,
    clip_value: float | None = None,
    batchnorm_frozen: bool = False,
) -> nn.Module:
    """torchsam's closure style; the closure clips after backward(), as Lightning does."""
    optimizer = factory(model.parameters())
    scheduler = scheduled(optimizer)
    for x, y in make_batches():

        def closure(x: Tensor = x, y: Tensor = y) -> Tensor:
            optimizer.zero_grad()
            frozen = batchnorm_frozen and optimizer.perturbed  # type: ignore[attr-defined]
            with torchsam.freeze_running_stats(model, enabled=frozen):
                loss = loss_fn(model(x), y)
            loss.backward()
            if clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), clip)
            if clip_value is not None:
                nn.utils.clip_grad_value_(model.parameters(), clip_value)
            return loss

        optimizer.step(closure)
        scheduler.step()
    return model


def assert_same(a: nn.Module, b: nn.Module, exact: bool = True) -> None:
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        if exact:
            assert torch.equal(p, q), name
        else:
            # the epsilons of the norms (1e-12 in SAM's, 1e-6 in clip_grad_norm_) differ
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12, msg=name)


def readme_blocks() -> list[str]:
    return re.findall(r"```py\n(.*?)```", LIGHTNING_PAGE.read_text(), flags=re.DOTALL)


def run_readme_block(
    index: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[nn.Module, L.Trainer]:
    """Run the examples of docs/integrations/lightning.md up to block ``index``; the model and
    trainer of the last one.

    The Trainer runs without progress bar, logger, checkpoints and summary (which change
    nothing in training and take seconds).
    """
    quiet = dict(
        enable_progress_bar=False,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    monkeypatch.setattr(L, "Trainer", functools.partial(L.Trainer, **quiet))
    monkeypatch.chdir(tmp_path)
    models: list[nn.Module] = []

    def your_model() -> nn.Module:
        models.append(make_model(batchnorm=True))
        return models[-1]

    loader = DataLoader(make_batches(), batch_size=None)
    ns: dict[str, Any] = {"YourModel": your_model, "loss_fn": loss_fn, "train_loader": loader}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*LeafSpec.*")
        for i, block in enumerate(readme_blocks()[: index + 1]):
            exec(compile(block, f"lightning.md block {i + 1}", "exec"), ns)
    return models[-1], ns["trainer"]


def readme_optimizer(params: Any) -> torch.optim.Optimizer:
    return torchsam.SAM(params, torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)


# ---------------------------------------------------------------------------- automatic
def test_readme_automatic_example_equals_the_closure_style(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trained, _ = run_readme_block(0, tmp_path, monkeypatch)
    reference = closure_loop(
        make_model(batchnorm=True), readme_optimizer, clip=1.0, batchnorm_frozen=True
    )
    assert_same(trained, reference)  # weights and BatchNorm statistics
    assert not torch.equal(trained[0].weight, make_model()[0].weight)


@pytest.mark.parametrize("factory", [sam, looksam, intermittent], ids=lambda f: f.__name__)
def test_variants_with_clipping_and_scheduler_equal_the_closure_style(factory: Factory) -> None:
    module = Lit(make_model(), factory)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no scheduler-order warning
        fit(module, gradient_clip_val=0.05)
    assert_same(module.model, closure_loop(make_model(), factory, clip=0.05))
    # the clipping was active, and the scheduler stepped every optimizer step
    unclipped = closure_loop(make_model(), factory)
    assert not torch.equal(module.model[0].weight, unclipped[0].weight)
    steps = [
        lr for lr, perturbed in zip(module.lrs, module.perturbed, strict=True) if not perturbed
    ]
    assert steps == [0.2, 0.2, 0.1, 0.1, 0.05, 0.05]


def test_value_clipping_equals_the_closure_style() -> None:
    module = Lit(make_model(), looksam)
    fit(module, gradient_clip_val=0.01, gradient_clip_algorithm="value")
    assert_same(module.model, closure_loop(make_model(), looksam, clip_value=0.01))


def test_clipping_the_first_gradient_by_norm_leaves_sam_and_asam_unchanged() -> None:
    """Lightning clips both passes; SAM's two-call recipe clips only the second gradient."""
    for factory in (sam, asam):
        module = Lit(make_model(), factory)
        fit(module, gradient_clip_val=0.05)
        model = make_model()
        optimizer = factory(model.parameters())
        scheduler = scheduled(optimizer)
        for x, y in make_batches():
            loss_fn(model(x), y).backward()
            optimizer.first_step(zero_grad=True)  # type: ignore[attr-defined]
            loss_fn(model(x), y).backward()
            nn.utils.clip_grad_norm_(model.parameters(), 0.05)
            optimizer.second_step(zero_grad=True)  # type: ignore[attr-defined]
            scheduler.step()
        assert_same(module.model, model, exact=False)


def test_training_step_sees_which_pass_it_is() -> None:
    """Two passes per SAM step, the second perturbed; one on IntermittentSAM's plain steps."""
    module = Lit(make_model(), sam)
    run = fit(module)
    assert module.perturbed == [False, True] * BATCHES
    assert run.global_step == BATCHES
    module = Lit(make_model(), intermittent)
    fit(module)
    assert module.perturbed == [False, True, False] * (BATCHES // 2)


def test_bf16_mixed_precision_equals_a_closure_under_autocast() -> None:
    batches = make_batches(torch.float32)
    module = Lit(make_model().float(), sam)
    fit(module, batches, precision="bf16-mixed")
    model = make_model().float()
    optimizer = sam(model.parameters())
    scheduler = scheduled(optimizer)
    for x, y in batches:

        def closure(x: Tensor = x, y: Tensor = y) -> Tensor:
            optimizer.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = loss_fn(model(x), y)
            loss.backward()
            return loss

        optimizer.step(closure)
        scheduler.step()
    assert_same(module.model, model)
    assert not torch.equal(model[0].weight, make_model().float()[0].weight)


@pytest.mark.parametrize("factory", [sam, looksam], ids=lambda f: f.__name__)
def test_resuming_from_a_lightning_checkpoint_is_exact(factory: Factory, tmp_path: Path) -> None:
    """Base-optimizer, torchsam and scheduler state go through Lightning's checkpoint."""
    batches = make_batches()[:3]
    straight = Lit(make_model(), factory)
    fit(straight, batches, max_epochs=2)
    first = Lit(make_model(), factory)
    run = fit(first, batches, max_epochs=1)
    run.save_checkpoint(tmp_path / "one.ckpt")
    saved = torch.load(tmp_path / "one.ckpt", weights_only=True)["optimizer_states"][0]
    keys = {key for entry in saved["state"].values() for key in entry}
    assert "momentum_buffer" in keys
    assert factory is sam or any(key.startswith("sam.") for key in keys)  # LookSAM's g_v
    resumed = Lit(make_model(), factory)
    fit(resumed, batches, max_epochs=2, ckpt_path=tmp_path / "one.ckpt")
    assert_same(resumed.model, straight.model)
    assert resumed.lrs[-1] == straight.lrs[-1] < 0.2


# ---------------------------------------------------------------------------- refused
def test_accumulation_in_automatic_optimisation_is_refused() -> None:
    check = torchsam.lightning.SharpnessAwareCheck()
    with pytest.raises(ValueError, match=r"accumulate_grad_batches=2.*only the last micro-batch"):
        fit(Lit(make_model(), sam), accumulate_grad_batches=2, callbacks=[check])
    # without the callback the optimizer's own check raises at the first step
    with pytest.raises(RuntimeError, match="added its gradients to gradients"):
        fit(Lit(make_model(), looksam), accumulate_grad_batches=2)
    # accumulation switched on in the second epoch by Lightning's scheduler of it
    later = GradientAccumulationScheduler({1: 2})
    module = Lit(make_model(), sam)
    with pytest.raises(ValueError, match=r"accumulate_grad_batches=2"):
        fit(module, max_epochs=2, callbacks=[check, later])
    assert len(module.perturbed) == 2 * BATCHES  # the first epoch trained
    # other optimizers are not the callback's business
    plain = Lit(make_model(), lambda params: torch.optim.SGD(params, lr=0.1))
    fit(plain, accumulate_grad_batches=2, callbacks=[check])


def test_a_gradient_scaler_is_refused() -> None:
    def scaled() -> MixedPrecision:
        return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))

    batches = make_batches(torch.float32)
    check = torchsam.lightning.SharpnessAwareCheck()
    with pytest.raises(ValueError, match=r"gradient scaler.*bf16-mixed"):
        fit(Lit(make_model().float(), sam), batches, plugins=[scaled()], callbacks=[check])
    with pytest.raises(RuntimeError, match=r"GradScaler.step\(\) cannot drive SAM"):
        fit(Lit(make_model().float(), sam), batches, plugins=[scaled()])


@pytest.mark.parametrize("strategy", [DeepSpeedStrategy, FSDPStrategy], ids=lambda c: c.__name__)
def test_sharding_strategies_are_refused(strategy: type) -> None:
    """DeepSpeed (not installed here) steps its own copy of the optimizer; FSDP1 shards the
    parameters, so each shard would be perturbed with its own gradient norm."""
    optimizer = sam(make_model().parameters())
    trainer = types.SimpleNamespace(
        optimizers=[optimizer],
        lightning_module=types.SimpleNamespace(automatic_optimization=True),
        accumulate_grad_batches=1,
        precision_plugin=types.SimpleNamespace(),
        strategy=strategy.__new__(strategy),
    )
    with pytest.raises(ValueError, match=strategy.__name__.removesuffix("Strategy")):
        torchsam.lightning.check_trainer(trainer)  # type: ignore[arg-type]
    trainer.strategy = DDPStrategy()
    torchsam.lightning.check_trainer(trainer)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- manual
def test_readme_manual_accumulation_equals_the_closure_style(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trained, trainer = run_readme_block(1, tmp_path, monkeypatch)
    assert trainer.global_step == BATCHES  # Lightning counted the manual steps
    model = make_model(batchnorm=True)
    optimizer = readme_optimizer(model.parameters())
    scheduler = scheduled(optimizer)
    for x, y in make_batches():

        def closure(x: Tensor = x, y: Tensor = y) -> Tensor:
            optimizer.zero_grad()
            with torchsam.freeze_running_stats(model, enabled=optimizer.perturbed):  # type: ignore[attr-defined]
                for xb, yb in zip(x.chunk(2), y.chunk(2), strict=True):
                    (loss_fn(model(xb), yb) * len(xb) / len(x)).backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            return torch.zeros(())

        optimizer.step(closure)
        scheduler.step()
    assert_same(trained, model)


# ---------------------------------------------------------------------------- DDP
@pytest.fixture(scope="module")
def ddp_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """What each of the two ranks of ``tests/_lightning_ddp.py`` ended with, per run."""
    out = tmp_path_factory.mktemp("lightning_ddp")
    done = subprocess.run(
        [sys.executable, _lightning_ddp.__file__, str(out)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


def test_ddp_strategy_synchronised_and_local(ddp_ranks: list[dict[str, Any]]) -> None:
    """Lightning's strategy="ddp" on two CPU processes (gloo), automatic and manual: both
    passes all-reduced equal one process on the whole batch; with LocalPerturbation, each rank
    perturbed with its own gradient, one all-reduce per step instead of two (IntermittentSAM's
    steps without second pass all-reduced too)."""
    ranks = ddp_ranks
    synchronised = _lightning_ddp.one_process()
    local = _lightning_ddp.local_reference()
    steps, micro = _lightning_ddp.STEPS, _lightning_ddp.MICRO
    expected = {  # (reference, gradient all-reduces): one per pass and micro-batch
        "automatic": (synchronised, 2 * steps),
        "manual": (synchronised, 2 * micro * steps),
        "local automatic": (local, steps),
        "local manual": (local, micro * steps),
        # a SAM step every 2 steps: its one-pass steps are all-reduced
        "local intermittent": (_lightning_ddp.local_reference(every=2), steps),
    }
    for run, (reference, all_reduces) in expected.items():
        for a, b in zip(ranks[0][run]["weights"], ranks[1][run]["weights"], strict=True):
            assert torch.equal(a, b), run  # the ranks stay bit-identical
        for a, b in zip(ranks[0][run]["weights"], reference, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=run)
        assert ranks[0][run]["all_reduces"] == ranks[1][run]["all_reduces"] == all_reduces, run
        assert ranks[0][run]["skipped"] == ranks[1][run]["skipped"] == 0, run
    # the references differ from each other and from the start, and the clipping is active
    for a, b in (
        (synchronised, local),
        (synchronised, list(_lightning_ddp.make_model().parameters())),
        (synchronised, _lightning_ddp.one_process(clip=None)),
    ):
        assert not torch.allclose(a[0], b[0], rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("run", ["local nan", "local inf clipped by value"])
def test_local_perturbation_skips_a_non_finite_step_on_every_rank(
    ddp_ranks: list[dict[str, Any]], run: str
) -> None:
    """A NaN (or an inf, then clipped by value) in one rank's local first gradient: every rank
    skips that step, as with sam_pass(local=True), and the ranks stay bit-identical (before
    the fix the other rank stepped)."""
    rank0, rank1 = ddp_ranks[0][run], ddp_ranks[1][run]
    for a, b in zip(rank0["weights"], rank1["weights"], strict=True):
        assert torch.equal(a, b)
    assert rank0["skipped"] == rank1["skipped"] == 1
    # still one gradient all-reduce per step (the flag's all-reduce is not a gradient's)
    assert rank0["all_reduces"] == rank1["all_reduces"] == _lightning_ddp.STEPS
    if run == "local nan":  # the steps taken are those of the per-rank reference
        skipped = _lightning_ddp.local_reference(skip=_lightning_ddp.NON_FINITE_STEP)
        assert not torch.allclose(skipped[0], _lightning_ddp.local_reference()[0])
        for a, b in zip(rank0["weights"], skipped, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    initial = list(_lightning_ddp.make_model().parameters())
    assert not torch.allclose(rank0["weights"][0], initial[0])  # the other steps were taken


def test_local_perturbation_refuses_what_it_cannot_do() -> None:
    local = torchsam.lightning.LocalPerturbation()
    with pytest.raises(ValueError, match="needs strategy='ddp'"):
        fit(Lit(make_model(), sam), callbacks=[local])
    for cls in (torchsam.GSAM, torchsam.WSAM, torchsam.LookSAM):
        module = Lit(make_model(), functools.partial(cls, base_optimizer=torch.optim.SGD, lr=0.1))
        with pytest.raises(ValueError, match=f"{cls.__name__}: its final gradient uses"):
            fit(module, callbacks=[local])


def test_importing_torchsam_does_not_import_lightning() -> None:
    code = "import sys, torchsam; assert 'lightning' not in sys.modules, 'lightning imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_lightning_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "torchsam.lightning")
    monkeypatch.setitem(sys.modules, "lightning.pytorch", None)  # as if it were not installed
    with pytest.raises(ImportError, match=r'pip install "torchsam\[lightning\]"'):
        importlib.import_module("torchsam.lightning")
