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
