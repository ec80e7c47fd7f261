"""Presets of ``torchsam compare``: a paper's protocol one flag away, with its numbers.

A :class:`Preset` expands to options of the comparison (:class:`CompareConfig
<torchsam.experiments.compare.CompareConfig>` fields); options given on the command line win
over it. Its :class:`Reference` holds the test accuracies the paper reports for the same
setting, which the command prints beside the user's own (:func:`reference_lines`).

* ``foret2021``: the CIFAR protocol of Foret et al., "Sharpness-Aware Minimization for
  Efficiently Improving Generalization" (ICLR 2021), Table 1, WideResNet-28-10, 200 epochs,
  basic augmentation: SGD against SAM, batch 128, learning rate 0.1 on a cosine schedule,
  momentum 0.9, weight decay 5e-4, ``rho`` 0.05 on CIFAR-10 and 0.1 on CIFAR-100, no label
  noise. The paper reports the error rate averaged over 5 runs; the preset runs one seed
  (``--seeds 5`` for five).
* ``foret2021-noise``: the label-noise protocol of the same paper (Table 4): ResNet-32 on
  CIFAR-10 with 20, 40, 60 or 80% of the training labels replaced uniformly
  (``--label-noise``, default 0.4), 200 epochs, basic augmentation, batch 128, learning rate
  0.1, weight decay 5e-4, and ``rho`` as the paper ran SAM at each level: 0.1 at 20, 40 and
  60% noise, 0.05 at 80% ("for more stable convergence", the paper's Appendix, as quoted in
  secondary sources; not checked against the PDF here).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["PRESETS", "Preset", "Reference", "expand_preset", "reference_lines"]


@dataclass(frozen=True)
class Reference:
    """Test accuracies (%) that a paper reports, per optimizer label, for one setting.

    Attributes:
        source (str): the paper and table
        setting (str): what the numbers were measured on, in words
        accuracy (Mapping[str, float]): optimizer label (``sgd``, ``sam``) to accuracy in %
    """

    source: str
    setting: str
    accuracy: Mapping[str, float]


@dataclass(frozen=True)
class Preset:
    """A named configuration of the comparison and the paper's numbers for it.

    Attributes:
        name (str): the ``--preset`` name
        description (str): one line
        options (Mapping[str, Any]): comparison options for every dataset
        datasets (Mapping[str, Mapping[str, Any]]): the datasets it accepts (the first is
            its default), each with its own extra options
        references (Mapping[tuple[str, float], Reference]): the paper's numbers by
            ``(dataset, label noise)``
        by_noise (Mapping[float, Mapping[str, Any]]): options that depend on the label
            noise (the paper's ``rho`` at each level), over the dataset's (default: none)
    """

    name: str
    description: str
    options: Mapping[str, Any]
    datasets: Mapping[str, Mapping[str, Any]]
    references: Mapping[tuple[str, float], Reference]
    by_noise: Mapping[float, Mapping[str, Any]] = field(default_factory=dict)


_FORET = "Foret et al. 2021 (SAM), "
# the training protocol both presets share: SGD against SAM around SGD, one seed
_PROTOCOL: dict[str, Any] = {
    "epochs": 200,
    "batch_size": 128,
    "lr": 0.1,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "augment": "basic",
    "optimizers": "sgd,sam",
    "seeds": [0],
}
_WRN = "WRN-28-10, 200 epochs, basic augmentation, mean of 5 runs"
_NOISE = "ResNet-32, CIFAR-10, {:.0%} label noise, rho {:g}"
_NOISE_RHO = {0.2: 0.1, 0.4: 0.1, 0.6: 0.1, 0.8: 0.05}  # the paper's rho at each noise level

PRESETS: dict[str, Preset] = {
    "foret2021": Preset(
        name="foret2021",
        description="SGD vs SAM, WRN-28-10 on CIFAR-10/100 as in Foret et al. 2021, Table 1",
        options={**_PROTOCOL, "model": "wrn28_10", "label_noise": 0.0},
        datasets={"cifar10": {"rho": [0.05]}, "cifar100": {"rho": [0.1]}},
        references={
            ("cifar10", 0.0): Reference(_FORET + "Table 1", _WRN, {"sgd": 96.5, "sam": 97.3}),
            ("cifar100", 0.0): Reference(_FORET + "Table 1", _WRN, {"sgd": 81.2, "sam": 83.5}),
        },
    ),
    "foret2021-noise": Preset(
        name="foret2021-noise",
        description="SGD vs SAM, ResNet-32 on CIFAR-10 with 20-80% label noise (Foret et al. "
        "2021, Table 4)",
        options={**_PROTOCOL, "model": "resnet32", "label_noise": 0.4, "rho": [0.1]},
        datasets={"cifar10": {}},
        by_noise={noise: {"rho": [rho]} for noise, rho in _NOISE_RHO.items()},
        references={
            ("cifar10", noise): Reference(
                _FORET + "Table 4",
                _NOISE.format(noise, _NOISE_RHO[noise]),
                {"sgd": sgd, "sam": sam},
            )
            for noise, sgd, sam in (
                (0.2, 84.8, 95.1),
                (0.4, 68.8, 93.4),
                (0.6, 48.2, 90.5),
                (0.8, 26.2, 77.9),
            )
        },
    ),
}
"""The presets by name."""


def expand_preset(name: str, given: Mapping[str, Any]) -> dict[str, Any]:
    """The comparison options of preset ``name`` under the options ``given`` explicitly.

    The dataset is ``given["dataset"]`` or the preset's first; the result holds the preset's
    options, then the dataset's, then those of the label noise (``given["label_noise"]`` or
    the preset's; :attr:`Preset.by_noise`), then ``given`` over them, and ``preset=name``.

    Raises:
        ValueError: for an unknown preset, or a dataset the preset does not cover.
    """
    preset = PRESETS.get(name)
    if preset is None:
        raise ValueError(f"Unknown preset {name!r}; use one of: {', '.join(PRESETS)}")
    dataset = given.get("dataset") or next(iter(preset.datasets))
    if dataset not in preset.datasets:
        raise ValueError(f"preset {name!r} runs on {' or '.join(preset.datasets)}, not {dataset!r}")
    noise = given.get("label_noise", preset.options.get("label_noise", 0.0))
    return {
        **preset.options,
        **preset.datasets[dataset],
        **preset.by_noise.get(round(float(noise), 6), {}),
        "dataset": dataset,
        **given,
        "preset": name,
    }


def reference_lines(
    name: str, dataset: str, label_noise: float, summary: Sequence[Mapping[str, Any]]
) -> list[str]:
    """Lines that put the paper's accuracies beside the summary's (mean test accuracy per
    optimizer, in points, as :func:`~torchsam.experiments.compare.summarise` gives it); a
    line saying so when the paper has no number for this setting."""
    preset = PRESETS[name]
    reference = preset.references.get((dataset, round(float(label_noise), 6)))
    if reference is None:
        known = ", ".join(f"{d} at noise {n:g}" for d, n in preset.references)
        return [
            f"{preset.name}: the paper reports no number for {dataset} at label noise "
            f"{label_noise:g} (it does for {known})"
        ]
    lines = [f"The paper ({reference.source}; {reference.setting}) beside this run:"]
    for row in summary:
        paper = reference.accuracy.get(str(row.get("method")))
        if paper is None:
            continue
        mean = row.get("accuracy")
        mine = "—" if mean is None else f"{mean:.1f}% (error {100 - mean:.1f}%)"
        lines.append(
            f"  {row['label']:<12} paper {paper:.1f}% (error {100 - paper:.1f}%)  here {mine}"
        )
    return lines
