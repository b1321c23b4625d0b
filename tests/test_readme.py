"""The README's examples run, and CI runs exactly the README's test command."""

from __future__ import annotations

import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _bash_commands() -> list[str]:
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", README, re.S)]


def test_ci_runs_the_readme_test_command():
    test_command = next(c for c in _bash_commands() if "pytest" in c)
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_command in ci


def test_readme_main_command_sets_up_the_same_environment():
    main, test = _bash_commands()[:2]
    setup = "python3 -m venv .venv && .venv/bin/pip install -q torch==2.13.0 && .venv/bin/pip install -q -e '.[dev]'"
    assert main.startswith(setup) and test.startswith(setup)


def test_readme_python_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    torch.manual_seed(0)
    exec(blocks[0], {})  # the quickstart is self-contained
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10))
    loader = [(torch.randn(32, 64), torch.randint(0, 10, (32,))) for _ in range(3)]
    before = [p.detach().clone() for p in model.parameters()]
    exec(blocks[1], {"model": model, "loader": loader})  # the training loop
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
