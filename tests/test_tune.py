"""tune.py: tune-report's grouping of seeds and compare's paired statistics,
against hand computations on metrics files written here, and end to end on
seed sweeps of real runs."""
import json
import math
import os
import statistics

import pytest

from cola import STUDENT, assert_error, cli, common, subset_dir
from tune import T_975, paired_interval

MCC_A = [0.10, 0.12, 0.08, 0.11, 0.09]
MCC_B = [0.20, 0.25, 0.18, 0.26, 0.21]
ACC_A = [0.66, 0.67, 0.65, 0.66, 0.64]
ACC_B = [0.70, 0.71, 0.69, 0.72, 0.70]


def write_run(path, seed, mcc, acc, mode="rnn", teacher_mcc=None, lr=1e-3, agreement=None):
    """A metrics.json of 2 epochs whose best epoch (2) holds mcc and acc (and the
    student's agreement with its teacher, if given); epoch 1 is worse."""
    os.makedirs(path, exist_ok=True)
    metrics = {"mode": mode, "args": {"seed": seed, "lr": lr, "epochs": 2, "out_dir": str(path)}, "best_epoch": 2,
               "epochs": [{"epoch": 1, "val_mcc": mcc - 0.05, "val_acc": acc - 0.01},
                          {"epoch": 2, "val_mcc": mcc, "val_acc": acc}]}
    if agreement is not None:
        metrics["epochs"][0]["val_agreement"], metrics["epochs"][1]["val_agreement"] = 0.5, agreement
    if teacher_mcc is not None:
        metrics["teacher"] = {"val_mcc": teacher_mcc, "val_acc": 0.75}
    with open(os.path.join(path, "metrics.json"), "w") as f:
        json.dump(metrics, f)


def sweep(tmp_path, name, mccs, accs, agreements=None, **kwargs):
    for seed, (mcc, acc) in enumerate(zip(mccs, accs)):
        write_run(tmp_path / name / f"seed-{seed}", seed, mcc, acc,
                  agreement=agreements[seed] if agreements else None, **kwargs)
    return tmp_path / name


def test_paired_interval_by_hand():
    differences = [b - a for a, b in zip(MCC_A, MCC_B)]
    mean = sum(differences) / 5
    sd = math.sqrt(sum((d - mean) ** 2 for d in differences) / 4)
    half = 2.776 * sd / math.sqrt(5)  # t(0.975, 4 degrees of freedom)
    diff, low, high = paired_interval(MCC_A, MCC_B)
    assert diff == pytest.approx(mean) and low == pytest.approx(mean - half) and high == pytest.approx(mean + half)
    assert T_975[0] == pytest.approx(12.706) and T_975[9] == pytest.approx(2.228)  # df 1 and 10
    assert paired_interval([0.1], [0.3])[1:] == (None, None)


def test_compare_two_seed_sweeps(tmp_path, capsys):
    a = sweep(tmp_path, "rnn", MCC_A, ACC_A)
    b = sweep(tmp_path, "distil", MCC_B, ACC_B, mode="distil", teacher_mcc=0.3)
    code, out, err = cli(capsys, "compare", a, b, "--plots-dir", tmp_path / "plots")
    assert code == 0, err
    lines = out.splitlines()
    rows = [line.split() for line in lines if line.strip() and line.split()[0].isdigit()]
    assert [int(r[0]) for r in rows] == [0, 1, 2, 3, 4]
    assert [float(r[1]) for r in rows] == MCC_A and [float(r[2]) for r in rows] == MCC_B
    assert [float(r[4]) for r in rows] == ACC_A and [float(r[5]) for r in rows] == ACC_B
    mcc_line = next(line for line in lines if line.startswith("val_mcc:"))
    mean_a, sd_a = statistics.mean(MCC_A), statistics.stdev(MCC_A)
    mean_b, sd_b = statistics.mean(MCC_B), statistics.stdev(MCC_B)
    diff, low, high = paired_interval(MCC_A, MCC_B)
    assert f"A {mean_a:.4f} ± {sd_a:.4f}" in mcc_line and f"B {mean_b:.4f} ± {sd_b:.4f}" in mcc_line
    assert f"B - A {diff:+.4f}, 95% CI [{low:+.4f}, {high:+.4f}]" in mcc_line
    assert low > 0  # this made-up gain is clear of noise
    share_line = next(line for line in lines if line.startswith("share of the teacher"))
    assert f"A {mean_a / 0.3:.0%}" in share_line and f"B {mean_b / 0.3:.0%}" in share_line
    with open(tmp_path / "plots" / "compare_rnn_vs_distil.png", "rb") as f:
        assert f.read(4) == b"\x89PNG"


def test_compare_leaves_out_unfinished_runs(tmp_path, capsys):
    a = sweep(tmp_path, "a", MCC_A, ACC_A)
    b = sweep(tmp_path, "b", MCC_B, ACC_B)
    path = tmp_path / "b" / "seed-4" / "metrics.json"
    metrics = json.loads(path.read_text())
    metrics["epochs"], metrics["best_epoch"] = metrics["epochs"][:1], 1  # a run still in its first epoch
    path.write_text(json.dumps(metrics))
    code, out, err = cli(capsys, "compare", a, b, "--plots-dir", tmp_path / "plots")
    assert code == 0, err
    assert "4 paired seed(s)" in out and "seed 4 has 1 of 2 epochs, left out" in err


def test_compare_pairs_only_shared_seeds_and_single_runs(tmp_path, capsys):
    a = sweep(tmp_path, "a", MCC_A, ACC_A)
    write_run(tmp_path / "b", seed=3, mcc=0.5, acc=0.8)
    code, out, err = cli(capsys, "compare", a, tmp_path / "b", "--plots-dir", tmp_path / "plots")
    assert code == 0, err
    assert "1 paired seed(s)" in out and "no interval from one pair" in out
    assert f"{0.5 - MCC_A[3]:+.4f}" in out


def test_compare_errors(tmp_path, capsys):
    a = sweep(tmp_path, "a", MCC_A[:2], ACC_A[:2])
    write_run(tmp_path / "other_seed", seed=9, mcc=0.2, acc=0.7)
    code, out, err = cli(capsys, "compare", a, tmp_path / "other_seed")
    assert_error(code, out, err, "share no seed")
    code, out, err = cli(capsys, "compare", a, tmp_path / "missing")
    assert_error(code, out, err, "missing", "not a directory")
    (tmp_path / "empty").mkdir()
    code, out, err = cli(capsys, "compare", a, tmp_path / "empty")
    assert_error(code, out, err, "holds no metrics.json")
    write_run(tmp_path / "a" / "seed-2-lr", seed=2, mcc=0.1, acc=0.6, lr=3e-4)  # not just another seed
    code, out, err = cli(capsys, "compare", a, tmp_path / "other_seed")
    assert_error(code, out, err, "differ in more than the seed")


def test_tune_report_groups_seeds(tmp_path, capsys):
    from tune import TUNE_COLUMNS, append_tsv_row
    table = str(tmp_path / "rnn.tsv")
    fixed = json.dumps({"epochs": 5})
    values = {"lr=1e-3": [(0.10, 0.66), (0.14, 0.68), (0.12, 0.65)], "lr=3e-4": [(0.20, 0.70), (0.16, 0.69)]}
    for settings, runs in values.items():
        for seed, (mcc, acc) in enumerate(runs):
            append_tsv_row(table, {"settings": f"{settings} seed={seed}", "best_epoch": 3, "val_acc": acc,
                                   "val_mcc": mcc, "seconds": 1.0, "out_dir": "x", "fixed": fixed})
    # a run of another fixed setting stays apart
    append_tsv_row(table, {"settings": "lr=1e-3 seed=0", "best_epoch": 1, "val_acc": 0.5, "val_mcc": 0.5,
                           "seconds": 1.0, "out_dir": "x", "fixed": json.dumps({"epochs": 1})})
    # the file: one header of the seven columns, then a row of seven fields per run
    import csv
    with open(table, newline="") as f:
        written = list(csv.reader(f, delimiter="\t"))
    assert written[0] == list(TUNE_COLUMNS) == ["settings", "best_epoch", "val_acc", "val_mcc", "seconds", "out_dir",
                                                "fixed"]
    assert len(written) == 1 + 6 and all(len(row) == 7 for row in written)
    assert written[1][:4] == ["lr=1e-3 seed=0", "3", "0.66", "0.1"] and json.loads(written[1][6]) == {"epochs": 5}
    code, out, err = cli(capsys, "tune-report", table, "--plots-dir", tmp_path / "plots")
    assert code == 0, err
    lines = out.strip().splitlines()[1:]
    # by mean MCC; the two lr=1e-3 groups told apart by the fixed setting they differ in
    assert [line.split()[:2] for line in lines] == [["lr=1e-3", "epochs=1"], ["lr=3e-4", "2"], ["lr=1e-3", "epochs=5"]]
    first = lines[0].split()
    assert first[2] == "1" and float(first[3]) == 0.5
    for line, settings in zip(lines[1:], ("lr=3e-4", "lr=1e-3")):
        n, mcc, _, mcc_sd, acc, _, acc_sd = line.split()[-7:]
        mccs, accs = [m for m, _ in values[settings]], [a for _, a in values[settings]]
        assert int(n) == len(mccs)
        assert float(mcc) == pytest.approx(statistics.mean(mccs), abs=1e-4)
        assert float(mcc_sd) == pytest.approx(statistics.stdev(mccs), abs=1e-4)
        assert float(acc) == pytest.approx(statistics.mean(accs), abs=1e-4)
        assert float(acc_sd) == pytest.approx(statistics.stdev(accs), abs=1e-4)


def test_seed_sweeps_of_rnn_and_distil_alpha_zero_compare_equal(tmp_path_factory, tmp_path, capsys):
    """End to end: two seed sweeps (--tune seed=0,1) of runs that train identically
    (distil with --kd-alpha 0 is rnn): compare finds a difference of exactly 0."""
    data = subset_dir(tmp_path_factory)
    logits = tmp_path / "logits.npy"
    import numpy as np
    np.save(logits, np.zeros((300, 2), np.float32))
    base = [*STUDENT, "--epochs", "1", "--data-dir", data, "--tuning-dir", tmp_path / "tuning", *common(tmp_path)]
    for mode, extra in (("rnn", []), ("distil", ["--kd-alpha", "0", "--teacher-logits", logits])):
        code, _, err = cli(capsys, mode, *base, *extra, "--out-dir", tmp_path / mode, "--tune", "seed=0,1")
        assert code == 0, err
    code, out, err = cli(capsys, "compare", tmp_path / "rnn", tmp_path / "distil", "--plots-dir", tmp_path / "p")
    assert code == 0, err
    assert "2 paired seed(s)" in out
    assert "B - A +0.0000, 95% CI [+0.0000, +0.0000]" in out
    code, out, err = cli(capsys, "tune-report", tmp_path / "tuning" / "rnn.tsv", "--plots-dir", tmp_path / "p")
    assert code == 0, err
    assert out.strip().splitlines()[1].split()[:2] == ["(defaults)", "2"]


def test_two_processes_share_a_sweep(tmp_path_factory, tmp_path, capsys):
    """A sweep skips the settings another process has finished or is running (it holds
    that run's directory), so two sweeps of one grid divide the work."""
    from utils import lock_dir
    data = subset_dir(tmp_path_factory)
    sweep = ["rnn", *STUDENT, "--epochs", "1", "--data-dir", data, "--tuning-dir", tmp_path / "tuning",
             "--out-dir", tmp_path / "sweep", *common(tmp_path)]
    code, _, err = cli(capsys, *sweep, "--tune", "seed=1")  # finished by "another process"
    assert code == 0, err
    with lock_dir(str(tmp_path / "sweep" / "seed-2")):  # running in another process
        code, _, err = cli(capsys, *sweep, "--tune", "seed=0,1,2")
    assert code == 0, err
    assert "seed=1 already in" in err and "seed=2 is running in another process, skipped" in err
    with open(tmp_path / "tuning" / "rnn.tsv") as f:
        assert [line.split("\t")[0] for line in f][1:] == ["seed=1", "seed=0"]


def test_a_sweep_of_one_number_is_plotted_as_a_curve(tmp_path, capsys, monkeypatch):
    """augment=1,3,10 over seeds: mean ± std against the number, in its order (not by MCC);
    a sweep over anything else keeps the bar chart."""
    import tune
    from tune import append_tsv_row
    curves, bars = [], []
    monkeypatch.setattr(tune, "plot_curve", lambda rows, name, path, title: curves.append((rows, name)))
    monkeypatch.setattr(tune, "plot_tuning", lambda rows, path, title: bars.append(rows))
    table = str(tmp_path / "distil.tsv")
    for copies, mccs in ((10, (0.30, 0.26)), (1, (0.10, 0.12)), (3, (0.20, 0.22))):
        for seed, mcc in enumerate(mccs):
            append_tsv_row(table, {"settings": f"augment={copies} seed={seed}", "best_epoch": 3, "val_acc": 0.7,
                                   "val_mcc": mcc, "seconds": 1.0, "out_dir": "x", "fixed": "{}"})
    code, _, err = cli(capsys, "tune-report", table, "--plots-dir", tmp_path)
    assert code == 0, err
    (rows, name), = curves
    assert name == "augment" and not bars
    means = {r["settings"]: r["val_mcc"] for r in rows}
    assert means == pytest.approx({"augment=1": 0.11, "augment=3": 0.21, "augment=10": 0.28})
    other = str(tmp_path / "rnn.tsv")
    for settings in ("rnn_type=gru", "rnn_type=lstm", "rnn_type=rnn"):
        append_tsv_row(other, {"settings": settings, "best_epoch": 1, "val_acc": 0.7, "val_mcc": 0.1,
                               "seconds": 1.0, "out_dir": "x", "fixed": "{}"})
    code, _, err = cli(capsys, "tune-report", other, "--plots-dir", tmp_path)
    assert code == 0, err
    assert len(bars) == 1 and len(curves) == 1


def test_compare_of_one_seed_prints_no_std(tmp_path, capsys):
    """The spread of a single value is undefined: one seed a side prints n=1, never "± 0.0000"."""
    write_run(tmp_path / "a", seed=0, mcc=0.1477, acc=0.70)
    write_run(tmp_path / "b", seed=0, mcc=0.2000, acc=0.72)
    code, out, err = cli(capsys, "compare", tmp_path / "a", tmp_path / "b", "--plots-dir", tmp_path / "plots")
    assert code == 0, err
    assert "±" not in out
    mcc_line = next(line for line in out.splitlines() if line.startswith("val_mcc:"))
    assert "A 0.1477" in mcc_line and "B 0.2000" in mcc_line and "n=1, no std" in mcc_line


def with_student(path, **student):
    """Give the metrics.json at path a "student" record (what rnn and distil write) and rnn's args."""
    metrics_path = os.path.join(path, "metrics.json")
    with open(metrics_path) as f:
        metrics = json.load(f)
    cell = student.pop("rnn_type", "rnn")
    metrics["student"] = {"init_embeddings": "random", "n_embd": 768, "vocab_size": 50257, **student}
    metrics["args"].update({"rnn_type": cell, "rnn_hidden": 256, "rnn_layers": 1, "bidirectional": False})
    with open(metrics_path, "w") as f:
        json.dump(metrics, f)


def test_compare_warns_in_one_line_when_the_students_differ(tmp_path, capsys):
    a = sweep(tmp_path, "rnn", MCC_A, ACC_A)
    b = sweep(tmp_path, "distil", MCC_B, ACC_B, mode="distil", teacher_mcc=0.3)
    for seed in range(5):
        with_student(a / f"seed-{seed}")
        with_student(b / f"seed-{seed}", init_embeddings="teacher", n_embd=384, vocab_size=30522, rnn_type="gru")
    code, out, err = cli(capsys, "compare", a, b, "--plots-dir", tmp_path / "plots")
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, err
    for named in ("tokenizer: A 50257 tokens, B 30522 tokens", "starting vectors: A random, B teacher",
                  "embedding width: A 768, B 384", "cell: A rnn, B gru"):
        assert named in warnings[0], (named, warnings[0])
    assert "hidden width" not in warnings[0]  # the same on both sides
    # the same students on both sides (distil --teacher X against rnn --teacher X): no warning
    for seed in range(5):
        with_student(b / f"seed-{seed}", init_embeddings="teacher", n_embd=384, vocab_size=30522)
        with_student(a / f"seed-{seed}", init_embeddings="teacher", n_embd=384, vocab_size=30522)
    code, out, err = cli(capsys, "compare", a, b, "--plots-dir", tmp_path / "plots")
    assert code == 0 and "warning:" not in err, err


def test_a_sweep_logs_each_run_under_its_own_name(tmp_path_factory, tmp_path, capsys):
    """--tune with --log-dir DIR: each run's steps.csv and epochs.csv in DIR/<run's name>/, none shared."""
    import csv
    logs = tmp_path / "logs"
    code, _, err = cli(capsys, "rnn", *STUDENT, "--epochs", "2", "--data-dir", subset_dir(tmp_path_factory),
                       "--tuning-dir", tmp_path / "tuning", "--out-dir", tmp_path / "sweep", "--log-dir", logs,
                       "--tune", "seed=0,1", *common(tmp_path))
    assert code == 0, err
    assert sorted(os.listdir(logs)) == ["seed-0", "seed-1"]
    epochs = {}
    for name in ("seed-0", "seed-1"):
        with open(logs / name / "epochs.csv", newline="") as f:
            epochs[name] = list(csv.DictReader(f))
        with open(tmp_path / "sweep" / name / "metrics.json") as f:
            metrics = json.load(f)
        assert [int(row["epoch"]) for row in epochs[name]] == [1, 2]
        assert [float(row["val_mcc"]) for row in epochs[name]] == \
            pytest.approx([e["val_mcc"] for e in metrics["epochs"]], abs=1e-6)
        with open(logs / name / "steps.csv", newline="") as f:
            assert int(list(csv.DictReader(f))[0]["step"]) == 1
    assert epochs["seed-0"] != epochs["seed-1"]


def test_a_sweep_takes_flags_of_several_words_in_either_spelling():
    """lora_rank, batch-size and --lora-alpha name the mode's flags of those names;
    a name the mode lacks is refused."""
    import run
    import tune
    from utils import UserError
    lora = run.build_parser()._subparsers._group_actions[0].choices["LoRA"]
    grid = tune.parse_grid("lora_rank=4,8 batch-size=16 --lora-alpha=8", lora, run.RUN_CONTROL)
    assert [(name, values, action.dest) for name, values, action in grid] == [
        ("lora_rank", ["4", "8"], "lora_rank"), ("batch_size", ["16"], "batch_size"), ("lora_alpha", ["8"], "lora_alpha")]
    with pytest.raises(UserError, match="lora_ranks"):
        tune.parse_grid("lora_ranks=4", lora, run.RUN_CONTROL)


def test_teacher_curve_gives_each_teachers_point_and_the_slope(tmp_path, capsys):
    agreements = [0.80, 0.84, 0.86, 0.90, 0.85]
    weak = sweep(tmp_path, "distil-weak", MCC_A, ACC_A, agreements, mode="distil", teacher_mcc=0.2)
    strong = sweep(tmp_path, "distil-strong", MCC_B, ACC_B, mode="distil", teacher_mcc=0.4)
    code, out, err = cli(capsys, "teacher-curve", strong, weak, "--plots-dir", tmp_path / "plots")
    assert code == 0, err
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [float(r[0]) for r in rows] == [0.2, 0.4]  # sorted by the teacher's MCC
    for row, mccs, teacher in ((rows[0], MCC_A, 0.2), (rows[1], MCC_B, 0.4)):
        assert int(row[1]) == 5
        assert row[2:5] == [f"{statistics.mean(mccs):.4f}", "±", f"{statistics.stdev(mccs):.4f}"]
        assert row[5] == f"{statistics.mean(mccs) / teacher:.0%}"
    # the best epochs' agreement with the teacher, mean over the seeds; "-" where the runs have none
    assert rows[0][6] == f"{statistics.mean(agreements):.1%}" and rows[1][6] == "-"
    slope = (statistics.mean(MCC_B) - statistics.mean(MCC_A)) / (0.4 - 0.2)
    assert f"teacher's: {slope:+.2f}" in out
    with open(tmp_path / "plots" / "teacher_curve.png", "rb") as f:
        assert f.read(4) == b"\x89PNG"
    code, out, err = cli(capsys, "teacher-curve", weak, "--plots-dir", tmp_path / "plots")
    assert code == 0 and "needs two teachers" in out


def test_teacher_curve_refuses_a_sweep_without_a_teacher(tmp_path, capsys):
    labels_only = sweep(tmp_path, "rnn", MCC_A, ACC_A)
    code, out, err = cli(capsys, "teacher-curve", labels_only, "--plots-dir", tmp_path / "plots")
    assert_error(code, out, err, "no teacher's validation MCC", "distil --teacher")
    code, out, err = cli(capsys, "teacher-curve", tmp_path / "missing", "--plots-dir", tmp_path / "plots")
    assert_error(code, out, err, "not a directory")
