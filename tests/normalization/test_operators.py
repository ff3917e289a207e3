"""The custom operators live in a namespace of their own, and keep it."""
import os
import subprocess
import sys

import pytest
import torch
from torch import Tensor

import normalization  # noqa: F401  (registers the operators)
from normalization import ops

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NAMES = ("instance_stats", "scale_shift", "grad_sums", "grad_input", "all_reduce_sum")


def test_operators_live_in_the_project_namespace():
    assert ops.NAMESPACE == "switchable_norm"
    for name in NAMES:
        assert str(getattr(torch.ops.switchable_norm, name).default._schema).startswith(
            f"switchable_norm::{name}(")
    x = torch.randn(2, 3, 4, 5)
    mean, var = torch.ops.switchable_norm.instance_stats(x)
    torch.testing.assert_close(mean, x.mean((2, 3)))


def test_a_later_conflicting_definition_is_refused():
    with pytest.raises(RuntimeError, match=r"switchable_norm::scale_shift.*same name"):
        @torch.library.custom_op("switchable_norm::scale_shift", mutates_args=())
        def other(x: Tensor, factor: float) -> Tensor:
            return x * factor
    x = torch.randn(2, 3, 4, 5)       # ours still answers
    one = torch.ones(2, 3)
    torch.testing.assert_close(ops.scale_shift(x, one * 0, one, one * 0), x)


def _python(code):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def test_an_earlier_conflicting_definition_is_refused_at_import():
    out = _python(
        "import torch\n"
        "from torch import Tensor\n"
        "@torch.library.custom_op('switchable_norm::grad_input', mutates_args=())\n"
        "def f(x: Tensor) -> Tensor:\n"
        "    return x.clone()\n"
        "import normalization\n")
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert "RuntimeError: operator switchable_norm::grad_input is already registered as " \
           "'switchable_norm::grad_input(Tensor x) -> Tensor'" in last, out.stderr[-2000:]


def test_a_second_copy_of_the_module_reuses_the_operators():
    """The same definitions loaded twice (a clone and an installed copy in one process)."""
    out = _python(
        "import importlib.util, sys, torch\n"
        "import normalization.ops as first\n"
        "spec = importlib.util.spec_from_file_location('copy_of_ops', 'normalization/ops.py')\n"
        "second = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(second)\n"
        "x = torch.randn(2, 3, 4)\n"
        "assert torch.equal(second.instance_stats(x)[0], first.instance_stats(x)[0])\n"
        "print('ok')\n")
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
