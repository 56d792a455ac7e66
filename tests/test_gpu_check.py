"""`python bench.py gpu`'s machinery, with stand-in steps whose commands are short
`python -c` programs: steps run in priority order, each within its timeout; a failed,
timed-out or raising step is recorded and the next still runs; --steps selects; the
report names the machine and every step's status. The real steps run only in
`python bench.py gpu` itself (on a CPU: --device cpu --quick)."""
import json
import os
import sys
import time

import pytest
import torch

import bench
import gpu_check
import gpu_steps
from gpu_steps import PYTHON, Step


def cpu_model():
    """The CPU's model as /proc/cpuinfo names it (None where there is no such file)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    return value.strip()
    except OSError:
        return None


def stand_in_steps(order, tmp_path):
    """Five steps: ok, failing, timing out (its child's own child killed with it),
    ok, raising. Each appends its name to order when it starts."""
    survivor = tmp_path / "grandchild-survived"

    def command_step(name, code):
        def run(ctx):
            order.append(name)
            command = ctx.run(f"{name} command", [PYTHON, "-c", code])
            return {"printed": command.output.strip()}, [f"{name} printed `{command.output.strip()}`"]
        return run

    def raising(ctx):
        order.append("e")
        raise ValueError("the step's own bug")

    grandchild = f"import time; time.sleep(2); open({str(survivor)!r}, 'w')"
    sleeper = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {grandchild!r}]); time.sleep(60)"
    return [Step("a", "first", command_step("a", "print('alpha')"), 20, 20),
            Step("b", "failing", command_step("b", "import sys; print('boom'); sys.exit(3)"), 20, 20),
            Step("c", "too slow", command_step("c", sleeper), 1, 1),
            Step("d", "after the slow one", command_step("d", "print('delta')"), 20, 20),
            Step("e", "raising", raising, 20, 20)], survivor


@pytest.fixture
def check(tmp_path, capsys):
    """gpu_check.main over the stand-in steps: (exit code, report text, report data, order, survivor file)."""
    def run(*flags):
        order = []
        steps, survivor = stand_in_steps(order, tmp_path)
        report = tmp_path / "report.md"
        code = gpu_check.main(["--device", "cpu", "--report", str(report), *flags], steps=steps)
        data = json.loads((tmp_path / "report.json").read_text())
        return code, report.read_text(), data, order, survivor
    return run


def test_steps_run_in_order_and_a_failed_or_timed_out_step_does_not_stop_the_next(check):
    start = time.monotonic()
    code, text, data, order, survivor = check()
    assert order == ["a", "b", "c", "d", "e"]
    statuses = {step["name"]: step["status"] for step in data["steps"]}
    assert statuses == {"a": "ok", "b": "failed", "c": "timed out", "d": "ok", "e": "failed"}
    assert code == 1  # not every step passed
    steps = {step["name"]: step for step in data["steps"]}
    assert steps["a"]["figures"] == {"printed": "alpha"} and steps["d"]["figures"] == {"printed": "delta"}
    assert steps["c"]["seconds"] < 5 and time.monotonic() - start < 20  # killed at its timeout, not at 60 s
    time.sleep(2.5)
    assert not survivor.exists()  # the timed-out command's own children went with it
    # the report: each step's status in the summary, the failed command's output and the step's exception
    for name, status in statuses.items():
        assert f"| {name} | {status} |" in text
    assert "boom" in text and "exit code 3" in text
    assert "ValueError: the step's own bug" in text
    assert "`python -c 'print('\\''alpha'\\'')'`" in text  # every command, as it can be pasted


def test_the_report_names_the_machine(check):
    _, text, data, _, _ = check("--steps", "a")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    assert f"- GPU: {gpu}" in text
    assert data["machine"]["gpu"] == gpu and data["machine"]["torch"] == torch.__version__
    assert f"torch {torch.__version__}, CUDA {torch.version.cuda}" in text
    model = cpu_model()
    if model:
        assert model in text


def test_steps_selects_and_keeps_the_priority_order(check):
    code, text, data, order, _ = check("--steps", "d,a")
    assert order == ["a", "d"] and [step["name"] for step in data["steps"]] == ["a", "d"]
    assert code == 0
    assert "## b:" not in text and "| c |" not in text


def test_step_timeout_overrides_one_step_or_all():
    steps = gpu_check.STEPS
    defaults = gpu_check.step_timeouts(None, steps, quick=False)
    one = gpu_check.step_timeouts("lora=12", steps, quick=False)
    assert one["lora"] == 12 and all(one[s] == defaults[s] for s in defaults if s != "lora")
    assert set(gpu_check.step_timeouts("7", steps, quick=True).values()) == {7}
    assert gpu_check.step_timeouts("7,gen=3", steps, quick=True)["gen"] == 3


@pytest.mark.parametrize("flags, fragment", [
    (["--steps", "lora,nope"], "no step 'nope'"),
    (["--step-timeout", "lora=soon"], "'soon' is not a number"),
    (["--step-timeout", "nope=5"], "no step 'nope'"),
    (["--step-timeout", "-1"], "must be over 0"),
    (["--stpes", "gen"], "unrecognized arguments: --stpes"),
])
def test_bad_flags_are_one_line_errors(flags, fragment, tmp_path, capsys):
    code = bench.main(["gpu", "--device", "cpu", "--report", str(tmp_path / "r.md"), *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error:") and fragment in err
    assert not (tmp_path / "r.md").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_says_to_pass_cpu(tmp_path, capsys):
    assert gpu_check.main(["--report", str(tmp_path / "r.md")]) == 2
    assert "pass --device cpu" in capsys.readouterr().err


def test_the_real_steps_come_in_priority_order_within_the_budget():
    assert [s.name for s in gpu_check.STEPS] == ["tests", "lora", "bench-lora", "student", "gen", "sync"]
    assert sum(s.timeout for s in gpu_check.STEPS) <= 540  # a full run: well under 10 minutes
    assert sum(s.quick_timeout for s in gpu_check.STEPS) <= 285  # --quick on a CPU: under 5 minutes


# ---------------------------------------------------------------------------
# Reading what the runs print and write
# ---------------------------------------------------------------------------

def test_pytest_counts_and_failures_are_read_from_its_summary():
    output = "\n".join(["..F.s", "FAILED tests/test_x.py::test_one - AssertionError: no",
                        "ERROR tests/test_x.py::test_two - RuntimeError",
                        "2 failed, 1 passed, 1 skipped, 1 error in 3.2s"])
    assert gpu_steps.pytest_counts(output) == {"failed": 2, "passed": 1, "skipped": 1, "error": 1}
    assert gpu_steps.pytest_failures(output) == ["tests/test_x.py::test_one", "tests/test_x.py::test_two"]
    assert gpu_steps.pytest_counts("collecting ...") == {}


def test_run_figures_read_epochs_nan_and_every_recorded_precision(tmp_path):
    metrics = {"args": {"dtype": "bfloat16"}, "environment": {"precision": "bf16-autocast"},
               "teacher": {"precision": "float32"}, "student": {"rnn_precision": "float32"},
               "epochs": [{"val_mcc": 0.1, "train_loss": 0.7, "seconds": 2.0},
                          {"val_mcc": 0.3, "train_loss": float("nan"), "seconds": 1.0}]}
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))  # NaN as json writes it
    command = gpu_check.Command("run", ["x"], output="epoch 2/2: train loss nan | 3 compiled shapes so far")
    figures = gpu_steps.run_figures(str(tmp_path), command)
    assert figures["epoch_seconds"] == [2.0, 1.0] and figures["best_val_mcc"] == 0.3 and figures["nan"]
    assert figures["precision"] == "bf16-autocast"
    assert figures["precision_fields"] == {"environment.precision": "bf16-autocast", "teacher.precision": "float32",
                                           "student.rnn_precision": "float32"}
    assert gpu_steps.compiled_shapes(command.output) == 3
    assert gpu_steps.run_figures(str(tmp_path / "none"), gpu_check.Command("run", ["x"]))["nan"] is None


def test_compile_is_set_against_eagers_five_epochs():
    compare = gpu_steps.compile_against_eager({"epoch_seconds": [3.0, 2.0]},
                                              {"epoch_seconds": [10.0, 1.0, 1.0, 1.0, 1.0]})
    assert compare["compiled"] == 14.0 and compare["eager"] == 3.0 + 4 * 2.0
    assert compare["compiled_steady"] == 1.0 and compare["eager_steady"] == 2.0
    assert gpu_steps.compile_against_eager({"epoch_seconds": [3.0]}, {"epoch_seconds": [1.0]}) is None


def test_a_bench_result_is_its_last_json_line():
    output = 'device: cpu\n{"bench": "gen", "ours": 1}\nWarning: x\n{"bench": "lora", "ours": 2}\n'
    assert gpu_steps.last_json(output) == {"bench": "lora", "ours": 2}
    assert gpu_steps.printed_lines(output) == ["device: cpu"]
    assert gpu_steps.last_json("no json") is None


def test_quick_data_is_the_first_rows_of_each_cola_file(tmp_path):
    from cola import COLA_DIR, COLA_FILES
    ctx = gpu_check.Context("cpu", True, str(tmp_path), COLA_DIR, deadline=0)
    subset = gpu_steps.quick_data(ctx)
    for name in COLA_FILES.values():
        with open(os.path.join(COLA_DIR, name), "rb") as f:
            first = [next(f) for _ in range(gpu_steps.QUICK_ROWS[name])]
        with open(os.path.join(subset, name), "rb") as f:
            assert f.readlines() == first
    assert gpu_steps.quick_data(gpu_check.Context("cpu", False, str(tmp_path), COLA_DIR, 0)) == COLA_DIR


def test_bench_dispatches_gpu_and_keeps_its_other_benches(monkeypatch):
    seen = []
    monkeypatch.setattr(gpu_check, "main", lambda argv: seen.append(argv) or 0)
    assert bench.main(["gpu", "--quick", "--steps", "gen"]) == 0 and seen == [["--quick", "--steps", "gen"]]
    monkeypatch.setattr(sys, "argv", ["bench.py", "gpu", "--quick"])
    assert bench.main() == 0 and seen[-1] == ["--quick"]


def test_sync_warnings_are_counted_where_they_happened():
    text = "\n".join([
        "/work/model.py:212: UserWarning: called a synchronizing CUDA operation (Triggered internally at ...)",
        "  lengths = lengths.cpu()",
        "/work/model.py:212: UserWarning: called a synchronizing CUDA operation (Triggered internally at ...)",
        "[W1201 12:00:00.000 CUDAFunctions.cpp:150] Warning: called a synchronizing CUDA operation (function x)",
        "/work/train_utils.py:9: UserWarning: something else"])
    assert gpu_steps.sync_places(text) == {"model.py:212": 2, "C++ (autograd thread)": 1}


def test_the_report_is_rewritten_after_every_step(tmp_path):
    """A check killed mid-way (its command's own timeout) still leaves the steps it finished."""
    report = tmp_path / "report.md"
    seen = []

    def first(ctx):
        return {}, []

    def second(ctx):
        seen.append(report.read_text())
        return {}, []

    steps = [Step("one", "first", first, 5, 5), Step("two", "second", second, 5, 5)]
    assert gpu_check.main(["--device", "cpu", "--report", str(report)], steps=steps) == 0
    assert "| one | ok |" in seen[0] and "| two |" not in seen[0]
    assert "| two | ok |" in report.read_text()


def test_a_report_that_cannot_be_written_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    from utils import SaveError

    def full_disk(path, write):
        raise SaveError(path, "No space left on device")
    monkeypatch.setattr(gpu_check, "atomic_write", full_disk)
    steps = [Step("one", "first", lambda ctx: ({}, []), 5, 5)]
    assert gpu_check.main(["--device", "cpu", "--report", str(tmp_path / "r.md")], steps=steps) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: cannot save") and "No space left" in err


def test_a_report_path_that_is_a_folder_or_under_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    for report in (tmp_path, tmp_path / "file" / "r.md"):
        assert gpu_check.main(["--device", "cpu", "--report", str(report)], steps=[]) == 2
        assert "cannot be written as a file" in capsys.readouterr().err
