"""CIFAR files: every malformed file is one ValueError naming the file and the fault (fuzzed),
and the presets expand to their documented configuration."""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch

np = pytest.importorskip("numpy")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from torchsam.experiments.cifar import _read, cifar  # noqa: E402
from torchsam.experiments.presets import PRESETS, expand_preset, reference_lines  # noqa: E402


def write_cifar(root: Path, per_file: int = 8, seed: int = 0, classes: int = 10) -> Path:
    """CIFAR-10 files in the python format under ``root/cifar-10-batches-py``."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        entry = {
            b"data": rng.integers(0, 256, size=(per_file, 3072), dtype=np.uint8),
            b"labels": [int(v) for v in rng.integers(0, classes, size=per_file)],
        }
        (folder / name).write_bytes(pickle.dumps(entry))
    return folder


def _good(n: int = 4) -> dict[bytes, Any]:
    return {b"data": np.zeros((n, 3072), dtype=np.uint8), b"labels": [1] * n}


def _with(**changes: Any) -> dict[bytes, Any]:
    entry = _good()
    for key, value in changes.items():
        if value is None:
            del entry[key.encode()]
        else:
            entry[key.encode()] = value
    return entry


MALFORMED = [
    (_with(labels=3), r"'labels' must be a list of ints, got a int"),
    (_with(data=[[0] * 3072] * 4), r"'data' must be a numpy uint8 array .* got a list"),
    (_with(data="pixels"), r"'data' must be a numpy uint8 array .* got a str"),
    (_with(data=np.zeros((4, 3072), dtype=np.float32)), r"uint8 pixels, got dtype float32"),
    (_with(data=np.zeros((4, 3072), dtype=np.int64)), r"uint8 pixels, got dtype int64"),
    (_with(labels=[1.0, 2.0, 3.0, 4.0]), r"'labels' must hold ints, found 1\.0"),
    (_with(labels=[True] * 4), r"'labels' must hold ints, found True"),
    (_with(labels=np.ones(4, dtype=np.float64)), r"list of ints, got an array of dtype float64"),
    (_with(labels=np.ones((2, 2), dtype=np.int64)), r"got an array of dtype int64 and shape"),
    (_with(data=np.zeros((4, 3071), dtype=np.uint8)), r"shape \(N, 3072\), N >= 1, got \(4, 3071"),
    (_with(data=np.zeros((4, 3, 1024), dtype=np.uint8)), r"shape \(N, 3072\)"),
    (_with(data=np.zeros((0, 3072), dtype=np.uint8), labels=[]), r"N >= 1, got \(0, 3072\)"),
    (_with(labels=[1, 2]), r"'data' has 4 images but 'labels' has 2 labels"),
    (_with(labels=[0, 1, 10, 2]), r"labels must lie in \[0, 9\], found 10"),
    (_with(labels=[0, -1, 1, 2]), r"labels must lie in \[0, 9\], found -1"),
    (_with(labels=[2**70] * 4), r"labels must lie in \[0, 9\]"),
    (_with(labels=None), r"has no 'labels' entry"),
    (_with(data=None, labels=None), r"has no 'data' and 'labels' entry"),
    ([1, 2, 3], r"it holds a list, not a dict"),
]


@pytest.mark.parametrize(("entry", "message"), MALFORMED)
def test_malformed_files_raise_one_value_error_naming_file_and_fault(
    entry: Any, message: str, tmp_path: Path
) -> None:
    folder = write_cifar(tmp_path)
    (folder / "data_batch_3").write_bytes(pickle.dumps(entry))
    with pytest.raises(ValueError, match=message) as info:
        cifar("cifar10", tmp_path)
    assert str(folder / "data_batch_3") in str(info.value)


@pytest.mark.parametrize(
    "content",
    [b"", b"not a pickle", pickle.dumps(_good())[:-20], os.urandom(64), b"\x80\x05K\x01"],
)
def test_truncated_and_garbage_files(content: bytes, tmp_path: Path) -> None:
    folder = write_cifar(tmp_path)
    (folder / "test_batch").write_bytes(content)
    with pytest.raises(ValueError, match="is not a CIFAR batch in the python format") as info:
        cifar("cifar10", tmp_path)
    assert str(folder / "test_batch") in str(info.value)


def test_code_in_a_file_does_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self) -> tuple[Any, ...]:
            return (Path.touch, (marker,))

    folder = write_cifar(tmp_path)
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": Evil(), b"labels": [0]}))
    with pytest.raises(ValueError, match=r"refusing to load pathlib.*\.touch"):
        cifar("cifar10", tmp_path)
    assert not marker.exists()


_VALID = [pickle.dumps(_good(2), protocol=protocol) for protocol in (2, 3, 4, 5)]


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_every_pickle_protocol_reads_the_same_pixels(protocol: int, tmp_path: Path) -> None:
    pixels = np.random.default_rng(protocol).integers(0, 256, size=(3, 3072), dtype=np.uint8)
    path = tmp_path / "batch"
    path.write_bytes(pickle.dumps({"data": pixels, "labels": [0, 9, 4]}, protocol=protocol))
    data, labels = _read(path, "labels", 10)
    assert torch.equal(data, torch.from_numpy(pixels))
    assert labels.tolist() == [0, 9, 4]
    data[0, 0] = 1  # a tensor of its own, writable


def _read_bytes(content: bytes, tmp: Path) -> None:
    path = tmp / "batch"
    path.write_bytes(content)
    try:
        data, labels = _read(path, "labels", 10)
    except ValueError as exc:
        message = str(exc)
    else:  # whatever loads is exactly what the format allows
        assert data.dtype == torch.uint8
        assert data.shape[1] == 3072
        assert labels.dtype == torch.int64
        assert labels.shape == (data.shape[0],)
        return
    assert str(path) in message


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    valid=st.sampled_from(_VALID),
    edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=6),
    keep=st.integers(1, 10**6),
)
def test_fuzz_byte_corruption_gives_only_value_errors(
    valid: bytes, edits: list[tuple[int, int]], keep: int, tmp_path: Path
) -> None:
    content = bytearray(valid)
    for position, value in edits:
        content[position % len(content)] = value
    _read_bytes(bytes(content[: keep % len(content) + 1]), tmp_path)


_VALUES = st.one_of(
    st.none(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True),
    st.text(max_size=5),
    st.binary(max_size=5),
    st.lists(st.integers(-3, 12), max_size=5),
    st.lists(st.floats(), max_size=3),
    st.sampled_from(["uint8", "int8", "int64", "float32", "bool", "O"]).flatmap(
        lambda dtype: st.sampled_from([(2, 3072), (2,), (3072,), (1, 3, 1024), (0, 3072)]).map(
            lambda shape: np.zeros(shape, dtype=dtype)
        )
    ),
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=_VALUES, labels=_VALUES, as_str=st.booleans())
def test_fuzz_entries_of_any_type_give_only_value_errors(
    data: Any, labels: Any, as_str: bool, tmp_path: Path
) -> None:
    keys = ("data", "labels") if as_str else (b"data", b"labels")
    buffer = io.BytesIO()
    pickle.dump({keys[0]: data, keys[1]: labels}, buffer)
    _read_bytes(buffer.getvalue(), tmp_path)


# --------------------------------------------------------------------------- presets
def test_foret2021_expands_to_the_documented_configuration() -> None:
    common = {
        "model": "wrn28_10",
        "epochs": 200,
        "batch_size": 128,
        "lr": 0.1,
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "augment": "basic",
        "optimizers": "sgd,sam",
        "label_noise": 0.0,
        "seeds": [0],
        "preset": "foret2021",
    }
    assert expand_preset("foret2021", {}) == {**common, "dataset": "cifar10", "rho": [0.05]}
    assert expand_preset("foret2021", {"dataset": "cifar100"}) == {
        **common,
        "dataset": "cifar100",
        "rho": [0.1],
    }
    given_options = {"dataset": "cifar10", "epochs": 3, "seeds": [0, 1]}
    assert expand_preset("foret2021", given_options) == {
        **common,
        "rho": [0.05],
        **given_options,
    }
    with pytest.raises(ValueError, match="runs on cifar10 or cifar100, not 'digits'"):
        expand_preset("foret2021", {"dataset": "digits"})
    with pytest.raises(ValueError, match="Unknown preset 'foret'; use one of: foret2021"):
        expand_preset("foret", {})


def test_label_noise_preset_and_the_papers_numbers() -> None:
    options = expand_preset("foret2021-noise", {"label_noise": 0.6})
    assert (options["model"], options["label_noise"], options["rho"]) == ("resnet32", 0.6, [0.1])
    # the paper's rho at each level: 0.1, but 0.05 at 80% noise; an explicit --rho wins
    assert expand_preset("foret2021-noise", {})["rho"] == [0.1]  # the default noise, 0.4
    assert expand_preset("foret2021-noise", {"label_noise": 0.8})["rho"] == [0.05]
    assert expand_preset("foret2021-noise", {"label_noise": 0.8, "rho": [0.2]})["rho"] == [0.2]
    assert expand_preset("foret2021-noise", {"label_noise": 0.3})["rho"] == [0.1]
    assert (options["augment"], options["epochs"], options["batch_size"]) == ("basic", 200, 128)
    references = PRESETS["foret2021-noise"].references
    assert sorted(noise for _, noise in references) == [0.2, 0.4, 0.6, 0.8]
    summary = [
        {"label": "sgd", "method": "sgd", "accuracy": 50.0},
        {"label": "sam", "method": "sam", "accuracy": 88.25},
    ]
    lines = reference_lines("foret2021-noise", "cifar10", 0.6, summary)
    assert lines[0].startswith("The paper (Foret et al. 2021 (SAM), Table 4; ResNet-32")
    assert "60% label noise, rho 0.1)" in lines[0]
    assert "80% label noise, rho 0.05)" in reference_lines("foret2021-noise", "cifar10", 0.8, [])[0]
    assert "paper 48.2% (error 51.8%)  here 50.0% (error 50.0%)" in lines[1]
    assert "paper 90.5% (error 9.5%)  here 88.2% (error 11.8%)" in lines[2]
    lines = reference_lines("foret2021", "cifar10", 0.0, summary)
    assert "paper 96.5% (error 3.5%)" in lines[1]
    assert "paper 97.3% (error 2.7%)" in lines[2]
    assert (
        "no number for cifar10 at label noise 0.3"
        in reference_lines("foret2021-noise", "cifar10", 0.3, summary)[0]
    )
