"""The experiments package: the noisy digits, the MLP, the training loop and its registry."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import torchsam
from torchsam.experiments import (
    METHODS,
    Batch,
    Split,
    StepFn,
    TrainContext,
    closure_step,
    get_method,
    mlp,
    noisy_digits,
    noisy_signals,
    register_method,
    sharpness_aware,
    small_cnn,
    train,
)

ROOT = Path(__file__).resolve().parent.parent
N_DIGITS = 1797
BATCH = 64


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """One intra-op thread: the models are tiny, and two OpenMP threads on a busy two-core
    machine can make a one-epoch run take seconds instead of milliseconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def split() -> Split:
    pytest.importorskip("sklearn")
    return noisy_digits(0.2, seed=0)


@pytest.fixture
def temporary_methods() -> Iterator[list[str]]:
    """Names registered during a test, removed afterwards."""
    names: list[str] = []
    yield names
    for name in names:
        METHODS.pop(name, None)


def _fields(split: Split) -> dict[str, Any]:
    return {name: getattr(split, name) for name in Split.__dataclass_fields__}


# --------------------------------------------------------------------------- data
def test_noisy_digits_is_deterministic_in_the_seed(split: Split) -> None:
    again = _fields(noisy_digits(0.2, seed=0))
    for name, value in _fields(split).items():
        if isinstance(value, Tensor):
            assert torch.equal(value, again[name]), name
        else:
            assert value == again[name], name
    other = noisy_digits(0.2, seed=1)
    assert not torch.equal(other.test_index, split.test_index)
    assert not torch.equal(other.noisy_index, split.noisy_index)


def test_noisy_digits_shapes_dtypes_and_split(split: Split) -> None:
    n_train, n_test = split.x_train.shape[0], split.x_test.shape[0]
    assert n_train + n_test == N_DIGITS
    assert split.x_train.shape == (n_train, 64)
    assert split.x_test.shape == (n_test, 64)
    assert split.num_features == 64
    assert split.num_classes == 10
    assert split.x_train.dtype == split.x_test.dtype == torch.float32
    for y in (split.y_train, split.y_train_clean, split.y_test):
        assert y.dtype == torch.int64
    assert split.y_train.shape == split.y_train_clean.shape == (n_train,)
    assert split.y_test.shape == (n_test,)
    # features scaled to [0, 1]: the raw pixels are integers 0..16
    for x in (split.x_train, split.x_test):
        assert x.min() >= 0.0
        assert x.max() <= 1.0
        assert torch.equal(x * 16, (x * 16).round())
    assert split.x_train.max() == 1.0
    # the indices partition the dataset, and each class is split in proportion
    everything = torch.cat([split.train_index, split.test_index]).sort().values
    assert torch.equal(everything, torch.arange(N_DIGITS))
    y_all = torch.empty(N_DIGITS, dtype=torch.int64)
    y_all[split.train_index] = split.y_train_clean
    y_all[split.test_index] = split.y_test
    for c in range(10):
        assert (split.y_test == c).sum().item() == round(0.3 * (y_all == c).sum().item())


@pytest.mark.parametrize("noise", [0.0, 0.05, 0.2, 0.5, 0.9])
def test_noise_fraction_is_exact_and_labels_change(noise: float) -> None:
    pytest.importorskip("sklearn")
    split = noisy_digits(noise, seed=3)
    n_train = split.y_train.numel()
    flipped = torch.nonzero(split.y_train != split.y_train_clean).flatten()
    assert flipped.numel() == round(noise * n_train)
    assert torch.equal(flipped, split.noisy_index)
    kept = torch.ones(n_train, dtype=torch.bool)
    kept[split.noisy_index] = False
    assert torch.equal(split.y_train[kept], split.y_train_clean[kept])
    assert split.y_train.min() >= 0
    assert split.y_train.max() < 10
    assert split.noise == pytest.approx(round(noise * n_train) / n_train)


def test_noise_is_symmetric_over_the_other_classes() -> None:
    pytest.importorskip("sklearn")
    split = noisy_digits(0.9, seed=0)
    offsets = (split.y_train - split.y_train_clean)[split.noisy_index] % 10
    counts = torch.bincount(offsets, minlength=10)
    assert counts[0] == 0  # never the same class
    expected = split.noisy_index.numel() / 9
    assert counts[1:].min() > 0.7 * expected
    assert counts[1:].max() < 1.3 * expected


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"noise": -0.1}, r"Invalid noise value: -0\.1; noise must lie in \[0, 1\)"),
        ({"noise": 1.0}, r"Invalid noise value: 1\.0; noise must lie in \[0, 1\)"),
        ({"noise": float("nan")}, r"Invalid noise value: nan"),
        ({"noise": True}, r"Invalid noise value: True; noise must be a number"),
        ({"noise": "0.2"}, r"Invalid noise value: '0\.2'"),
        ({"test_fraction": 0.0}, r"Invalid test_fraction value: 0\.0; .* \(0, 1\)"),
        ({"test_fraction": 1.0}, r"Invalid test_fraction value: 1\.0; .* \(0, 1\)"),
        ({"seed": 1.5}, r"Invalid seed value: 1\.5; seed must be an int"),
    ],
)
def test_noisy_digits_rejects_bad_arguments(kwargs: dict[str, Any], match: str) -> None:
    # argument checks come before the import: no scikit-learn needed
    with pytest.raises(ValueError, match=match):
        noisy_digits(**kwargs)


def test_noisy_digits_rejects_an_empty_test_set() -> None:
    pytest.importorskip("sklearn")
    with pytest.raises(ValueError, match="leaves the test set empty"):
        noisy_digits(test_fraction=1e-4)


def test_missing_scikit_learn_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    # a None entry in sys.modules makes the import fail as if the package were absent
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r'pip install "torchsam\[data\]"'):
        noisy_digits()


def test_noisy_signals_is_deterministic_sized_and_split_per_class() -> None:
    split = noisy_signals(0.3, samples_per_class=50, length=32, seed=4)
    again = _fields(noisy_signals(0.3, samples_per_class=50, length=32, seed=4))
    for name, value in _fields(split).items():
        if isinstance(value, Tensor):
            assert torch.equal(value, again[name]), name
        else:
            assert value == again[name], name
    other = noisy_signals(0.3, samples_per_class=50, length=32, seed=5)
    assert not torch.equal(other.x_train, split.x_train)
    assert split.num_classes == 6
    assert split.num_features == 32
    assert split.x_train.dtype == split.x_test.dtype == torch.float32
    assert split.x_train.shape[0] + split.x_test.shape[0] == 300
    everything = torch.cat([split.train_index, split.test_index]).sort().values
    assert torch.equal(everything, torch.arange(300))
    # samples are generated class by class, 50 each; 15 of each go to the test set
    assert torch.equal(split.y_train_clean, split.train_index // 50)
    assert torch.equal(split.y_test, split.test_index // 50)
    assert torch.equal(torch.bincount(split.y_test), torch.full((6,), 15))
    flipped = torch.nonzero(split.y_train != split.y_train_clean).flatten()
    assert torch.equal(flipped, split.noisy_index)
    assert flipped.numel() == round(0.3 * 210)


def test_noisy_signals_classes_are_a_frequency_and_a_burst_half() -> None:
    # without additive noise, each class's mean spectrum peaks at its frequency (3, 4, 5
    # cycles per window) and its mean signal (the phase averages the sine out) is the burst,
    # in the first half of the window for even classes and in the second for odd ones
    split = noisy_signals(0.0, samples_per_class=200, length=64, signal_noise=0.0, seed=0)
    x = torch.cat([split.x_train, split.x_test]).double()
    y = torch.cat([split.y_train_clean, split.y_test])
    assert x.abs().max() <= 1.5 + 2.0 + 1e-6  # amplitude <= 1.5, burst height <= 2
    spectrum = torch.fft.rfft(x, dim=1).abs()
    for c in range(6):
        rows = y == c
        assert spectrum[rows, 1:10].mean(dim=0).argmax().item() + 1 == 3 + c // 2
        mean = x[rows].mean(dim=0)
        first, second = mean[:32].sum().item(), mean[32:].sum().item()
        assert (first > second + 1.0) if c % 2 == 0 else (second > first + 1.0)
    noisy = noisy_signals(0.0, samples_per_class=200, length=64, signal_noise=2.0, seed=0)
    residual = torch.cat([noisy.x_train, noisy.x_test]) - torch.cat([split.x_train, split.x_test])
    assert residual.std().item() == pytest.approx(2.0, rel=0.02)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"noise": 1.0}, r"Invalid noise value: 1\.0; noise must lie in \[0, 1\)"),
        ({"samples_per_class": 1}, r"Invalid samples_per_class value: 1; .* >= 2"),
        ({"length": 4}, r"Invalid length value: 4; length must be an int >= 8"),
        ({"signal_noise": -1.0}, r"Invalid signal_noise value: -1\.0; .* >= 0"),
        ({"signal_noise": float("inf")}, r"Invalid signal_noise value: inf"),
        ({"test_fraction": 0.0}, r"Invalid test_fraction value: 0\.0"),
        ({"seed": "0"}, r"Invalid seed value: '0'; seed must be an int"),
    ],
)
def test_noisy_signals_rejects_bad_arguments(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        noisy_signals(**kwargs)


def test_noisy_signals_rejects_an_empty_test_set() -> None:
    with pytest.raises(ValueError, match="leaves the test set empty"):
        noisy_signals(samples_per_class=2, test_fraction=0.1)


# --------------------------------------------------------------------------- model
@pytest.mark.parametrize("batch_norm", [True, False])
def test_mlp_layers_and_output(batch_norm: bool) -> None:
    model = mlp(in_features=7, num_classes=3, hidden=5, depth=3, batch_norm=batch_norm)
    assert isinstance(model, nn.Sequential)
    linears = [m for m in model if isinstance(m, nn.Linear)]
    norms = [m for m in model if isinstance(m, nn.BatchNorm1d)]
    assert [(m.in_features, m.out_features) for m in linears] == [(7, 5), (5, 5), (5, 5), (5, 3)]
    assert len(norms) == (3 if batch_norm else 0)
    assert model(torch.zeros(4, 7)).shape == (4, 3)


@pytest.mark.parametrize("name", ["in_features", "num_classes", "hidden", "depth"])
@pytest.mark.parametrize("value", [0, 2.0, True])
def test_mlp_rejects_bad_sizes(name: str, value: Any) -> None:
    with pytest.raises(ValueError, match=f"Invalid {name} value"):
        mlp(**{name: value})


@pytest.mark.parametrize("batch_norm", [True, False])
def test_small_cnn_layers_and_output(batch_norm: bool) -> None:
    model = small_cnn(image_shape=(3, 6, 6), num_classes=4, channels=5, batch_norm=batch_norm)
    convs = [m for m in model if isinstance(m, nn.Conv2d)]
    norms = [m for m in model if isinstance(m, nn.BatchNorm2d)]
    assert [(m.in_channels, m.out_channels) for m in convs] == [(3, 5), (5, 10)]
    assert len(norms) == (2 if batch_norm else 0)
    assert model(torch.zeros(2, 3 * 6 * 6)).shape == (2, 4)  # flat rows
    assert model(torch.zeros(2, 3, 6, 6)).shape == (2, 4)  # or images


@pytest.mark.parametrize("name", ["num_classes", "channels"])
def test_small_cnn_rejects_bad_sizes(name: str) -> None:
    with pytest.raises(ValueError, match=f"Invalid {name} value"):
        small_cnn(**{name: 0})
    with pytest.raises(ValueError, match="image_shape"):
        small_cnn(image_shape=(8, 8))  # type: ignore[arg-type]


# --------------------------------------------------------------------------- training
@pytest.mark.parametrize(("method", "forwards"), [("sgd", 1), ("sam", 2)])
def test_train_runs_counts_forwards_and_is_deterministic(
    split: Split, method: str, forwards: int
) -> None:
    rng = torch.get_rng_state()
    first = train(method, split, epochs=1, seed=0)
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's random stream is untouched
    steps = split.x_train.shape[0] // BATCH
    assert first.method == method
    assert first.steps == steps
    assert first.forward_passes == forwards * steps
    assert first.forward_samples == forwards * steps * BATCH
    assert first.forwards_per_step == forwards
    assert first.wall_time > 0
    assert 0.5 < first.test_accuracy <= 1.0  # chance is 0.1
    assert 0.5 < first.train_accuracy <= 1.0
    again = train(method, split, epochs=1, seed=0)
    assert again.test_accuracy == first.test_accuracy
    assert again.train_accuracy == first.train_accuracy
    other = train(method, split, epochs=1, seed=1)
    assert (other.test_accuracy, other.train_accuracy) != (
        first.test_accuracy,
        first.train_accuracy,
    )


def test_a_cpu_run_seeds_no_cuda_generator(split: Split, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where CUDA is not initialised a run on the CPU leaves CUDA's generators alone:
    ``torch.manual_seed`` would queue its seed for CUDA's later initialisation (in place of
    the caller's), which no fork of the generators can undo."""
    if torch.cuda.is_initialized():
        pytest.skip("CUDA is initialised: its generators are forked (the CUDA test below)")
    seeded: list[int] = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", seeded.append)
    rng = torch.get_rng_state()
    train("sgd", split, epochs=1, seed=3)
    assert seeded == []
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_train_leaves_the_callers_cuda_random_stream_alone(split: Split, device: str) -> None:
    """``torch.manual_seed`` in a run reseeds every CUDA device: their states are restored."""
    torch.cuda.manual_seed_all(123)
    expected = [torch.rand(4, device=f"cuda:{i}") for i in range(torch.cuda.device_count())]
    torch.cuda.manual_seed_all(123)
    train("sgd", split, epochs=1, device=device)
    drawn = [torch.rand(4, device=f"cuda:{i}") for i in range(torch.cuda.device_count())]
    assert all(torch.equal(a, b) for a, b in zip(drawn, expected, strict=True))


def test_sam_updates_batchnorm_statistics_once_per_step(split: Split) -> None:
    models: list[nn.Module] = []

    def model_fn(s: Split) -> nn.Module:
        models.append(mlp(s.num_features, s.num_classes))
        return models[-1]

    result = train("sam", split, epochs=1, model_fn=model_fn)
    norms = [m for m in models[0].modules() if isinstance(m, nn.BatchNorm1d)]
    assert norms
    for norm in norms:
        assert norm.num_batches_tracked.item() == result.steps


def test_method_options_reach_the_optimizer(split: Split) -> None:
    built: list[torch.optim.Optimizer] = []

    def model_fn(s: Split) -> nn.Module:
        return mlp(s.num_features, s.num_classes, hidden=8, depth=1)

    factory = get_method("sam").make_optimizer

    def recording(params: Any, **kwargs: Any) -> torch.optim.Optimizer:
        built.append(factory(params, **kwargs))
        return built[-1]

    train(recording, split, epochs=1, model_fn=model_fn, lr=0.1, rho=0.3, adaptive=True)
    (optimizer,) = built
    assert isinstance(optimizer, torchsam.SAM)
    group = optimizer.param_groups[0]
    assert (group["rho"], group["adaptive"], group["momentum"]) == (0.3, True, 0.9)
    assert group["weight_decay"] == 5e-4
    assert group["lr"] == pytest.approx(0.0, abs=1e-9)  # cosine schedule down to 0
    assert group["initial_lr"] == 0.1


def test_registered_method_with_its_own_step(split: Split, temporary_methods: list[str]) -> None:
    seen: list[Batch] = []
    options: dict[str, Any] = {}

    def make_step(context: TrainContext, *, weight: float) -> StepFn:
        options["weight"] = weight
        options["total_steps"] = context.total_steps
        standard = closure_step(context)

        def step(batch: Batch) -> Tensor:
            seen.append(batch)
            return standard(batch)

        return step

    temporary_methods.append("test-asam")
    register_method(
        "test-asam",
        sharpness_aware(torchsam.SAM),
        make_step=make_step,
        defaults={"rho": 0.5, "adaptive": True, "weight": 1.0},
        step_options={"weight"},
    )
    assert "test-asam" in METHODS
    result = train("test-asam", split, epochs=2, weight=2.0)
    assert options == {"weight": 2.0, "total_steps": result.steps}
    assert result.forward_passes == 2 * result.steps
    steps_per_epoch = result.steps // 2
    assert [b.step for b in seen] == list(range(result.steps))
    assert [b.epoch for b in seen] == [0] * steps_per_epoch + [1] * steps_per_epoch
    first_epoch = torch.cat([b.index for b in seen[:steps_per_epoch]])
    assert first_epoch.unique().numel() == first_epoch.numel()  # no sample twice in an epoch
    assert torch.equal(seen[0].y, split.y_train[seen[0].index])  # the noisy labels
    with pytest.raises(ValueError, match="already registered"):
        register_method("test-asam", sharpness_aware(torchsam.SAM))


def test_registry_and_train_errors(split: Split) -> None:
    assert list(METHODS)[:2] == ["sgd", "sam"]
    with pytest.raises(ValueError, match=r"Unknown method 'nope'; registered: sgd, sam"):
        train("nope", split, epochs=1)
    with pytest.raises(ValueError, match="Invalid method name"):
        register_method("a,b", sharpness_aware(torchsam.SAM))
    with pytest.raises(ValueError, match="Invalid epochs value: 0"):
        train("sgd", split, epochs=0)
    with pytest.raises(ValueError, match="Invalid batch_size value: 5000"):
        train("sgd", split, epochs=1, batch_size=5000)
    with pytest.raises(TypeError, match=r"not a torch\.optim\.Optimizer"):
        train(lambda params, **kw: object(), split, epochs=1)


# --------------------------------------------------------------------------- benchmark
def test_variants_benchmark_smoke_run() -> None:
    pytest.importorskip("sklearn")
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_variants.py"), "--quick"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    assert "gain vs SGD (pp)" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
    assert rows["sgd"][-1] == "1.00"  # forward passes per step
    assert rows["sam"][-1] == "2.00"
    assert "not deterministic" not in out


def test_aligned_table_pads_underlines_and_strips() -> None:
    from torchsam.experiments.tables import aligned

    rows = [("name", "x"), ("sgd", "1.00x"), ("momentumsam", "")]
    assert aligned(rows) == "\n".join(
        [
            "name         x",
            "-----------  -----",
            "sgd          1.00x",
            "momentumsam",
        ]
    )
