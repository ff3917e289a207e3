"""Debian's shellcheck finds nothing in the launch scripts and tools/*.sh (installed with
apt-get when missing; skipped only where it cannot be installed)."""
import subprocess

import pytest

from .conftest import ROOT, apt_install


def test_shellcheck_finds_nothing():
    reason = apt_install(["shellcheck"], ["shellcheck"])
    if reason:
        pytest.skip(f"shellcheck: {reason}")
    files = sorted(str(p.relative_to(ROOT)) for p in
                   [*(ROOT / "scripts").iterdir(), *(ROOT / "tools").glob("*.sh")] if p.is_file())
    assert "scripts/train_slurm.sbatch" in files and "tools/gpu_check.sh" in files
    proc = subprocess.run(["shellcheck", "--external-sources", *files], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")
