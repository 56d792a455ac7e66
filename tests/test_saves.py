"""Saves that survive: every file is synced before its rename and its directory after;
a full disk is one line saying what of the run is kept, and the run resumes; a run
ended by SIGTERM leaves no empty directory behind."""
import errno
import json
import os
import stat

import pytest
from safetensors.torch import load_file

from cola import STUDENT, assert_error, cli, common, run_ok, subset_dir


def rnn_argv(tmp_path_factory, tmp_path, epochs=3):
    return ["rnn", "--data-dir", subset_dir(tmp_path_factory), "--device", "cpu", *STUDENT, "--epochs", str(epochs),
            "--batch-size", "32", *common(tmp_path)]


def epochs_of(out_dir):
    with open(os.path.join(out_dir, "metrics.json")) as f:
        return [{k: v for k, v in e.items() if k != "seconds"} for e in json.load(f)["epochs"]]


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names a file descriptor's file by /proc/self/fd")
def test_atomic_write_syncs_the_file_before_the_rename_and_the_directory_after(tmp_path, monkeypatch):
    import utils
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        kind = "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
        events.append(("fsync", kind, os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        return real_replace(src, dst)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    path = tmp_path / "metrics.json"
    utils.save_json(str(path), {"epochs": [1]})
    assert json.loads(path.read_text()) == {"epochs": [1]}
    assert [(e[0], e[1] if e[0] == "fsync" else None) for e in events] == \
        [("fsync", "file"), ("replace", None), ("fsync", "dir")]
    (_, _, synced), (_, tmp, final), (_, _, directory) = events
    assert synced == tmp and final == str(path)  # the temporary file, synced before it became path
    assert directory == str(tmp_path)


def test_a_library_error_carrying_the_os_reason_becomes_a_save_error(tmp_path, monkeypatch):
    """safetensors reports a full disk as its own error with "(os error 28)" inside,
    torch.save as a RuntimeError that statvfs explains."""
    import utils

    def write(tmp):
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
    with pytest.raises(utils.SaveError) as raised:
        utils.atomic_write(str(tmp_path / "student.safetensors"), write)
    assert str(tmp_path / "student.safetensors") in str(raised.value)
    assert "No space left on device" in str(raised.value)
    assert os.listdir(tmp_path) == []  # the temporary file removed

    def torch_save(tmp):  # torch.save into a path, on a full disk, says only where it stopped
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    class Full:
        f_bavail = 0
    with monkeypatch.context() as patch, pytest.raises(utils.SaveError, match="No space left on device"):
        patch.setattr(os, "statvfs", lambda directory: Full())
        utils.atomic_write(str(tmp_path / "resume_state.pt"), torch_save)
    with pytest.raises(RuntimeError, match="unexpected pos"):  # with room on the disk it stays what it was
        utils.atomic_write(str(tmp_path / "resume_state.pt"), torch_save)

    def bug(tmp):
        raise TypeError("not a write failure")
    with pytest.raises(TypeError):  # a bug stays a bug
        utils.atomic_write(str(tmp_path / "x.json"), bug)


def test_a_tokenizer_that_cannot_be_written_is_a_save_error(tmp_path):
    from checkpoints import HFTokens
    from utils import SaveError

    class FullDisk:
        def __len__(self):
            return 10
        pad_token_id = unk_token_id = eos_token_id = mask_token = unk_token = None

        def save_pretrained(self, directory):
            with open(os.path.join(directory, "tokenizer.json"), "w") as f:
                f.write("{")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    with pytest.raises(SaveError) as raised:
        HFTokens(FullDisk()).save(str(tmp_path))
    assert f"{tmp_path}/tokenizer" in str(raised.value) and "No space left on device" in str(raised.value)
    assert os.listdir(tmp_path) == []  # nothing half-written left beside the run


def full_disk_after_epoch_1(monkeypatch, out):
    """os.fsync of any file fails with ENOSPC once epoch 1's resume state is written:
    the disk fills up in epoch 2 (directories still sync: their entries are made)."""
    real_fsync = os.fsync

    def fsync(fd):
        if os.path.isfile(os.path.join(out, "resume_state.pt")) and stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)
    monkeypatch.setattr(os, "fsync", fsync)


def test_a_full_disk_in_epoch_2_is_one_line_keeps_epoch_1_and_resumes(tmp_path, tmp_path_factory, capsys,
                                                                      monkeypatch):
    import torch
    argv = rnn_argv(tmp_path_factory, tmp_path)
    out = str(tmp_path / "run")
    with monkeypatch.context() as patch:
        full_disk_after_epoch_1(patch, out)
        code, stdout, err = cli(capsys, *argv, "--out-dir", out)
    line = assert_error(code, stdout, err, "No space left on device", f"cannot save {out}/", "up to epoch 1",
                        "--resume", only_line=False)
    assert "Traceback" not in err and line.count("error:") == 1
    # epoch 1's files, each whole; no temporary file left
    assert len(epochs_of(out)) == 1
    load_file(os.path.join(out, "student.safetensors"))
    assert torch.load(os.path.join(out, "resume_state.pt"), weights_only=True)["epoch"] == 1
    assert not [name for name in os.listdir(out) if name.endswith(".tmp")]
    # room again: --resume finishes it, as a run that never stopped
    run_ok(*argv, "--out-dir", out, "--resume")
    run_ok(*argv, "--out-dir", tmp_path / "straight")
    assert epochs_of(out) == epochs_of(tmp_path / "straight")
    resumed, straight = load_file(os.path.join(out, "student.safetensors")), \
        load_file(tmp_path / "straight" / "student.safetensors")
    assert resumed.keys() == straight.keys() and all(resumed[k].equal(straight[k]) for k in resumed)


def test_a_full_disk_in_the_first_epoch_says_nothing_was_saved(tmp_path, tmp_path_factory, capsys, monkeypatch):
    def no_room(fd):
        if stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "fsync", no_room)
    out = str(tmp_path / "run")
    code, stdout, err = cli(capsys, *rnn_argv(tmp_path_factory, tmp_path, epochs=1), "--out-dir", out)
    assert_error(code, stdout, err, "No space left on device", "no epoch was saved", only_line=False)


def test_a_log_that_cannot_be_appended_to_is_one_line(tmp_path, tmp_path_factory, capsys, monkeypatch):
    """--log-dir's CSV files are appended to, not renamed in: their OSError is one line too."""
    import rundir
    out = str(tmp_path / "run")

    def full(self, name, rows):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.path.join(self.dir, name))
    monkeypatch.setattr(rundir.TrainingLog, "_append", full)
    code, stdout, err = cli(capsys, *rnn_argv(tmp_path_factory, tmp_path, epochs=1), "--out-dir", out,
                            "--log-dir", tmp_path / "logs")
    assert_error(code, stdout, err, "No space left on device", "steps.csv", only_line=False)


def start_run(out, tmp_path):
    """run.py rnn on the full CoLA training set, long enough to be stopped, as its own process."""
    import subprocess
    import sys
    from cola import PROJECT_ROOT, cola_dir
    return subprocess.Popen([sys.executable, os.path.join(PROJECT_ROOT, "run.py"), "rnn", *STUDENT, "--epochs", "50",
                             "--data-dir", cola_dir(), "--device", "cpu", "--out-dir", str(out), *common(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def wait_for(path, process, timeout=120):
    import time
    deadline = time.time() + timeout
    while not os.path.exists(path):
        assert process.poll() is None, process.communicate()
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.01)


def terminated_once(out, tmp_path, when):
    """An rnn run into out sent SIGTERM once the file when exists: it ends as Ctrl-C
    does, with one line and exit status 130."""
    import signal
    process = start_run(out, tmp_path)
    wait_for(when, process)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("error: interrupted")


def test_sigterm_before_any_epoch_leaves_no_directory(tmp_path):
    """Killed (SIGTERM) as it starts: as Ctrl-C, one line, and the directory it made,
    holding only its .lock, removed."""
    out = tmp_path / "run"
    terminated_once(out, tmp_path, out / ".lock")
    assert not os.path.exists(out)


def test_sigterm_after_an_epoch_keeps_it_and_the_lock_goes(tmp_path):
    out = tmp_path / "run"
    terminated_once(out, tmp_path, out / "resume_state.pt")
    assert ".lock" not in os.listdir(out) and len(epochs_of(out)) >= 1
    load_file(out / "student.safetensors")


def test_a_plot_that_cannot_be_saved_says_every_epoch_is_kept(tmp_path, tmp_path_factory, capsys, monkeypatch):
    """The plot comes after the last epoch: a full disk then loses nothing but the plot."""
    import matplotlib.figure

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full)
    out = str(tmp_path / "run")
    code, stdout, err = cli(capsys, *[a for a in rnn_argv(tmp_path_factory, tmp_path, epochs=1) if a != "--no-plots"],
                            "--out-dir", out)
    assert_error(code, stdout, err, "No space left on device", f"cannot save {tmp_path / 'plots'}",
                 "every epoch of the run is saved", only_line=False)
    assert len(epochs_of(out)) == 1 and not os.path.exists(os.path.join(out, "resume_state.pt"))


def test_the_suite_removes_the_temporary_files_of_passing_tests(request):
    """A passing test's tmp_path goes when it ends; of failing runs, only the last is kept."""
    assert request.config.getini("tmp_path_retention_policy") == "failed"
    assert int(request.config.getini("tmp_path_retention_count")) == 1


def test_a_directory_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """atomic_dir (exports, the fine-tuning reference's model): a full disk halfway
    through leaves the directory there before whole, no temporary one beside it,
    and one SaveError; a finished one replaces it, its files synced first."""
    import utils
    target = tmp_path / "export"
    target.mkdir()
    (target / "old.txt").write_text("old")

    def half_then_full(tmp):
        with open(os.path.join(tmp, "a.txt"), "w") as f:
            f.write("a")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    with pytest.raises(utils.SaveError, match="No space left on device"):
        utils.atomic_dir(str(target), half_then_full)
    assert sorted(os.listdir(tmp_path)) == ["export"] and os.listdir(target) == ["old.txt"]
    synced = []
    real_sync = utils.sync
    monkeypatch.setattr(utils, "sync", lambda path: (synced.append(os.path.basename(path)), real_sync(path))[1])
    utils.atomic_dir(str(target), lambda tmp: open(os.path.join(tmp, "new.txt"), "w").close())
    assert os.listdir(target) == ["new.txt"] and sorted(os.listdir(tmp_path)) == ["export"]
    assert synced[0] == "new.txt" and synced[-1] == os.path.basename(tmp_path)  # the file first, the parent last
