"""Every Python example of README.md and of the documentation site (docs/**/*.md) runs.

How a page's examples run:

* The examples are the fenced blocks tagged ``python`` or ``py``.
* Each page gets a fresh namespace, ``default_namespace()`` (``YourModel()``, a small model with
  BatchNorm, a batch ``x, y``, ``loss_fn``, ``loader`` and more: see below), then runs the
  code in ``SETUP[page]`` if the page has an entry, then its blocks in order, so a block may use
  what an earlier block of the same page defined. Files are written in a temporary directory.
* A block that calls ``step(`` or ``second_step(`` and asserts nothing itself must change a
  weight of a module that ran a forward pass in it (from its value at that first forward pass).
* A block is not run only when the line right above its fence is a marker comment (shell
  blocks are never run here, and each must carry one):

      <!-- not-runnable: REASON -->      a reason is required (a GPU, several machines, ...)
      <!-- runs-in: tests/test_x.py -->  another test runs it (it needs processes, a trainer);
                                         that file must name the page

To give a new page what its examples need, add one line to ``SETUP``, for example
``"docs/cifar.md": "train_set = range(32)",``; a page without an entry runs in the default
namespace. Keep each page's examples to a few seconds of CPU time.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.modules.module import register_module_forward_pre_hook

import torchsam

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]

FENCE = re.compile(r"^```(?:python|py)\n(.*?)^```", flags=re.DOTALL | re.MULTILINE)
SHELL = re.compile(r"^```(?:bash|sh|shell|console)\n(.*?)^```", flags=re.DOTALL | re.MULTILINE)
MARKER = re.compile(r"<!--\s*(not-runnable|runs-in):\s*(\S.*?)\s*-->")

# A closure over the page's current `optimizer`, `model` and batch, for pages whose examples
# call `optimizer.step(closure)` without defining one.
CLOSURE = """
def closure():
    optimizer.zero_grad()
    loss = loss_fn(model(x), y)
    loss.backward()
    return loss
"""

# Code run in a page's namespace before its examples: one line per page that needs more than
# default_namespace(). Paths are relative to the repository root.
SETUP: dict[str, str] = {
    "docs/family.md": "model = YourModel()\n" + CLOSURE,
}


def default_namespace() -> dict[str, Any]:
    """What the examples take for granted: a small classifier, its data and its loss."""
    torch.manual_seed(0)
    x, y = torch.randn(32, 4), torch.randint(0, 10, (32,))

    def your_model() -> nn.Module:
        return nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10))

    return {
        "torch": torch,
        "torchsam": torchsam,
        "nn": nn,
        "YourModel": your_model,
        "loss_fn": nn.CrossEntropyLoss(),
        "x": x,
        "y": y,
        "loader": [(x, y), (x.flip(0), y.flip(0))],
        "epochs": 2,
    }


def examples(page: Path, fence: re.Pattern[str] = FENCE) -> list[tuple[str, str | None, str]]:
    """The page's examples (``fence``: Python blocks by default) as (code, marker kind or
    None, marker text), in order."""
    text = page.read_text()
    found = []
    for match in fence.finditer(text):
        above = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = MARKER.fullmatch(above.strip())
        kind, note = (marker.group(1), marker.group(2)) if marker else (None, "")
        found.append((match.group(1), kind, note))
    return found


def page_id(page: Path) -> str:
    return page.relative_to(ROOT).as_posix() if page.is_relative_to(ROOT) else page.name


@contextlib.contextmanager
def first_forward_weights() -> Iterator[dict[int, tuple[nn.Module, list[torch.Tensor]]]]:
    """Each module that runs a forward pass inside the block, with its own weights as they were
    at its first forward pass there (before any step of the block could change them)."""
    seen: dict[int, tuple[nn.Module, list[torch.Tensor]]] = {}

    def record(module: nn.Module, args: Any) -> None:
        if id(module) not in seen:
            own = [p.detach().clone() for p in module.parameters(recurse=False)]
            seen[id(module)] = (module, own)

    handle = register_module_forward_pre_hook(record)
    try:
        yield seen
    finally:
        handle.remove()


def run_page(page: Path) -> None:
    ns = default_namespace()
    if page_id(page) in SETUP:
        exec(compile(SETUP[page_id(page)], f"SETUP[{page_id(page)!r}]", "exec"), ns)
    for i, (code, kind, _) in enumerate(examples(page), start=1):
        if kind is not None:
            continue
        name = f"{page_id(page)} block {i}"
        with warnings.catch_warnings(), first_forward_weights() as first:
            # CPU-only CI: the float16 example asks for CUDA autocast and a CUDA GradScaler,
            # which PyTorch disables with these warnings
            warnings.filterwarnings("ignore", message=".*CUDA is not available.*")
            warnings.filterwarnings("ignore", message=".*device_type of 'cuda'.*")
            try:
                exec(compile(code, name, "exec"), ns)
            except Exception as error:
                raise AssertionError(f"{name} failed:\n{code}") from error
        if "step(" not in code or "assert " in code or not first:
            continue  # trains nothing, or checks its own outcome
        moved = any(
            not torch.equal(old, new)
            for module, weights in first.values()
            for old, new in zip(weights, module.parameters(recurse=False), strict=True)
        )
        assert moved, f"{name} trains but no weight moved"


RUNNABLE = [page for page in PAGES if examples(page)]


@pytest.mark.parametrize("page", RUNNABLE, ids=page_id)
def test_page_examples_run_in_order(
    page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # examples write checkpoints and figures
    run_page(page)


@pytest.mark.parametrize("page", RUNNABLE, ids=page_id)
def test_examples_not_run_here_say_why_or_where(page: Path) -> None:
    for i, (_, kind, note) in enumerate(examples(page), start=1):
        if kind == "runs-in":
            runner = ROOT / note.split()[0]
            assert runner.is_file(), f"{page_id(page)} block {i}: no test file {runner}"
            assert page.name in runner.read_text(), (
                f"{page_id(page)} block {i}: {runner.name} does not read {page.name}"
            )
        elif kind == "not-runnable":
            assert len(note) > 10, f"{page_id(page)} block {i}: say why it cannot run"


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_shell_blocks_say_why_they_are_not_run_here(page: Path) -> None:
    """Shell blocks (installs, long trainings, launches on several processes or a GPU) are not
    run by this test: each carries a marker that says why, and which test runs the same
    command on small settings where one does."""
    for i, (_, kind, note) in enumerate(examples(page, SHELL), start=1):
        assert kind is not None, f"{page_id(page)} shell block {i}: no marker above its fence"
        if kind == "not-runnable":
            assert len(note) > 10, f"{page_id(page)} shell block {i}: say why it cannot run"
        for named in re.findall(r"tests/test_\w+\.py", note):
            assert (ROOT / named).is_file(), f"{page_id(page)} shell block {i}: no {named}"


def test_marker_before_a_fence_is_recognised(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "Text.\n\n<!-- not-runnable: needs a GPU -->\n```python\nimport cupy\n```\n\n"
        "```py\nx = 1\n```\n\n```bash\nls\n```\n"
    )
    assert examples(page) == [
        ("import cupy\n", "not-runnable", "needs a GPU"),
        ("x = 1\n", None, ""),
    ]


def test_a_failing_example_names_its_block(tmp_path: Path) -> None:
    page = tmp_path / "broken.md"
    page.write_text("```python\nx = 1\n```\n\n```python\nraise ValueError('no')\n```\n")
    with pytest.raises(AssertionError, match="block 2 failed"):
        run_page(page)


def test_an_example_that_trains_nothing_is_caught(tmp_path: Path) -> None:
    page = tmp_path / "idle.md"
    page.write_text(
        "```python\nmodel = YourModel()\n```\n\n"
        "```python\noptimizer = torchsam.SAM(model.parameters(), torch.optim.SGD, lr=0.1)\n"
        "loss = loss_fn(model(x), y)  # no backward: optimizer.step( is never reached\n```\n"
    )
    with pytest.raises(AssertionError, match="no weight moved"):
        run_page(page)


def test_a_model_built_and_stepped_in_the_block_is_checked_too(tmp_path: Path) -> None:
    """A block with a model of its own (as the README's quick start) whose step changes
    nothing (lr=0: SAM restores w bit-exactly) is caught; with lr=0.1 it passes."""
    block = (
        "```python\nnet = torch.nn.Linear(4, 10)\n"
        "opt = torchsam.SAM(net.parameters(), torch.optim.SGD, lr={lr})\n"
        "loss_fn(net(x), y).backward()\nopt.first_step(zero_grad=True)\n"
        "loss_fn(net(x), y).backward()\nopt.second_step(zero_grad=True)\n```\n"
    )
    page = tmp_path / "own.md"
    page.write_text(block.format(lr=0.0))
    with pytest.raises(AssertionError, match="no weight moved"):
        run_page(page)
    page.write_text(block.format(lr=0.1))
    run_page(page)


def test_every_example_of_the_site_is_accounted_for() -> None:
    """The examples of the README and the site; every one runs here or names where it runs."""
    counted = {page_id(p): len(examples(p)) for p in RUNNABLE}
    assert counted["README.md"] >= 1
    assert sum(counted.values()) >= 30


def test_readme_is_short_and_starts_with_the_quick_start() -> None:
    text = (ROOT / "README.md").read_text()
    assert len(text) <= 10_000
    first = FENCE.search(text)
    assert first is not None
    assert text[: first.start()].count("\n") < 40  # within the first screen
    quick = first.group(1)
    assert "first_step(" in quick
    assert "second_step(" in quick
    assert ".step(closure)" in quick


def test_citation_file_names_this_version() -> None:
    """CITATION.cff has the keys the format requires, and the version and license of the
    package (top-level ``key: value`` lines; the file is YAML)."""
    top = dict(re.findall(r"^([a-z-]+):[ ]*(.*)$", (ROOT / "CITATION.cff").read_text(), re.M))
    assert {"cff-version", "message", "title", "authors", "version", "license"} <= set(top)
    pyproject = (ROOT / "pyproject.toml").read_text()
    version = re.search(r'^version = "(.+)"$', pyproject, re.M)
    assert version is not None
    assert top["version"].strip('"') == version.group(1)
    assert top["license"] == "MIT"
    assert 'license = "MIT"' in pyproject
