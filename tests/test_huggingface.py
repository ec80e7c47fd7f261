"""SAMTrainer (torchsam.huggingface) against a plain torchsam loop with the same steps."""

from __future__ import annotations

import copy
import os
import re
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import transformers
from accelerate.utils import DistributedType

import torchsam
from tests.test_distributed import _exit_cleanly
from torchsam.huggingface import SAMTrainer, _check_supported

N, DIM, CLASSES = 16, 4, 3


class TinyClassifier(nn.Module):
    """forward(input, labels) -> {"loss", "logits"}, as a transformers model returns them."""

    def __init__(self, batchnorm: bool = False) -> None:
        super().__init__()
        self.hidden = nn.Linear(DIM, 8)
        self.norm = nn.BatchNorm1d(8) if batchnorm else nn.Identity()
        self.out = nn.Linear(8, CLASSES)

    def forward(self, input: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.out(torch.tanh(self.norm(self.hidden(input))))
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


class DictDataset(torch.utils.data.Dataset):
    def __init__(self, dtype: torch.dtype = torch.float64) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(N, DIM, generator=g, dtype=torch.float64).to(dtype)
        self.y = torch.randint(0, CLASSES, (N,), generator=g)

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input": self.x[i], "labels": self.y[i]}


class InOrder(SAMTrainer):
    """The samples in dataset order (the Trainer shuffles by default)."""

    def _get_train_sampler(self, *args: Any, **kwargs: Any) -> torch.utils.data.Sampler:
        return torch.utils.data.SequentialSampler(self.train_dataset)


def make_model(batchnorm: bool = False) -> TinyClassifier:
    torch.manual_seed(0)
    return TinyClassifier(batchnorm).double()


def train_args(tmp_path: Any, **kwargs: Any) -> transformers.TrainingArguments:
    options: dict[str, Any] = {
        "output_dir": str(tmp_path),
        "use_cpu": True,
        "report_to": [],
        "save_strategy": "no",
        "logging_strategy": "no",
        "disable_tqdm": True,
        "per_device_train_batch_size": 4,
        "max_steps": 4,
        "max_grad_norm": 0.0,
        "lr_scheduler_type": "constant",
        "seed": 0,
        "dataloader_num_workers": 0,
    }
    options.update(kwargs)
    return transformers.TrainingArguments(**options)


def reference(
    model: nn.Module,
    optimizer: torchsam.SharpnessAwareOptimizer,
    *,
    steps: int,
    batch: int,
    micro_batches: int = 1,
    max_grad_norm: float = 0.0,
    schedule: Callable[[int], float] = lambda step: 1.0,
    autocast: bool = False,
) -> None:
    """The README's two-call loop, with accumulation, clipping and an LR schedule."""
    data = DictDataset()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    for step in range(steps):
        start = (step * batch) % N
        idx = torch.arange(start, start + batch).chunk(micro_batches)

        def one_pass(idx: tuple[torch.Tensor, ...] = idx) -> None:
            for part in idx:
                x = data.x[part].to(next(model.parameters()).dtype)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                    loss = model(x, data.y[part])["loss"]
                (loss / len(idx)).backward()

        one_pass()
        if optimizer.first_step(zero_grad=True):
            with torchsam.freeze_running_stats(model):
                one_pass()
        if max_grad_norm > 0:
            nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.second_step(zero_grad=True)
        scheduler.step()


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(x, y, msg=f"{name} differs")


def moved(model: nn.Module, start: nn.Module) -> bool:
    pairs = zip(model.parameters(), start.parameters(), strict=True)
    return any(not torch.equal(a, b) for a, b in pairs)


def test_sam_sgd_with_optimizers_tuple(tmp_path: Any) -> None:
    model = make_model()
    start = copy.deepcopy(model)
    ref = copy.deepcopy(model)
    opt = torchsam.SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1, momentum=0.9)
    # a scheduler of your own, built on the torchsam optimizer
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5**step)
    trainer = InOrder(
        model=model,
        args=train_args(tmp_path),
        train_dataset=DictDataset(),
        optimizers=(opt, scheduler),
    )
    trainer.train()
    reference(
        ref,
        torchsam.SAM(ref.parameters(), torch.optim.SGD, rho=0.5, lr=0.1, momentum=0.9),
        steps=4,
        batch=4,
        schedule=lambda step: 0.5**step,
    )
    assert scheduler.get_last_lr() == [0.1 * 0.5**4]
    assert moved(model, start)
    assert_same_weights(model, ref)


def test_sam_adamw_built_from_training_arguments_linear_schedule(tmp_path: Any) -> None:
    model = make_model()
    ref = copy.deepcopy(model)
    args = train_args(
        tmp_path,
        optim="adamw_torch",
        learning_rate=0.05,
        weight_decay=0.1,
        lr_scheduler_type="linear",
    )
    trainer = InOrder(model=model, args=args, train_dataset=DictDataset(), sam_kwargs={"rho": 0.2})
    trainer.train()
    # the Trainer's groups: weight decay on the weights, none on the biases
    groups = [
        {"params": [ref.hidden.weight, ref.out.weight], "weight_decay": 0.1},
        {"params": [ref.hidden.bias, ref.out.bias], "weight_decay": 0.0},
    ]
    opt = torchsam.SAM(groups, torch.optim.AdamW, rho=0.2, lr=0.05, betas=(0.9, 0.999), eps=1e-8)
    reference(ref, opt, steps=4, batch=4, schedule=lambda step: max(0.0, (4 - step) / 4))
    assert trainer.lr_scheduler.get_last_lr()[0] == pytest.approx(0.0)
    assert_same_weights(model, ref)


def test_max_grad_norm_clips_the_second_gradient(tmp_path: Any) -> None:
    model = make_model()
    ref = copy.deepcopy(model)
    unclipped = copy.deepcopy(model)
    kwargs = {"base_optimizer": torch.optim.SGD, "rho": 0.5, "lr": 0.5}
    trainer = InOrder(
        model=model,
        args=train_args(tmp_path, max_grad_norm=0.05),
        train_dataset=DictDataset(),
        optimizer_cls_and_kwargs=(torchsam.SAM, kwargs),
    )
    trainer.train()
    reference(ref, torchsam.SAM(ref.parameters(), **kwargs), steps=4, batch=4, max_grad_norm=0.05)
    assert_same_weights(model, ref)
    # the clipping mattered
    reference(unclipped, torchsam.SAM(unclipped.parameters(), **kwargs), steps=4, batch=4)
    with pytest.raises(AssertionError):
        assert_same_weights(model, unclipped)


def test_gradient_accumulation_perturbs_with_the_whole_batch(tmp_path: Any) -> None:
    model = make_model(batchnorm=False)
    ref = copy.deepcopy(model)
    opt = torchsam.SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1)
    args = train_args(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2)
    InOrder(model=model, args=args, train_dataset=DictDataset(), optimizers=(opt, None)).train()
    # one SAM step per batch of 4, without accumulation
    reference(
        ref, torchsam.SAM(ref.parameters(), torch.optim.SGD, rho=0.5, lr=0.1), steps=4, batch=4
    )
    assert_same_weights(model, ref)


def test_batchnorm_statistics_count_each_batch_once(tmp_path: Any) -> None:
    model = make_model(batchnorm=True)
    ref = copy.deepcopy(model)
    opt = torchsam.SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1)
    args = train_args(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2)
    InOrder(model=model, args=args, train_dataset=DictDataset(), optimizers=(opt, None)).train()
    reference(
        ref,
        torchsam.SAM(ref.parameters(), torch.optim.SGD, rho=0.5, lr=0.1),
        steps=4,
        batch=4,
        micro_batches=2,
    )
    assert model.norm.num_batches_tracked.item() == 8  # 4 steps of 2 micro-batches, first pass
    assert_same_weights(model, ref)


@pytest.mark.parametrize(
    "variant",
    [
        lambda params: torchsam.LookSAM(params, torch.optim.SGD, rho=0.5, k=3, lr=0.1),
        lambda params: torchsam.IntermittentSAM(params, torch.optim.SGD, rho=0.5, every=2, lr=0.1),
    ],
    ids=["LookSAM", "IntermittentSAM"],
)
def test_variants_with_one_pass_steps(
    tmp_path: Any, variant: Callable[..., torchsam.SharpnessAwareOptimizer]
) -> None:
    model = make_model()
    ref = copy.deepcopy(model)
    opt = variant(model.parameters())
    passes = 0

    def count(*_: Any) -> None:
        nonlocal passes
        passes += 1

    model.out.register_forward_hook(count)
    args = train_args(tmp_path, max_steps=5, max_grad_norm=0.05)
    InOrder(model=model, args=args, train_dataset=DictDataset(), optimizers=(opt, None)).train()
    reference(ref, variant(ref.parameters()), steps=5, batch=4, max_grad_norm=0.05)
    assert_same_weights(model, ref)
    assert passes < 10  # some steps took one pass only


def test_variant_built_from_training_arguments(tmp_path: Any) -> None:
    model = make_model()
    ref = copy.deepcopy(model)
    args = train_args(tmp_path, optim="sgd", learning_rate=0.1, max_steps=5)
    InOrder(
        model=model,
        args=args,
        train_dataset=DictDataset(),
        sam_optimizer=torchsam.LookSAM,
        sam_kwargs={"rho": 0.5, "k": 3},
    ).train()
    groups = [
        {"params": [ref.hidden.weight, ref.out.weight], "weight_decay": 0.0},
        {"params": [ref.hidden.bias, ref.out.bias], "weight_decay": 0.0},
    ]
    opt = torchsam.LookSAM(groups, torch.optim.SGD, rho=0.5, k=3, lr=0.1)
    reference(ref, opt, steps=5, batch=4)
    assert_same_weights(model, ref)


# accelerate 1.0 (the oldest the hf extra allows) enters autocast through the deprecated
# torch.cpu.amp.autocast
@pytest.mark.filterwarnings(r"ignore:`torch\.cpu\.amp\.autocast:FutureWarning")
def test_bf16_autocast_in_both_passes(tmp_path: Any) -> None:
    model = make_model().float()
    ref = copy.deepcopy(model)
    plain = copy.deepcopy(model)
    opt = torchsam.SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1)
    args = train_args(tmp_path, bf16=True)
    data = DictDataset(torch.float32)
    InOrder(model=model, args=args, train_dataset=data, optimizers=(opt, None)).train()
    sam = torchsam.SAM(ref.parameters(), torch.optim.SGD, rho=0.5, lr=0.1)
    reference(ref, sam, steps=4, batch=4, autocast=True)
    assert_same_weights(model, ref)
    # autocast mattered
    sam = torchsam.SAM(plain.parameters(), torch.optim.SGD, rho=0.5, lr=0.1)
    reference(plain, sam, steps=4, batch=4)
    with pytest.raises(AssertionError):
        assert_same_weights(model, plain)


@pytest.mark.parametrize(
    ("accelerator", "match"),
    [
        (SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, scaler=None), "DeepSpeed"),
        (SimpleNamespace(distributed_type=DistributedType.NO, scaler=object()), "bf16=True"),
    ],
    ids=["deepspeed", "fp16-scaler"],
)
def test_unsupported_accelerator_setups_are_refused(accelerator: Any, match: str) -> None:
    # (neither can be set up on a CPU-only machine: the check itself is tested)
    with pytest.raises(ValueError, match=match):
        _check_supported(accelerator)
    _check_supported(SimpleNamespace(distributed_type=DistributedType.NO, scaler=None))


def test_old_transformers_is_refused(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transformers, "__version__", "4.47.1")
    model = make_model()
    opt = torchsam.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(RuntimeError, match=r"transformers>=4\.48"):
        InOrder(model=model, args=train_args(tmp_path), optimizers=(opt, None))


def test_an_error_in_the_second_pass_leaves_the_weights_at_w(tmp_path: Any) -> None:
    model = make_model()
    opt = torchsam.SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1)
    calls = 0

    def fail_on_the_second_pass(*_: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise KeyboardInterrupt

    model.out.register_forward_hook(fail_on_the_second_pass)
    start = copy.deepcopy(model)
    trainer = InOrder(
        model=model, args=train_args(tmp_path), train_dataset=DictDataset(), optimizers=(opt, None)
    )
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert not opt.perturbed
    assert_same_weights(model, start)


def test_plain_optimizer_and_option_conflicts_are_refused(tmp_path: Any) -> None:
    model = make_model()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="torchsam sharpness-aware optimizer"):
        InOrder(model=model, args=train_args(tmp_path), optimizers=(sgd, None))
    opt = torchsam.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="only say how to build the optimizer"):
        InOrder(
            model=model,
            args=train_args(tmp_path),
            optimizers=(opt, None),
            sam_kwargs={"rho": 0.1},
        )
    for variant in (torchsam.ESAM, torchsam.MSAM):
        one_call = variant(model.parameters(), torch.optim.SGD, lr=0.1)
        with pytest.raises(TypeError, match=f"cannot drive {variant.__name__}"):
            InOrder(model=model, args=train_args(tmp_path), optimizers=(one_call, None))


def test_resume_from_a_trainer_checkpoint_is_exact(tmp_path: Any) -> None:
    def run(model: nn.Module, **kwargs: Any) -> InOrder:
        opt = torchsam.SAM(model.parameters(), torch.optim.AdamW, rho=0.5, lr=0.05)
        args = train_args(tmp_path, lr_scheduler_type="linear", **kwargs)
        return InOrder(model=model, args=args, train_dataset=DictDataset(), optimizers=(opt, None))

    whole = make_model()
    run(whole).train()
    first = make_model()
    run(first, save_strategy="steps", save_steps=2).train()  # saves at steps 2 and 4
    resumed = make_model()
    trainer = run(resumed)
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert trainer._sam is not None
    assert trainer._sam.state_dict()["param_groups"][0]["sam_step"] == 4
    for name, value in whole.state_dict().items():  # bit for bit
        assert torch.equal(resumed.state_dict()[name], value), name


def test_only_torchsam_huggingface_imports_transformers() -> None:
    code = (
        "import sys, torchsam\n"
        "assert 'transformers' not in sys.modules, 'import torchsam imported transformers'\n"
        "sys.modules['transformers'] = None  # as if it were not installed\n"
        "try:\n"
        "    import torchsam.huggingface\n"
        "except ImportError as error:\n"
        "    assert \"pip install 'torchsam[hf]'\" in str(error), error\n"
        "else:\n"
        "    raise AssertionError('no ImportError')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_readme_section_runs(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The examples of docs/integrations/huggingface.md, in order, on the small model (2 steps
    each)."""
    page = Path(__file__).resolve().parent.parent / "docs" / "integrations" / "huggingface.md"
    blocks = re.findall(r"```py\n(.*?)```", page.read_text(), flags=re.DOTALL)
    assert len(blocks) == 2

    real = transformers.TrainingArguments
    built: list[transformers.TrainingArguments] = []

    def quick_args(*args: Any, **kwargs: Any) -> transformers.TrainingArguments:
        overrides = {"use_cpu": True, "report_to": [], "save_strategy": "no", "max_steps": 2}
        built.append(real(*args, **{**kwargs, **overrides, "disable_tqdm": True}))
        return built[-1]

    # (the module object that `from transformers import ...` reads, which transformers' lazy
    # loading may have replaced in sys.modules)
    monkeypatch.setattr(sys.modules["transformers"], "TrainingArguments", quick_args)
    monkeypatch.chdir(tmp_path)
    model = make_model()
    ns: dict[str, Any] = {"torch": torch, "torchsam": torchsam, "model": model}
    ns["train_dataset"] = DictDataset()
    for block, kind in zip(blocks, (torchsam.SAM, torchsam.LookSAM), strict=True):
        start = copy.deepcopy(model)
        exec(compile(block, "docs/integrations/huggingface.md", "exec"), ns)
        assert type(ns["trainer"]._sam) is kind
        assert ns["trainer"].state.global_step == 2
        assert moved(model, start)
    assert len(built) == 1  # the second example reuses the first one's arguments


def _ddp_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    model = make_model()
    opt = torchsam.SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1, momentum=0.9)
    counter = torchsam.distributed.AllReduceCounter()

    hooked: list[nn.Module] = []

    class Counting(InOrder):
        def training_step(self, model: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
            if not hooked:
                assert isinstance(model, nn.parallel.DistributedDataParallel)
                model.register_comm_hook(counter, torchsam.distributed.count_all_reduces)
                hooked.append(model)
            return super().training_step(model, *args, **kwargs)

    # one sample per rank and micro-batch, two micro-batches: 4 samples per step in all
    args = train_args(
        Path(out) / str(rank),
        per_device_train_batch_size=1,
        gradient_accumulation_steps=2,
        ddp_backend="gloo",
    )
    Counting(model=model, args=args, train_dataset=DictDataset(), optimizers=(opt, None)).train()
    torch.save({"weights": model.state_dict(), "calls": counter.calls}, Path(out) / f"{rank}.pt")
    torch.distributed.barrier()  # neither rank tears the group down while the other uses it
    torch.distributed.destroy_process_group()
    _exit_cleanly()


def test_ddp_with_accumulation_equals_one_process(tmp_path: Any) -> None:
    """Two CPU processes (gloo): the weights of one process on the whole batch, one all-reduce
    per pass (the second pass's micro-batches but the last under no_sync)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_ddp_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"{rank}.pt", weights_only=True) for rank in range(2)]
    ref = make_model()
    sam = torchsam.SAM(ref.parameters(), torch.optim.SGD, rho=0.5, lr=0.1, momentum=0.9)
    reference(ref, sam, steps=4, batch=4)
    for name, value in ref.state_dict().items():
        assert torch.equal(ranks[0]["weights"][name], ranks[1]["weights"][name])
        torch.testing.assert_close(ranks[0]["weights"][name], value, msg=f"{name} differs")
    assert [r["calls"] for r in ranks] == [8, 8]  # 4 steps, 2 passes, 1 bucket
