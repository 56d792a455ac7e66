"""Bad input on the command line: every one a one-line `error: ...` (exit status 2)
that names the problem and the fix, found before any work is done; default
commands that write only under runs/ (never into the tracked tree); flags
suggested by meaning; the run directory's lock file gone when a run ends."""
import os
import shutil
import subprocess
import tempfile

import pytest

from cola import STUDENT, assert_error, cli, common, subset_dir
from utils import DirectoryLocked, lock_dir

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A one-run sweep of a small rnn (`--tune seed=0`): (its run's directory, its table)."""
    from cola import run_ok
    tmp = tmp_path_factory.mktemp("sweep")
    run_ok("rnn", *STUDENT, "--epochs", 1, "--data-dir", subset_dir(tmp_path_factory), "--out-dir", tmp / "sweep",
           "--tuning-dir", tmp / "tuning", "--tune", "seed=0", *common(tmp))
    return str(tmp / "sweep" / "seed-0"), str(tmp / "tuning" / "rnn.tsv")


def can_create_in(directory):
    try:
        os.rmdir(tempfile.mkdtemp(dir=directory))
        return True
    except OSError:
        return False


@pytest.fixture
def unwritable(tmp_path):
    """A directory in which nothing can be created: one of mode 555, or, for root
    (whom mode bits do not stop), /proc."""
    directory = tmp_path / "read-only"
    directory.mkdir()
    os.chmod(directory, 0o555)
    try:
        if not can_create_in(directory):
            yield str(directory)
        elif not can_create_in("/proc"):
            yield "/proc"
        else:
            pytest.skip("no directory here refuses new entries")
    finally:
        os.chmod(directory, 0o755)


# ---------------------------------------------------------------------------
# Default commands write under runs/, never into the tracked tree
# ---------------------------------------------------------------------------

def test_default_commands_leave_the_tracked_tree_clean(tmp_path, tmp_path_factory, capsys, monkeypatch):
    """In a fresh copy of the repository, a sweep, tune-report and compare with their
    default directories change no tracked file and add none that git would show."""
    repo = tmp_path / "repo"
    try:
        tracked = subprocess.run(["git", "ls-files", "-z"], cwd=PROJECT_ROOT, capture_output=True, text=True,
                                 check=True).stdout.split("\0")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("needs git and a git checkout of the project")
    for name in filter(None, tracked):
        os.makedirs(repo / os.path.dirname(name), exist_ok=True)
        shutil.copy2(os.path.join(PROJECT_ROOT, name), repo / name)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    for command in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "copy"]):
        subprocess.run(git + command, cwd=repo, check=True, capture_output=True)
    monkeypatch.chdir(repo)

    def git_status():
        return subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True,
                              check=True).stdout

    code, _, err = cli(capsys, "rnn", *STUDENT, "--epochs", 1, "--data-dir", subset_dir(tmp_path_factory),
                       "--no-progress", "--tune", "seed=0")
    assert code == 0, err
    assert git_status() == ""
    assert os.path.isfile(repo / "runs" / "tuning" / "rnn.tsv")
    code, _, err = cli(capsys, "tune-report", os.path.join("runs", "tuning", "rnn.tsv"))
    assert code == 0, err
    assert git_status() == ""
    assert os.path.isfile(repo / "runs" / "tuning" / "tune_rnn.png")  # next to its table
    code, _, err = cli(capsys, "compare", os.path.join("runs", "rnn"), os.path.join("runs", "rnn"))
    assert code == 0, err
    assert git_status() == ""
    assert [name for name in os.listdir(repo / "runs" / "compare") if name.endswith(".png")]


# ---------------------------------------------------------------------------
# Numbers
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["predict", "eval"])
@pytest.mark.parametrize("batch_size", ["0", "-5"])
def test_batch_size_of_predict_and_eval_must_be_positive(sweep, capsys, mode, batch_size):
    extra = ["The cat sat."] if mode == "predict" else []
    code, out, err = cli(capsys, mode, "--checkpoint", sweep[0], "--batch-size", batch_size, *extra)
    assert_error(code, out, err, "--batch-size must be >= 1", batch_size)
    assert out == ""


@pytest.mark.parametrize("value", ["0", "-1"])
def test_stop_after_must_be_positive(tmp_path, capsys, value):
    code, out, err = cli(capsys, "rnn", "--stop-after", value, "--out-dir", tmp_path / "out", *common(tmp_path))
    assert_error(code, out, err, "--stop-after must be >= 1")
    assert not os.path.exists(tmp_path / "out")


def test_resume_with_overwrite_is_refused(tmp_path, capsys):
    code, out, err = cli(capsys, "rnn", "--resume", "--overwrite", "--out-dir", tmp_path / "out", *common(tmp_path))
    assert_error(code, out, err, "--resume", "--overwrite", "pass one of them")
    assert not os.path.exists(tmp_path / "out")


def test_infinite_temperature_is_refused(capsys, tiny_ckpt):
    code, out, err = cli(capsys, "gen", "--weights", tiny_ckpt.path, "--temperature", "inf", "--max-new-tokens", 2)
    assert_error(code, out, err, "--temperature must be > 0 and finite", "--greedy")
    assert out == ""


# ---------------------------------------------------------------------------
# Paths: checked before any work, whichever mode takes them
# ---------------------------------------------------------------------------

def writing_flags(sweep, tmp_path, data):
    """(argv without the flag, the flag, "dir" or "file") for every flag naming a
    place that a mode writes to."""
    run, table = sweep
    train = ["rnn", *STUDENT, "--epochs", 1, "--data-dir", data, "--no-progress"]
    return [
        (train, "--out-dir", "dir"),
        (train + ["--out-dir", tmp_path / "out"], "--plots-dir", "dir"),
        (train + ["--out-dir", tmp_path / "out", "--tune", "seed=0"], "--tuning-dir", "dir"),
        (["distil", "--teacher", tmp_path / "no-teacher", "--data-dir", data, "--out-dir", tmp_path / "out"],
         "--teacher-cache", "dir"),
        (["eval", "--checkpoint", run, "--data-dir", data], "--output", "file"),
        (["tune-report", table], "--plots-dir", "dir"),
        (["compare", run, run], "--plots-dir", "dir"),
    ]


FLAG_IDS = ["out-dir", "plots-dir", "tuning-dir", "teacher-cache", "eval-output", "tune-report", "compare"]


@pytest.mark.parametrize("case", range(len(FLAG_IDS)), ids=FLAG_IDS)
def test_a_path_under_a_file_is_refused_at_once(sweep, tmp_path, tmp_path_factory, capsys, case):
    argv, flag, kind = writing_flags(sweep, tmp_path, subset_dir(tmp_path_factory))[case]
    (tmp_path / "afile").write_text("x")
    path = tmp_path / "afile" / ("results.json" if kind == "file" else "sub")
    code, out, err = cli(capsys, *argv, flag, path)
    assert_error(code, out, err, f"{flag} {path} cannot be created", f"{tmp_path / 'afile'} is a file",
                 f"pass another {flag}")
    assert out == "" and not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("case", range(len(FLAG_IDS)), ids=FLAG_IDS)
def test_a_path_that_cannot_be_created_is_refused_at_once(sweep, tmp_path, tmp_path_factory, capsys, unwritable,
                                                           case):
    argv, flag, kind = writing_flags(sweep, tmp_path, subset_dir(tmp_path_factory))[case]
    path = os.path.join(unwritable, "new", "results.json" if kind == "file" else "sub")
    code, out, err = cli(capsys, *argv, flag, path)
    assert_error(code, out, err, f"{flag} {path} cannot be written", f"{unwritable} is not writable",
                 f"pass another {flag}")
    assert out == "" and not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("case", [0, 1, 2, 3, 5, 6], ids=[FLAG_IDS[i] for i in (0, 1, 2, 3, 5, 6)])
def test_a_directory_flag_naming_a_file_is_refused(sweep, tmp_path, tmp_path_factory, capsys, case):
    argv, flag, _ = writing_flags(sweep, tmp_path, subset_dir(tmp_path_factory))[case]
    (tmp_path / "afile").write_text("x")
    code, out, err = cli(capsys, *argv, flag, tmp_path / "afile")
    assert_error(code, out, err, f"{flag} {tmp_path / 'afile'} is a file; pass a directory")


def test_empty_out_dir(tmp_path, capsys):
    code, out, err = cli(capsys, "rnn", "--out-dir", "", *common(tmp_path))
    assert_error(code, out, err, "--out-dir is empty; pass a directory")


def test_eval_output_that_is_a_directory(sweep, tmp_path, tmp_path_factory, capsys):
    code, out, err = cli(capsys, "eval", "--checkpoint", sweep[0], "--data-dir", subset_dir(tmp_path_factory),
                         "--output", tmp_path)
    assert_error(code, out, err, f"--output {tmp_path} is a directory", "pass a file path")
    assert out == ""


def test_eval_default_output_in_a_read_only_checkpoint(sweep, tmp_path, tmp_path_factory, capsys, monkeypatch):
    """eval writes OUT/eval_<split>.json by default: a checkpoint directory that takes no
    new file is an error before the evaluation, naming --output as the way out."""
    checkpoint = shutil.copytree(sweep[0], tmp_path / "checkpoint")
    real_mkdtemp = tempfile.mkdtemp

    def mkdtemp(*args, dir=None, **kwargs):  # the checkpoint's directory refuses new entries
        if dir is not None and os.path.samefile(dir, checkpoint):
            raise PermissionError(13, "Permission denied")
        return real_mkdtemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    code, out, err = cli(capsys, "eval", "--checkpoint", checkpoint, "--data-dir", subset_dir(tmp_path_factory))
    assert_error(code, out, err, f"--output {os.path.join(checkpoint, 'eval_in.json')} cannot be written",
                 "Permission denied", "pass another --output")
    assert out == ""
    code, out, err = cli(capsys, "eval", "--checkpoint", checkpoint, "--data-dir", subset_dir(tmp_path_factory),
                         "--output", tmp_path / "results.json")
    assert code == 0, err
    assert os.path.isfile(tmp_path / "results.json")


def test_teacher_that_is_a_file(tmp_path, capsys):
    (tmp_path / "model.safetensors").write_text("x")
    code, out, err = cli(capsys, "distil", "--teacher", tmp_path / "model.safetensors", "--data-dir",
                         tmp_path / "nodata", "--out-dir", tmp_path / "out", *common(tmp_path))
    line = assert_error(code, out, err, f"--teacher {tmp_path / 'model.safetensors'} is a file",
                        "pass the teacher's directory")
    assert "does not exist" not in line
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("kind", ["missing", "directory"])
def test_teacher_logits_checked_before_the_data(tmp_path, capsys, kind):
    path = tmp_path / "logits.npy"
    if kind == "directory":
        path.mkdir()
    code, out, err = cli(capsys, "distil", "--teacher-logits", path, "--data-dir", tmp_path / "nodata",
                         "--out-dir", tmp_path / "out", *common(tmp_path))
    assert_error(code, out, err, f"--teacher-logits {path}", "does not exist" if kind == "missing" else "a directory",
                 "pass a .npy file")


@pytest.mark.parametrize("mode", ["rnn", "predict", "eval"])
def test_weights_that_is_a_file(sweep, tmp_path, capsys, mode):
    (tmp_path / "model.safetensors").write_text("x")
    argv = {"rnn": ["rnn", "--init-embeddings", "gpt2", "--out-dir", tmp_path / "out", *common(tmp_path)],
            "predict": ["predict", "--checkpoint", sweep[0], "The cat sat."],
            "eval": ["eval", "--checkpoint", sweep[0]]}[mode]
    code, out, err = cli(capsys, *argv, "--weights", tmp_path / "model.safetensors")
    assert_error(code, out, err, f"--weights {tmp_path / 'model.safetensors'} is a file", "config.json")


@pytest.mark.parametrize("mode", ["rnn", "eval"])
def test_data_dir_that_is_a_file(sweep, tmp_path, capsys, mode):
    (tmp_path / "in_domain_train.tsv").write_text("x")
    argv = ["rnn", "--out-dir", tmp_path / "out", *common(tmp_path)] if mode == "rnn" else \
        ["eval", "--checkpoint", sweep[0]]
    code, out, err = cli(capsys, *argv, "--data-dir", tmp_path / "in_domain_train.tsv")
    assert_error(code, out, err, "--data-dir", "is a file", "pass the directory of the CoLA .tsv files")


# ---------------------------------------------------------------------------
# Flags suggested by meaning; other typos by spelling
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("typed,meant", [
    ("--learning-rate", "--lr"), ("--learning_rate", "--lr"), ("--bs", "--batch-size"),
    ("--num-epochs", "--epochs"), ("--n-epochs", "--epochs"), ("--num_epochs", "--epochs"),
    ("--learning-rat", "--lr"), ("--bs=64", "--batch-size"),
    ("--rnn-tpye", "--rnn-type"), ("--weight-decai", "--weight-decay"),
])
def test_unknown_flag_suggests_the_meant_one(tmp_path, capsys, typed, meant):
    code, out, err = cli(capsys, "rnn", typed, "3", "--out-dir", tmp_path / "out")
    line = assert_error(code, out, err, "unrecognized arguments", typed.replace("_", "-"))
    assert f"did you mean {meant}?" in line


def test_a_flag_is_suggested_by_meaning_only_where_the_mode_has_it(capsys):
    line = assert_error(*cli(capsys, "gen", "--bs", "4"), "unrecognized arguments")
    assert "--batch-size" not in line  # gen has none
    line = assert_error(*cli(capsys, "predict", "--checkpoint", "x", "--bs", "4"), "unrecognized arguments")
    assert "did you mean --batch-size?" in line


def test_a_flag_of_other_modes_is_named_as_theirs_not_suggested_as_itself(capsys):
    line = assert_error(*cli(capsys, "compare", "a", "b", "--no-plots"), "unrecognized arguments")
    assert "--no-plots is a flag of LoRA, distil, rnn, not of compare" in line and "did you mean" not in line
    line = assert_error(*cli(capsys, "gen", "--lora_rank", "3"), "unrecognized arguments")
    assert "--lora-rank is a flag of LoRA, not of gen" in line


# ---------------------------------------------------------------------------
# The run directory's lock
# ---------------------------------------------------------------------------

def test_a_finished_run_leaves_no_lock_file(sweep, tmp_path, tmp_path_factory, capsys):
    assert ".lock" not in os.listdir(sweep[0])
    out = tmp_path / "run"
    code, _, err = cli(capsys, "rnn", *STUDENT, "--epochs", 1, "--data-dir", subset_dir(tmp_path_factory),
                       "--out-dir", out, *common(tmp_path))
    assert code == 0, err
    assert ".lock" not in os.listdir(out) and os.path.isfile(out / "metrics.json")


def test_lock_is_refused_while_held_and_removed_by_its_holder_only(tmp_path):
    directory = tmp_path / "run"
    with lock_dir(str(directory)):
        assert os.path.isfile(directory / ".lock")
        second = lock_dir(str(directory))
        with pytest.raises(DirectoryLocked, match="another run is writing"):
            second.__enter__()
        assert os.path.isfile(directory / ".lock")  # the refused one left the holder's file alone
        (directory / "metrics.json").write_text("{}")
    assert os.listdir(directory) == ["metrics.json"]
    with lock_dir(str(tmp_path / "empty")):
        pass
    assert not os.path.exists(tmp_path / "empty")  # made and left empty: removed
    (tmp_path / "kept").mkdir()
    with lock_dir(str(tmp_path / "kept")):
        pass
    assert os.listdir(tmp_path / "kept") == []  # not made by the lock: kept


def test_lock_taken_on_a_file_its_holder_just_removed_is_taken_again(tmp_path, monkeypatch):
    """The holder removes .lock as it lets go; a run that opened the file just before
    and locks it just after must not hold the lock of a removed file (a third run
    would then take a new .lock beside it): it opens the file again."""
    import fcntl
    directory = tmp_path / "run"
    first = lock_dir(str(directory)).__enter__()
    real_flock, calls = fcntl.flock, []

    def flock(file, operation):
        calls.append(file)
        if len(calls) == 1:  # between the second run's open and its lock, the first one ends
            first.__exit__(None, None, None)
        return real_flock(file, operation)

    monkeypatch.setattr(fcntl, "flock", flock)
    second = lock_dir(str(directory)).__enter__()
    monkeypatch.setattr(fcntl, "flock", real_flock)
    assert len(calls) == 2  # locked the removed file, saw it, locked the new one
    assert os.path.samestat(os.fstat(second.file.fileno()), os.stat(directory / ".lock"))
    with pytest.raises(DirectoryLocked):
        lock_dir(str(directory)).__enter__()
    second.__exit__(None, None, None)
    assert not os.path.exists(directory)


# ---------------------------------------------------------------------------
# A run read back: its own mode, its moved base
# ---------------------------------------------------------------------------

def test_resume_of_another_modes_run_is_refused_before_any_work(sweep, tmp_path, capsys, monkeypatch):
    """distil --resume in an rnn run's directory: refused at once, naming the rnn run,
    before the data or a teacher is read."""
    import modes
    out = shutil.copytree(sweep[0], tmp_path / "rnn-run")
    (out / "resume_state.pt").write_bytes(b"")  # as if interrupted

    def no_work(*args, **kwargs):
        raise AssertionError("read data or a teacher before refusing")
    monkeypatch.setattr(modes, "load_data", no_work)
    monkeypatch.setattr(modes, "load_teacher", no_work)
    code, stdout, err = cli(capsys, "distil", "--out-dir", out, "--resume", *common(tmp_path))
    assert_error(code, stdout, err, f"{out} holds an rnn run", "run.py rnn --out-dir", "--resume")


def test_predict_with_a_moved_base_names_it_and_weights(tmp_path, tmp_path_factory, tiny_ckpt, capsys):
    import json
    from cola import lora_subset_run
    run = shutil.copytree(lora_subset_run(tmp_path_factory, tiny_ckpt.path), tmp_path / "LoRA")
    config_path = run / "adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    moved = str(tmp_path / "moved-away" / "gpt2")
    config_path.write_text(json.dumps({**config, "base_model_name_or_path": moved}))
    code, stdout, err = cli(capsys, "predict", "--checkpoint", run, "--device", "cpu", "A sentence.")
    assert_error(code, stdout, err, moved, "base_model_name_or_path", "--weights")
    code, stdout, err = cli(capsys, "predict", "--checkpoint", run, "--device", "cpu", "--weights", tiny_ckpt.path,
                            "A sentence.")
    assert code == 0 and stdout.endswith("\tA sentence.\n"), err


@pytest.mark.skipif(not os.path.isfile("/proc/self/mounts"), reason="reads the mounts of Linux")
def test_an_out_dir_in_proc_names_the_kernels_file_system(tmp_path, capsys):
    code, out, err = cli(capsys, "rnn", "--out-dir", "/proc/x", *common(tmp_path))
    line = assert_error(code, out, err, "--out-dir /proc/x cannot be written", "the kernel's proc file system",
                        "pass another --out-dir")
    assert "No such file or directory" not in line
