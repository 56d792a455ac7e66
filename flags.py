"""The flags' own machinery, for run.py: argparse that reports a bad argument in one
line (with a "did you mean" by meaning, then by spelling), and the check of a
path flag (check_path) that run.py's validators use before any file is read."""
import argparse
import difflib
import os
import re
import sys
import tempfile

from utils import UserError


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line, with a "did you mean" for
    a misspelt mode or flag, and accepts every --dashed-flag also as
    --underscored_flag (e.g. --gpt_variant) without listing it twice in --help."""

    def number(self, flag, default, what=""):
        """A flag of default's type (int or float) whose help ends with the default,
        which comes from the config dataclass that owns it."""
        shown = f"default {default:g}"
        return self.add_argument(flag, type=type(default), default=default,
                                 help=f"{what} ({shown})" if what else shown)

    def parse_known_args(self, args=None, namespace=None):
        if args is not None:
            args = [dashed(a) for a in args]
        self.seen = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message):
        hint = ""
        choice = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if choice:
            options = re.findall(r"[\w-]+", choice.group(2))
            hint = close_match(choice.group(1), options)
        elif message.startswith("unrecognized arguments:"):
            flags = {f for p in self.all_parsers() for f in p._option_string_actions}
            # a flag suggested by meaning must be one of the mode's own
            modes = {name: p for action in self._actions if isinstance(action, argparse._SubParsersAction)
                     for name, p in action.choices.items()}
            mode = modes.get(next(iter(getattr(self, "seen", [])), None))
            aliases = {typed: meant for typed, meant in FLAG_ALIASES.items()
                       if mode is None or meant in mode._option_string_actions}
            own = set(mode._option_string_actions) if mode is not None else flags
            for unknown in message.split(":", 1)[1].split():
                name = dashed(unknown.split("=")[0])
                if not unknown.startswith("--") or hint:
                    continue
                elsewhere = sorted(m for m, p in modes.items() if name in p._option_string_actions)
                if mode is not None and elsewhere:  # a flag of other modes: nothing to correct in its spelling
                    hint = f"; {name} is a flag of {', '.join(elsewhere)}, not of {mode.prog.split()[-1]}"
                else:
                    hint = close_match(name, own, aliases)
        raise UserError(f"{message}{hint} (see python {self.prog} --help)")

    def all_parsers(self):
        yield self
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    yield from sub.all_parsers()


# Flags as other tools spell them, by meaning: spelling alone would suggest another
# flag (--learning-rate -> --rnn-type). Keys as dashed() writes them.
FLAG_ALIASES = {"--learning-rate": "--lr", "--bs": "--batch-size", "--batch": "--batch-size",
                "--num-epochs": "--epochs", "--n-epochs": "--epochs", "--max-epochs": "--epochs"}


def close_match(word, options, aliases=None):
    """"; did you mean X?" for word: its meaning from aliases first (when X is one of
    options), else the closest spelling among options and the aliases (a misspelt
    alias, --learning-rat, means what the alias means); "" when nothing is close."""
    aliases = {typed: meant for typed, meant in (aliases or {}).items() if meant in options}
    word = dashed(word)
    if word in aliases:
        return f"; did you mean {aliases[word]}?"
    best = difflib.get_close_matches(word, [*options, *aliases], n=1, cutoff=0.6)
    return f"; did you mean {aliases.get(best[0], best[0])}?" if best else ""


def dashed(arg):
    """--some_flag[=value] -> --some-flag[=value]: underscores are accepted in flag names."""
    if not arg.startswith("--") or arg == "--":
        return arg
    name, sep, value = arg.partition("=")
    return name.replace("_", "-") + sep + value


def seed_value(text):
    value = int(text)
    if not 0 <= value < 2 ** 32:  # NumPy's seed range
        raise argparse.ArgumentTypeError(f"must be in [0, 2**32), got {value}")
    return value


def check_path(flag, path, kind="dir", exists=False, write=False, what=None):
    """Raise a one-line UserError unless the path given for flag (None: not given)
    will do, checked before any work: a path that exists is a `kind` ("dir" or
    "file"); with exists=True it must exist; with write=True it can be written: the
    directory that must take a new entry (the directory itself, else the parent of
    the file or of what is to be created, else the first ancestor that exists) is a
    directory in which one can be created. That is tried (an empty directory made
    and removed), not judged from mode bits, which do not stop root and do not know
    read-only or virtual file systems."""
    if path is None:
        return
    path = str(path)
    what = what or ("a directory" if kind == "dir" else "a file path")
    if not path.strip():
        raise UserError(f"{flag} is empty; pass {what}")
    if os.path.lexists(path) and not os.path.exists(path):
        raise UserError(f"{flag} {path} is a broken symbolic link; pass {what}")
    if os.path.exists(path):
        if kind == "dir" and not os.path.isdir(path):
            raise UserError(f"{flag} {path} is a file; pass {what}")
        if kind == "file" and not os.path.isfile(path):
            found = "a directory" if os.path.isdir(path) else "not a regular file"
            raise UserError(f"{flag} {path} is {found}; pass {what}")
    elif exists:
        raise UserError(f"{flag} {path} does not exist; pass {what}")
    if not write:
        return
    target = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    while not os.path.lexists(target):
        target = os.path.dirname(target)
    if not os.path.isdir(target):
        found = "a file" if os.path.isfile(target) else "not a directory"
        raise UserError(f"{flag} {path} cannot be created: {target} is {found}; pass another {flag}")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".write-check-", dir=target))
    except OSError as e:
        raise UserError(f"{flag} {path} cannot be written: {target} is not writable ({why_not_writable(target, e)}); "
                        f"pass another {flag}") from None


# File systems of the kernel's own (processes, devices, control groups...), which hold no user files
VIRTUAL_FILE_SYSTEMS = ("proc", "sysfs", "cgroup", "cgroup2", "devpts", "debugfs", "tracefs", "securityfs",
                        "pstore", "bpf", "configfs", "fusectl", "mqueue", "efivarfs", "binfmt_misc")


def mount_of(path):
    """(mount point, file system type, options) of the mount that holds path, from
    /proc/self/mounts; None where there is no such file (not Linux)."""
    try:
        with open("/proc/self/mounts") as f:
            mounts = [line.split() for line in f]
    except OSError:
        return None
    path = os.path.realpath(path)
    best = None
    for fields in mounts:
        if len(fields) < 4:
            continue
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[1])  # "\040" is a space
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= len(best[0])):
            best = (point, fields[2], fields[3].split(","))
    return best


def why_not_writable(directory, error):
    """Why nothing can be created in directory, in words: a virtual or read-only file
    system says so, where the operating system's own reason (ENOENT for /proc) would
    puzzle; anything else is that reason."""
    mount = mount_of(directory)
    if mount is not None:
        point, kind, options = mount
        where = "it is" if os.path.realpath(directory) == point else f"it lies in {point},"
        if kind in VIRTUAL_FILE_SYSTEMS:
            return f"{where} the kernel's {kind} file system, which holds no files"
        if "ro" in options:
            return f"{where} mounted read-only"
    return error.strerror or str(error)


def given_flags(parser, mode, argv):
    """The dests of the flags written on the command line of mode (abbreviations and
    --flag=value included), so that --resume can tell them from defaults."""
    sub = next(p for p in parser.all_parsers() if p is not parser and p.prog.split()[-1] == mode)
    options = sub._option_string_actions
    given = set()
    for token in argv:
        if not token.startswith("--") or token == "--":
            continue
        name = dashed(token).split("=")[0]
        matches = [name] if name in options else [o for o in options if o.startswith(name)]
        if len(matches) == 1:
            given.add(options[matches[0]].dest)
    return given
