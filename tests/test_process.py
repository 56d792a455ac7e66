"""Process-wide switches: set once by the entry points, never as a side effect of
importing the library or building a model."""
import subprocess
import sys

from conftest import PROJECT_ROOT

# 1e-39 is a denormal float32: multiplied by one it stays, unless denormals are flushed
PROBE = """
import sys
sys.path.insert(0, {root!r})
import torch
def flushed():
    return float(torch.tensor([1e-39]) * torch.tensor([1.0])) == 0.0
import model, modes, train_utils, distil, checkpoints, rundir  # the library, imported
modes.student(model.RNNConfig(vocab_size=50, n_embd=4, hidden=4), seed=0)  # and a student built on the CPU
before = flushed()
from utils import set_process_switches
set_process_switches()
print(before, flushed())
"""


def test_importing_the_library_flips_no_switch_and_the_entry_points_set_it():
    out = subprocess.run([sys.executable, "-c", PROBE.format(root=PROJECT_ROOT)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "True"]


ENTRY = """
import contextlib, io, sys
sys.path.insert(0, {root!r})
import torch
import {module}
with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
    try:
        {module}.main(["no-such-mode"])  # refused at once, after the switches
    except SystemExit:
        pass
print(float(torch.tensor([1e-39]) * torch.tensor([1.0])) == 0.0)
"""


def test_every_entry_point_sets_the_switches_itself():
    for module in ("run", "bench"):
        out = subprocess.run([sys.executable, "-c", ENTRY.format(root=PROJECT_ROOT, module=module)],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and out.stdout.split() == ["True"], (module, out.stdout, out.stderr)
