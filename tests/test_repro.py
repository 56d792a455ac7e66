"""Reproducible, resumable and data-parallel training; sweeps into tuning/."""
import csv
import json
import os
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from cola import PROJECT_ROOT, STUDENT, assert_error, cli, common, lora_subset_run, run_ok, subset_dir


def epochs_without_time(out_dir):
    with open(os.path.join(out_dir, "metrics.json")) as f:
        metrics = json.load(f)
    return [{k: v for k, v in e.items() if k != "seconds"} for e in metrics["epochs"]], metrics


def weights_of(out_dir):
    path = os.path.join(out_dir, "adapter", "adapter_model.safetensors")
    if not os.path.isfile(path):
        path = os.path.join(out_dir, "student.safetensors")
    return load_file(path)


def assert_same_run(a, b):
    epochs_a, metrics_a = epochs_without_time(a)
    epochs_b, metrics_b = epochs_without_time(b)
    assert epochs_a == epochs_b
    assert metrics_a["best_epoch"] == metrics_b["best_epoch"]
    weights_a, weights_b = weights_of(a), weights_of(b)
    assert weights_a.keys() == weights_b.keys()
    for key in weights_a:
        assert weights_a[key].equal(weights_b[key]), key


def mode_argv(mode, tmp_path_factory, tiny_ckpt):
    """A mode's flags for these tests; on the CPU, which they assert, even where a GPU is."""
    data = subset_dir(tmp_path_factory)
    if mode == "LoRA":
        return ["LoRA", "--weights", tiny_ckpt.path, "--data-dir", data, "--device", "cpu", "--epochs", "3",
                "--batch-size", "32"]
    extra = ["--teacher", lora_subset_run(tmp_path_factory, tiny_ckpt.path), "--weights", tiny_ckpt.path] \
        if mode == "distil" else []
    return [mode, "--data-dir", data, "--device", "cpu", *STUDENT, "--epochs", "3", "--batch-size", "32", *extra]


# The rnn runs that several tests start from, trained once for this file. Read-only: a
# test that changes one (resumes it, edits its state) works on its own copy.

@pytest.fixture(scope="module")
def rnn_straight(tmp_path_factory, tiny_ckpt):
    """The 3-epoch rnn run of mode_argv, never stopped."""
    tmp = tmp_path_factory.mktemp("rnn_straight")
    run_ok(*mode_argv("rnn", tmp_path_factory, tiny_ckpt), *common(tmp), "--out-dir", tmp / "run")
    return str(tmp / "run")


@pytest.fixture(scope="module")
def rnn_stopped(tmp_path_factory, tiny_ckpt):
    """The same run stopped after epoch 1 (--stop-after 1), resumable."""
    tmp = tmp_path_factory.mktemp("rnn_stopped")
    run_ok(*mode_argv("rnn", tmp_path_factory, tiny_ckpt), *common(tmp), "--out-dir", tmp / "run", "--stop-after", "1")
    return str(tmp / "run")


def copy_of(run, tmp_path, name="run"):
    return str(shutil.copytree(run, tmp_path / name))


@pytest.mark.parametrize("mode", ["LoRA", "rnn", "distil"])
def test_same_seed_same_results_and_resume_equals_uninterrupted(mode, tmp_path, tmp_path_factory, tiny_ckpt,
                                                                request):
    argv = mode_argv(mode, tmp_path_factory, tiny_ckpt) + common(tmp_path)
    first, second, resumed = (str(tmp_path / name) for name in ("first", "second", "resumed"))
    if mode == "rnn":  # the shared runs: the first and the one stopped after epoch 1
        first = request.getfixturevalue("rnn_straight")
        resumed = copy_of(request.getfixturevalue("rnn_stopped"), tmp_path, "resumed")
    else:
        run_ok(*argv, "--out-dir", first)
    run_ok(*argv, "--out-dir", second)
    assert_same_run(first, second)
    with open(os.path.join(first, "metrics.json")) as f:
        environment = json.load(f)["environment"]
    assert environment["seed"] == 0 and environment["device"] == "cpu"
    assert {"torch", "numpy", "python"} <= set(environment)
    assert set(environment["data_sha256"]) == {"in_domain_train.tsv", "in_domain_dev.tsv"}
    assert all(len(digest) == 64 for digest in environment["data_sha256"].values())

    # killed after epoch 1, then resumed: the same run as never stopping
    if mode != "rnn":
        run_ok(*argv, "--out-dir", resumed, "--stop-after", "1")
    assert len(epochs_without_time(resumed)[0]) == 1
    run_ok(*argv, "--out-dir", resumed, "--resume")
    assert_same_run(first, resumed)


def test_different_seed_differs(tmp_path, tmp_path_factory, tiny_ckpt, rnn_stopped):
    argv = mode_argv("rnn", tmp_path_factory, tiny_ckpt) + common(tmp_path)
    run_ok(*argv, "--out-dir", tmp_path / "b", "--seed", "1", "--stop-after", "1")  # rnn_stopped's, seed 1
    assert epochs_without_time(rnn_stopped)[0] != epochs_without_time(tmp_path / "b")[0]


def test_resume_refuses_other_settings_and_missing_state(tmp_path, tmp_path_factory, tiny_ckpt, capsys, rnn_stopped):
    argv = mode_argv("rnn", tmp_path_factory, tiny_ckpt) + common(tmp_path)
    out = copy_of(rnn_stopped, tmp_path)
    code, stdout, err = cli(capsys, *argv, "--out-dir", out, "--resume", "--lr", "0.01")
    assert_error(code, stdout, err, "--resume", "lr", only_line=False)
    code, stdout, err = cli(capsys, *argv, "--out-dir", str(tmp_path / "never-ran"), "--resume")
    assert_error(code, stdout, err, "nothing to resume")
    with open(os.path.join(out, "resume_state.pt"), "wb") as f:
        f.write(b"not a torch file")
    code, stdout, err = cli(capsys, *argv, "--out-dir", out, "--resume")
    assert_error(code, stdout, err, "corrupt", only_line=False)


def test_resume_of_a_run_saved_before_a_flag_existed(tmp_path, tmp_path_factory, tiny_ckpt, capsys, rnn_stopped):
    """A run interrupted under an older version, whose saved settings lack a flag
    added since (--dtype), resumes as if it had that flag's default; a value other
    than the default is still a changed setting."""
    import torch
    argv = mode_argv("rnn", tmp_path_factory, tiny_ckpt) + common(tmp_path)
    out = copy_of(rnn_stopped, tmp_path)
    path = os.path.join(out, "resume_state.pt")
    state = torch.load(path, weights_only=True)
    del state["signature"]["dtype"]
    torch.save(state, path)
    code, stdout, err = cli(capsys, *argv, "--out-dir", out, "--resume", "--dtype", "bfloat16")
    assert_error(code, stdout, err, "--resume", "dtype", only_line=False)
    code, _, err = cli(capsys, *argv, "--out-dir", out, "--resume")
    assert code == 0, err
    assert len(epochs_without_time(out)[0]) == 3


def test_interrupt_keeps_finished_epochs(tmp_path, tmp_path_factory, tiny_ckpt, capsys, monkeypatch, rnn_straight):
    """Ctrl-C in epoch 2: epoch 1's files stay whole and --resume finishes the run."""
    import train_utils
    argv = mode_argv("rnn", tmp_path_factory, tiny_ckpt) + common(tmp_path)
    out = str(tmp_path / "run")
    real_train_epoch = train_utils.train_epoch
    calls = []

    def interrupted_in_epoch_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_train_epoch(*args, **kwargs)
    monkeypatch.setattr(train_utils, "train_epoch", interrupted_in_epoch_2)
    code, stdout, err = cli(capsys, *argv, "--out-dir", out)
    assert code == 130 and "Traceback" not in err
    assert "interrupted in epoch 2" in err.strip().splitlines()[-1]
    assert len(epochs_without_time(out)[0]) == 1
    load_file(os.path.join(out, "student.safetensors"))  # whole, readable
    monkeypatch.setattr(train_utils, "train_epoch", real_train_epoch)
    run_ok(*argv, "--out-dir", out, "--resume")
    assert_same_run(out, rnn_straight)


def torchrun(argv, cwd):
    """run.py ARGV started under torchrun as 2 gloo processes on the CPU (in cwd, each
    its own); torchrun_stderr waits for them."""
    # hide any GPU so that no rank reaches for cuda:1 on a one-GPU machine
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               os.path.join(PROJECT_ROOT, "run.py"), *map(str, argv)]
    os.makedirs(cwd, exist_ok=True)
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=str(cwd))


def torchrun_stderr(*processes):
    """The stderr of each torchrun, once all have ended (none is left running when
    one of them fails)."""
    results = [(p.communicate(timeout=300)[1], p.returncode) for p in processes]
    for err, code in results:
        assert code == 0, err[-3000:]
    return [err for err, _ in results]


def assert_same_run_up_to_rounding(one, two):
    """Two runs whose sums were added up in another order: the same epochs, metrics
    and weights (the best epoch's, and the last epoch's where a resume state was kept)
    up to rounding; every validation sentence counted once."""
    import torch
    epochs_one, metrics_one = epochs_without_time(one)
    epochs_two, metrics_two = epochs_without_time(two)
    assert len(epochs_one) == len(epochs_two) and metrics_one["best_epoch"] == metrics_two["best_epoch"]
    for a, b in zip(epochs_one, epochs_two):
        assert a["val_n"] == b["val_n"] == 100  # the whole validation subset, each row once
        for key in ("train_loss", "val_loss", "val_acc", "val_mcc", "train_acc"):
            assert b[key] == pytest.approx(a[key], abs=1e-4), key
    weights = [(weights_of(one), weights_of(two))]
    if os.path.exists(os.path.join(one, "resume_state.pt")):
        weights.append(tuple(torch.load(os.path.join(run, "resume_state.pt"), weights_only=True)["trainable"]
                             for run in (one, two)))
    for weights_one, weights_two in weights:
        assert weights_one.keys() == weights_two.keys()
        for key in weights_one:
            torch.testing.assert_close(weights_two[key], weights_one[key], atol=1e-4, rtol=1e-4, msg=key)


def test_two_process_gloo_matches_one_process(tmp_path, tmp_path_factory, tiny_ckpt):
    """Data parallel training under torchrun (2 gloo processes) is the one-process run up
    to rounding. distil (the RNN student trained in full, as rnn is) resumes under 2
    processes a run stopped after epoch 1, with an empty teacher cache: rank 0 runs the
    teacher while rank 1 waits, and neither may wait for the other inside the teacher's
    run. LoRA, one short epoch from the start: DDP over a frozen base with adapters. The
    two torchruns run side by side: most of their time is starting processes."""
    # float32: "up to rounding" is float32's; bf16 autocast (auto on a CPU with AMX) rounds
    # coarsely enough to flip a training prediction between one process and two
    distil = [*mode_argv("distil", tmp_path_factory, tiny_ckpt), "--epochs", "2", "--dtype", "float32",
              *common(tmp_path)]
    cache = tmp_path / "cache"
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    # the kept resume state holds the last epoch's weights (the best epoch may be the first)
    run_ok(*distil, "--teacher-cache", cache, "--out-dir", one, "--keep-resume-state")
    # epoch 1 in one process; epoch 2 resumed in two, with the teacher cache emptied in between
    run_ok(*distil, "--teacher-cache", cache, "--out-dir", two, "--stop-after", "1")
    shutil.rmtree(cache)
    lora = [*mode_argv("LoRA", tmp_path_factory, tiny_ckpt), "--epochs", "1", "--dtype", "float32", *common(tmp_path)]
    run_ok(*lora, "--out-dir", tmp_path / "lora_one")
    distil_two = torchrun([*distil, "--teacher-cache", cache, "--out-dir", two, "--resume", "--keep-resume-state"],
                          tmp_path / "distil_cwd")
    lora_two = torchrun([*lora, "--out-dir", tmp_path / "lora_two"], tmp_path / "lora_cwd")
    err, lora_err = torchrun_stderr(distil_two, lora_two)
    # rank 0 only: the training, validation and synthetic sentences (distil's default --augment)
    assert err.count("running the teacher") == 3 and len(os.listdir(cache)) == 3
    # only rank 0 spoke
    assert err.count("resuming after epoch 1 of 2") == 1 and err.count("epoch 2/2:") == 1
    assert "epoch 1/2:" not in err
    assert_same_run_up_to_rounding(one, two)

    assert lora_err.count("epoch 1/1:") == 1
    assert_same_run_up_to_rounding(str(tmp_path / "lora_one"), str(tmp_path / "lora_two"))


def read_table(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def test_sweep_rows_skipping_and_report(tmp_path, tmp_path_factory, tiny_ckpt, capsys):
    argv = mode_argv("rnn", tmp_path_factory, tiny_ckpt)[:-2] + ["--epochs", "1"] + common(tmp_path)
    tuning = str(tmp_path / "tuning")
    sweep = [*argv, "--out-dir", str(tmp_path / "sweep"), "--tuning-dir", tuning]
    run_ok(*sweep, "--tune", "lr=1e-3,3e-2 bidirectional=true,false")
    rows = read_table(os.path.join(tuning, "rnn.tsv"))
    assert [r["settings"] for r in rows] == ["lr=1e-3 bidirectional=true", "lr=1e-3 bidirectional=false",
                                             "lr=3e-2 bidirectional=true", "lr=3e-2 bidirectional=false"]
    for r in rows:
        with open(os.path.join(r["out_dir"], "metrics.json")) as f:
            metrics = json.load(f)
        best = metrics["epochs"][metrics["best_epoch"] - 1]
        assert float(r["val_mcc"]) == pytest.approx(best["val_mcc"], abs=1e-4)
        assert metrics["args"]["lr"] == float(r["settings"].split()[0].split("=")[1])
        assert metrics["args"]["bidirectional"] == (r["settings"].split()[1] == "bidirectional=true")
    # the same sweep again: nothing new; with another fixed setting: all new
    capsys.readouterr()
    run_ok(*sweep, "--tune", "lr=1e-3,3e-2 bidirectional=true,false")
    assert capsys.readouterr().err.count("skipped") == 4
    assert len(read_table(os.path.join(tuning, "rnn.tsv"))) == 4
    run_ok(*sweep, "--tune", "lr=1e-3", "--rnn-hidden", "16")
    assert len(read_table(os.path.join(tuning, "rnn.tsv"))) == 5

    code, stdout, err = cli(capsys, "tune-report", os.path.join(tuning, "rnn.tsv"),
                            "--plots-dir", str(tmp_path / "plots"))
    assert code == 0, err
    lines = stdout.strip().splitlines()
    assert lines[0].split()[:3] == ["settings", "n", "val_mcc"]
    # five settings, none repeated with another seed: five lines of n = 1, best MCC first
    assert [line.split()[-7] for line in lines[1:]] == ["1"] * 5
    mccs = [float(line.split()[-6]) for line in lines[1:]]
    assert mccs == sorted(mccs, reverse=True)
    assert sorted(mccs) == sorted(float(r["val_mcc"]) for r in read_table(os.path.join(tuning, "rnn.tsv")))
    with open(tmp_path / "plots" / "tune_rnn.png", "rb") as f:
        assert f.read(4) == b"\x89PNG"


def test_bad_sweeps(tmp_path, capsys):
    code, stdout, err = cli(capsys, "rnn", "--tune", "nosuchflag=1,2", "--out-dir", str(tmp_path))
    assert_error(code, stdout, err, "nosuchflag")
    code, stdout, err = cli(capsys, "rnn", "--tune", "lr", "--out-dir", str(tmp_path))
    assert_error(code, stdout, err, "FLAG=V1,V2")
    code, stdout, err = cli(capsys, "tune-report", str(tmp_path / "missing.tsv"))
    assert_error(code, stdout, err, "missing.tsv")
    shutil.rmtree(tmp_path)


def test_resume_with_compile_toggled(tmp_path, tmp_path_factory, tiny_ckpt, monkeypatch, rnn_straight, rnn_stopped):
    """--compile may change between a run and its --resume: the state is saved under the
    model's own parameter names, not the compiled wrapper's (_orig_mod.). Compiled, the
    student steps its RNN over padded batches, the same sums in another order: the
    same run up to rounding."""
    import torch
    real_compile = torch.compile
    # the eager backend: the same wrapper and parameter names as inductor, without its minutes of compiling
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: real_compile(
        model, backend="eager", fullgraph=kwargs.get("fullgraph", False)))
    argv = mode_argv("rnn", tmp_path_factory, tiny_ckpt) + common(tmp_path)
    for first, then in ((["--compile"], []), ([], ["--compile"])):
        if first:
            out = str(tmp_path / "run1")
            run_ok(*argv, "--out-dir", out, "--stop-after", "1", *first)
        else:  # stopped without --compile: the shared run
            out = copy_of(rnn_stopped, tmp_path, "run0")
        run_ok(*argv, "--out-dir", out, "--resume", *then)
    assert_same_run_up_to_rounding(str(tmp_path / "run1"), rnn_straight)
    assert_same_run_up_to_rounding(str(tmp_path / "run0"), rnn_straight)


def test_interrupt_in_the_first_epoch_says_nothing_was_saved(tmp_path, tmp_path_factory, tiny_ckpt, capsys,
                                                              monkeypatch):
    import train_utils

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(train_utils, "train_epoch", interrupted)
    argv = mode_argv("rnn", tmp_path_factory, tiny_ckpt) + common(tmp_path)
    code, stdout, err = cli(capsys, *argv, "--out-dir", tmp_path / "run")
    assert code == 130 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert "before any epoch finished" in last and "1-0" not in last


def test_resume_with_no_other_flags_continues_exactly(tmp_path, tmp_path_factory, tiny_ckpt, capsys):
    """--resume takes the run's settings from its own metrics.json: nothing to retype,
    and the result is the uninterrupted run's. A flag written anew must still agree."""
    argv = mode_argv("distil", tmp_path_factory, tiny_ckpt) + ["--lr", "0.003", "--rnn-type", "gru",
                                                              "--augment", "1", *common(tmp_path)]
    run_ok(*argv, "--out-dir", tmp_path / "straight")
    run_ok(*argv, "--out-dir", tmp_path / "stopped", "--stop-after", "1")
    run_ok("distil", "--out-dir", tmp_path / "stopped", "--resume", "--device", "cpu", *common(tmp_path))
    assert_same_run(str(tmp_path / "stopped"), str(tmp_path / "straight"))
    run_ok(*argv, "--out-dir", tmp_path / "again", "--stop-after", "1")
    code, stdout, err = cli(capsys, "distil", "--out-dir", tmp_path / "again", "--resume", "--lr", "0.01",
                            *common(tmp_path))
    assert_error(code, stdout, err, "--resume", "lr", only_line=False)
