"""Helpers shared by the test modules that run the command line (those that import
it: a list here went stale twice): the real CoLA files, small copies of them,
in-process CLI calls and training runs that several tests reuse (made once per
test run, whichever module asks first). Not a test module: it defines no tests."""
import itertools
import os

import pytest

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLA_DIR = os.path.join(PROJECT_ROOT, "data", "cola")  # shipped with the project
COLA_FILES = {"train": "in_domain_train.tsv", "in": "in_domain_dev.tsv", "out": "out_of_domain_dev.tsv"}
COLA_ROWS = {"train": 8551, "in": 527, "out": 516}
SUBSET_ROWS = {"train": 300, "in": 100, "out": 100}

# Small students and short runs: every end-to-end run takes a second or two.
STUDENT = ["--rnn-hidden", "32", "--rnn-embd", "16", "--epochs", "2"]


def cola_dir():
    """The real CoLA release that ships with the project; its absence is a failure."""
    missing = [name for name in COLA_FILES.values() if not os.path.isfile(os.path.join(COLA_DIR, name))]
    if missing:
        pytest.fail(f"the shipped CoLA data is incomplete: {COLA_DIR} lacks {', '.join(missing)}")
    return COLA_DIR


def write_subset(dst, rows=None):
    """Copy the first rows of each real CoLA file into dst (byte for byte)."""
    rows = {**SUBSET_ROWS, **(rows or {})}
    src = cola_dir()
    os.makedirs(dst, exist_ok=True)
    for split, name in COLA_FILES.items():
        with open(os.path.join(src, name), "rb") as f:
            lines = list(itertools.islice(f, rows[split]))
        with open(os.path.join(dst, name), "wb") as f:
            f.writelines(lines)
    return str(dst)


def read_rows(path):
    """(label, sentence) of every line of a CoLA release file, parsed naively."""
    with open(path, encoding="utf-8") as f:
        return [(int(line.split("\t")[1]), line.rstrip("\r\n").split("\t")[3]) for line in f if line.strip()]


# ---------------------------------------------------------------------------
# The command line, in process
# ---------------------------------------------------------------------------

def cli(capsys, *args):
    """run.main in-process: (exit code, stdout, stderr)."""
    import run
    capsys.readouterr()  # drop anything printed before
    code = run.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def run_ok(*args):
    """run.main for a run that must succeed (output left to pytest's capture)."""
    import run
    code = run.main([str(a) for a in args])
    assert code == 0, f"run.py {' '.join(map(str, args))} exited with {code}"


def assert_error(code, out, err, *fragments, only_line=True):
    """Exit status 2 and a one-line "error: ..." on stderr containing fragments; no
    traceback. only_line=False allows progress lines (from info) before it."""
    assert code == 2, (code, out, err)
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert lines, "nothing on stderr"
    error_lines = [line for line in lines if line.startswith("error:")]
    assert error_lines == [lines[-1]], err
    if only_line:
        assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[-1], (fragment, lines[-1])
    return lines[-1]


def common(tmp, plots=False):
    """No progress bars, and no plot unless the test reads it (into tmp/plots):
    every training run passes these. A plot takes longer to draw than a test's
    run on the CoLA subset; the tests that read one ask for it."""
    return ["--plots-dir", os.path.join(str(tmp), "plots"), "--no-progress", *([] if plots else ["--no-plots"])]


# ---------------------------------------------------------------------------
# Runs shared across tests and modules (tests that change them copy them first)
# ---------------------------------------------------------------------------

_ONCE = {}


def once(key, make):
    if key not in _ONCE:
        _ONCE[key] = make()
    return _ONCE[key]


def subset_dir(tmp_path_factory):
    """A small copy of CoLA: 300 training rows, 100 in-domain and 100 out-of-domain dev rows."""
    return once("subset", lambda: write_subset(tmp_path_factory.mktemp("cola_subset")))


def lora_subset_run(tmp_path_factory, weights):
    """`run.py LoRA` for one epoch on the subset: a teacher for distil. Read-only."""
    def make():
        data = subset_dir(tmp_path_factory)
        tmp = tmp_path_factory.mktemp("lora_subset")
        out = os.path.join(str(tmp), "LoRA")
        run_ok("LoRA", "--weights", weights, "--data-dir", data, "--epochs", 1, "--out-dir", out, *common(tmp))
        return out
    return once(("lora_subset", weights), make)


def lora_full_run(tmp_path_factory, weights):
    """`run.py LoRA` for one epoch on the full, real CoLA directory. Read-only."""
    def make():
        data = cola_dir()
        tmp = tmp_path_factory.mktemp("lora_full")
        out = os.path.join(str(tmp), "LoRA")
        run_ok("LoRA", "--weights", weights, "--data-dir", data, "--epochs", 1, "--out-dir", out,
               *common(tmp, plots=True))
        return out, os.path.join(str(tmp), "plots")
    return once(("lora_full", weights), make)
