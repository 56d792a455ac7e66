"""What a training run leaves in its --out-dir: its plots, no resume state once
finished, and never a finished run replaced or two runs interleaved by accident."""
import json
import os

import rundir
from cola import STUDENT, assert_error, cli, subset_dir
from utils import lock_dir


def rnn_argv(tmp_path_factory, out, *extra, plots=False):
    return ["rnn", *STUDENT, "--epochs", "1", "--data-dir", subset_dir(tmp_path_factory), "--no-progress",
            "--out-dir", out, *([] if plots else ["--no-plots"]), *extra]


def test_a_finished_run_keeps_its_plot_and_drops_its_resume_state(tmp_path, tmp_path_factory, capsys):
    out = tmp_path / "run"
    code, _, err = cli(capsys, *rnn_argv(tmp_path_factory, out, plots=True))
    assert code == 0, err
    assert sorted(os.listdir(out)) == ["metrics.json", "plots", "student.json", "student.safetensors"]
    assert os.listdir(out / "plots") == ["rnn_run.png"]
    assert f"wrote {out / 'metrics.json'} and {out / 'plots' / 'rnn_run.png'}" in err
    # --no-plots: the same run, no plot, and the closing line says so; it resumes as it started
    code, _, err = cli(capsys, *rnn_argv(tmp_path_factory, tmp_path / "bare", "--epochs", "2", "--stop-after", 1))
    assert code == 0, err
    code, _, err = cli(capsys, "rnn", "--resume", "--out-dir", tmp_path / "bare")
    assert code == 0, err
    assert sorted(os.listdir(tmp_path / "bare")) == ["metrics.json", "student.json", "student.safetensors"]
    assert err.rstrip().endswith(f"wrote {tmp_path / 'bare' / 'metrics.json'}")
    code, _, err = cli(capsys, *rnn_argv(tmp_path_factory, tmp_path / "kept", "--keep-resume-state"))
    assert code == 0, err
    assert os.path.isfile(tmp_path / "kept" / "resume_state.pt")
    # an interrupted run keeps it, or --resume could not continue
    code, _, err = cli(capsys, *rnn_argv(tmp_path_factory, tmp_path / "stopped", "--epochs", "2", "--stop-after", 1))
    assert code == 0, err
    assert os.path.isfile(tmp_path / "stopped" / "resume_state.pt")


def test_a_finished_run_is_never_replaced_by_accident(tmp_path, tmp_path_factory, capsys):
    out = tmp_path / "run"
    code, _, err = cli(capsys, *rnn_argv(tmp_path_factory, out))
    assert code == 0, err
    before = {name: os.stat(out / name).st_mtime_ns for name in ("metrics.json", "student.safetensors")}
    code, stdout, err = cli(capsys, *rnn_argv(tmp_path_factory, out, "--lr", "0.01"))
    assert_error(code, stdout, err, str(out), "already holds a run", "--overwrite")
    assert "--resume" not in err  # a finished run has nothing to resume: one piece of advice, --overwrite
    code, stdout, err = cli(capsys, *rnn_argv(tmp_path_factory, out, "--resume"))
    assert_error(code, stdout, err, "is complete", "--overwrite")
    assert {name: os.stat(out / name).st_mtime_ns for name in before} == before
    # --overwrite replaces it
    code, _, err = cli(capsys, *rnn_argv(tmp_path_factory, out, "--lr", "0.01", "--overwrite"))
    assert code == 0, err
    with open(out / "metrics.json") as f:
        assert json.load(f)["args"]["lr"] == 0.01
    # an --out-dir that is a file is said to be one
    (tmp_path / "file").write_text("x")
    code, stdout, err = cli(capsys, *rnn_argv(tmp_path_factory, tmp_path / "file"))
    assert_error(code, stdout, err, "is a file")


def test_a_second_run_in_the_same_directory_is_refused_at_once(tmp_path, tmp_path_factory, capsys):
    out = tmp_path / "run"
    with lock_dir(str(out)):  # as a run in another process holds it
        code, stdout, err = cli(capsys, *rnn_argv(tmp_path_factory, out))
        assert_error(code, stdout, err, "another run is writing", str(out))
    assert not os.path.exists(out / "metrics.json")
    code, _, err = cli(capsys, *rnn_argv(tmp_path_factory, out))  # the lock is gone with its holder
    assert code == 0, err


def test_sweep_runs_follow_the_same_rules(tmp_path, tmp_path_factory, capsys):
    sweep = tmp_path / "sweep"
    code, _, err = cli(capsys, *rnn_argv(tmp_path_factory, sweep / "lr-0.01"))  # a run that is no sweep row
    assert code == 0, err
    code, stdout, err = cli(capsys, *rnn_argv(tmp_path_factory, sweep, "--tune", "lr=0.01",
                                              "--tuning-dir", tmp_path / "tuning"))
    assert_error(code, stdout, err, "already holds a run", only_line=False)


def test_one_epoch_plot_has_room_and_integer_ticks(monkeypatch, tmp_path):
    figures = []
    monkeypatch.setattr(rundir, "save_figure", lambda plt, fig, path: figures.append(fig))
    record = {"epoch": 1, "train_loss": 0.6, "val_loss": 0.6, "train_acc": 0.7, "val_acc": 0.7, "train_mcc": 0.0,
              "val_mcc": 0.1}
    rundir.plot_history({"epochs": [record], "best_epoch": 1}, str(tmp_path / "one.png"), "one epoch")
    for ax in figures[0].axes:
        assert ax.get_xlim() == (0.0, 2.0)
    rundir.plot_history({"epochs": [{**record, "epoch": e} for e in range(1, 8)], "best_epoch": 3},
                        str(tmp_path / "seven.png"), "seven")
    ticks = [t for t in figures[1].axes[0].get_xticks() if 1 <= t <= 7]
    assert ticks and all(float(t).is_integer() for t in ticks)


def read_csv(path):
    import csv
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_log_dir_writes_every_step_and_epoch_as_csv(tmp_path, tmp_path_factory, capsys):
    """--log-dir: steps.csv (epoch, step, loss, lr: one row per step, the schedule's lr)
    and epochs.csv (one row per epoch, metrics.json's numbers); a resumed run appends
    and ends with the uninterrupted run's files."""
    import math
    argv = rnn_argv(tmp_path_factory, tmp_path / "run", "--epochs", "2", "--batch-size", "64",
                    "--log-dir", tmp_path / "log")
    code, _, err = cli(capsys, *argv)
    assert code == 0, err
    steps, epochs = read_csv(tmp_path / "log" / "steps.csv"), read_csv(tmp_path / "log" / "epochs.csv")
    per_epoch = math.ceil(300 / 64)  # the subset's 300 training sentences
    assert steps[0] == ["epoch", "step", "loss", "lr"] and len(steps) == 1 + 2 * per_epoch
    assert [int(r[1]) for r in steps[1:]] == list(range(1, 2 * per_epoch + 1))
    assert [int(r[0]) for r in steps[1:]] == [1] * per_epoch + [2] * per_epoch
    lrs = [float(r[3]) for r in steps[1:]]
    assert max(lrs) <= 1e-3 and lrs[-1] < lrs[len(lrs) // 2]  # warm-up to the peak, then the linear decay
    assert all(0 < float(r[2]) < 10 for r in steps[1:])
    with open(tmp_path / "run" / "metrics.json") as f:
        metrics = json.load(f)
    assert epochs[0][:7] == ["epoch", "train_loss", "train_acc", "train_mcc", "val_loss", "val_acc", "val_mcc"]
    assert len(epochs) == 3
    for row, record in zip(epochs[1:], metrics["epochs"]):
        assert float(row[6]) == record["val_mcc"] and float(row[1]) == record["train_loss"]
    # stopped after epoch 1, then resumed: the same rows (the seconds column aside)
    code, _, err = cli(capsys, *rnn_argv(tmp_path_factory, tmp_path / "two", "--epochs", "2", "--batch-size", "64",
                                         "--log-dir", tmp_path / "log2", "--stop-after", "1"))
    assert code == 0, err
    code, _, err = cli(capsys, "rnn", "--out-dir", tmp_path / "two", "--resume", "--no-progress")
    assert code == 0, err
    assert read_csv(tmp_path / "log2" / "steps.csv") == steps
    assert [r[:-1] for r in read_csv(tmp_path / "log2" / "epochs.csv")] == [r[:-1] for r in epochs]


def test_distil_plot_separates_objective_from_validation_loss_and_marks_teacher_and_best(monkeypatch, tmp_path):
    figures = []
    monkeypatch.setattr(rundir, "save_figure", lambda plt, fig, path: figures.append(fig))
    epochs = [{"epoch": e, "train_loss": 0.2 / e, "val_loss": 0.62 + 0.01 * e, "train_acc": 0.7 + 0.05 * e,
               "val_acc": 0.7, "train_mcc": 0.1 * e, "val_mcc": [0.1, 0.25, 0.2][e - 1]} for e in (1, 2, 3)]
    record = {"epochs": epochs, "best_epoch": 2, "teacher": {"val_acc": 0.74, "val_mcc": 0.31}}
    rundir.plot_history(record, str(tmp_path / "distil.png"), "distil in runs/distil: 3 epochs, seed 0")
    objective, validation, accuracy, mcc = figures[0].axes
    assert "objective" in objective.get_title() and "validation cross-entropy" in validation.get_title()
    assert [line.get_ydata()[0] for line in objective.get_lines()[:1]] == [0.2]  # only the objective there
    for ax, level in ((accuracy, 0.74), (mcc, 0.31)):
        teacher = [line for line in ax.get_lines() if line.get_label() == "teacher (validation)"]
        assert teacher and list(teacher[0].get_ydata()) == [level, level]
    for ax in figures[0].axes:
        kept = [line for line in ax.get_lines() if line.get_label() == "kept: epoch 2"]
        assert kept and list(kept[0].get_xdata()) == [2, 2]
    assert "seed 0" in figures[0]._suptitle.get_text()
