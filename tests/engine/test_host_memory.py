"""engine.host_memory.keep_freed_memory: freed blocks stay in the process, so a loop that
allocates and frees the same large buffers stops taking page faults (measured with
getrusage in fresh processes, as train.py runs on the CPU)."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SCRIPT = r"""
import resource, sys, torch
from engine.host_memory import keep_freed_memory
assert not keep_freed_memory(torch.device("cuda"))   # another device: nothing changes
applied = keep_freed_memory(torch.device("cpu"))
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):                      # warm-up: the heap settles (it grows for a few rounds)
    a = torch.empty(40 * 2 ** 20 // 4).fill_(1.0); b = torch.empty(40 * 2 ** 20 // 4).fill_(2.0)
    del a, b
start = faults()
for _ in range(5):                       # 2 x 40 MiB per iteration, above mmap's 32 MiB cap
    a = torch.empty(40 * 2 ** 20 // 4).fill_(1.0); b = torch.empty(40 * 2 ** 20 // 4).fill_(2.0)
    del a, b
print(applied, faults() - start)
"""


def _run(env_value):
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("SN_MALLOC", None)
    if env_value is not None:
        env["SN_MALLOC"] = env_value
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=120, check=True).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_freed_memory_is_kept_and_reused_without_page_faults():
    applied, kept_faults = _run(None)
    system, system_faults = _run("system")
    assert applied and not system
    pages = 5 * 2 * 40 * 2 ** 20 // 4096           # what the loop touches
    assert system_faults > pages // 2               # glibc maps and zeroes them every time
    assert kept_faults < pages // 50                # the kept heap reuses its pages
