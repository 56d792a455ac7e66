"""`python bench.py gpu`: the check of the CUDA path that a user with a GPU runs in
one command (about 9 minutes of step timeouts on an H100/H200), writing every figure
into one Markdown report (default runs/gpu-report.md, its data beside it as .json).

The steps run in priority order, each within its own timeout; a step that fails or
times out is recorded (with the tail of its output) and the next one still runs:

    tests       the test suite on this machine (one pytest process per test file, several at once)
    lora        run.py LoRA on a random gpt2-medium-shaped checkpoint: eager in each --dtype,
                then --compile over 5 epochs (per-epoch seconds, compiled shapes)
    bench-lora  bench.py lora on the gpt2 and gpt2-medium shapes (ours and peft in one named precision)
    student     run.py rnn and distil with a tiny random BERT teacher in each --dtype
    gen         bench.py gen (ours against transformers in one precision; batch 1 and 8 samples)
    sync        host syncs per training step of the rnn/distil student and of LoRA, counted
                under torch.cuda.set_sync_debug_mode("warn") (n/a on a CPU)

Every step (gpu_steps.py) runs its commands as subprocesses, so a hung kernel or a
crash costs that step alone. --quick shrinks every step (tiny shapes, a CoLA subset,
few steps) so that `python bench.py gpu --device cpu --quick` runs them all on a
small CPU in under 5 minutes: the check cannot rot where no GPU is at hand.
"""
import argparse
import importlib.metadata
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field

from gpu_steps import PROJECT_ROOT, PYTHON, STEPS, table
from utils import UserError, atomic_write

COLA_FILES = ("in_domain_train.tsv", "in_domain_dev.tsv", "out_of_domain_dev.tsv")
TAIL_CHARS = 3000


# ---------------------------------------------------------------------------
# Running commands within a step's time
# ---------------------------------------------------------------------------

@dataclass
class Command:
    """One subprocess of a step: what ran, how it ended and what it printed."""
    label: str
    argv: list
    status: str = "not run"  # ok | failed | timed out | not run (the step's time was spent)
    returncode: int = None
    seconds: float = 0.0
    output: str = ""

    @property
    def ok(self):
        return self.status == "ok"

    def shown(self):
        return " ".join(_quote(a) for a in self.argv)


def _quote(arg):
    arg = str(arg)
    if arg == PYTHON:
        return "python"
    if arg.startswith(PROJECT_ROOT + os.sep):
        arg = os.path.relpath(arg, PROJECT_ROOT)
    return arg if re.fullmatch(r"[\w@%+=:,./-]+", arg) else "'" + arg.replace("'", "'\\''") + "'"


class Context:
    """What a step's function is handed: the run's settings, a scratch directory, and
    run()/run_all() for its commands, each given what is left of the step's timeout."""

    def __init__(self, device, quick, tmp, data_dir, deadline):
        self.device, self.quick, self.tmp, self.data_dir, self.deadline = device, quick, tmp, data_dir, deadline
        self.commands = []

    def run(self, label, argv):
        return self.run_all([(label, argv)])[0]

    def run_all(self, labelled, jobs=1):
        """Run (label, argv) pairs, up to jobs at a time; a command still running at
        the step's deadline is killed (with its own children) and marked timed out,
        and those not started by then are left "not run"."""
        commands = [Command(label, [str(a) for a in argv]) for label, argv in labelled]
        self.commands.extend(commands)
        waiting, running = list(commands), []
        try:
            while waiting or running:
                while waiting and len(running) < jobs and time.monotonic() < self.deadline:
                    command = waiting.pop(0)
                    log = tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace")
                    process = subprocess.Popen(command.argv, cwd=PROJECT_ROOT, env=child_env(), stdout=log,
                                               stderr=subprocess.STDOUT, start_new_session=True)
                    running.append((command, process, log, time.monotonic()))
                if not running:
                    break  # out of time: the rest stay "not run"
                time.sleep(0.05)
                for entry in list(running):
                    command, process, log, start = entry
                    if process.poll() is None and time.monotonic() < self.deadline:
                        continue
                    timed_out = process.poll() is None
                    end_session(process)  # the session it leads: pytest's or torch's children too
                    command.status = "timed out" if timed_out else "ok" if process.returncode == 0 else "failed"
                    command.returncode, command.seconds = process.returncode, time.monotonic() - start
                    log.seek(0)
                    command.output = log.read()
                    log.close()
                    running.remove(entry)
        finally:  # interrupted (Ctrl-C): what this step started ends with it
            for _, process, log, _ in running:
                end_session(process)
                log.close()
        return commands


def end_session(process):
    """Kill what is left of the process session a command leads (it may have exited,
    leaving children) and reap the command."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):  # no process left in it
        pass
    process.wait()


def child_env():
    env = dict(os.environ)
    for key, value in (("HF_HUB_OFFLINE", "1"), ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
                       ("TRANSFORMERS_VERBOSITY", "error"), ("TOKENIZERS_PARALLELISM", "false")):
        env.setdefault(key, value)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [PROJECT_ROOT, env.get("PYTHONPATH")]))
    return env


# ---------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------

@dataclass
class StepResult:
    name: str
    title: str
    timeout: float
    status: str = "not run"
    seconds: float = 0.0
    commands: list = field(default_factory=list)
    figures: dict = field(default_factory=dict)
    lines: list = field(default_factory=list)
    error: str = ""


def run_step(step, timeout, device, quick, data_dir):
    """One step within its timeout: ok when every command it ran succeeded, timed out
    when one ran out of time, failed when one failed or the step itself raised."""
    result = StepResult(step.name, step.title, timeout)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f"gpu-check-{step.name}-") as tmp:
        ctx = Context(device, quick, tmp, data_dir, start + timeout)
        try:
            result.figures, result.lines = step.run(ctx)
        except Exception:
            result.error = traceback.format_exc()
        result.commands = ctx.commands
    result.seconds = time.monotonic() - start
    statuses = {c.status for c in result.commands}
    if "timed out" in statuses or "not run" in statuses:
        result.status = "timed out"
    elif "failed" in statuses or result.error:
        result.status = "failed"
    else:
        result.status = "ok"
    return result


# ---------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------

def machine(device):
    import torch

    from bench import device_name
    info = {"host": platform.node(), "cpu": device_name(torch.device("cpu")), "cpus": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "gpu": torch.cuda.get_device_name(device if device.startswith("cuda") else 0)
            if torch.cuda.is_available() else "none", "device": device}
    for package in ("transformers", "peft"):
        try:
            info[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            info[package] = "not installed"
    return info


def tail(text, chars=TAIL_CHARS):
    return text if len(text) <= chars else "..." + text[-chars:]


def render(info, results, args, seconds):
    lines = ["# GPU check", "",
             f"`{args.command}`: "
             f"{sum(r.seconds for r in results):.0f} s of steps, {seconds:.0f} s in all.", "",
             "## Machine", "",
             f"- GPU: {info['gpu']}",
             f"- CPU: {info['cpu'].removeprefix('cpu: ')} in this process; {info['cpus']} logical CPUs; "
             f"host {info['host']}",
             f"- torch {info['torch']}, CUDA {info['cuda']}, cuDNN {info['cudnn']}, python {info['python']}, "
             f"transformers {info['transformers']}, peft {info['peft']}", "",
             "## Summary", ""]
    lines += table(["step", "status", "seconds", "timeout", "in short"],
                   [[r.name, r.status, f"{r.seconds:.1f}", f"{r.timeout:.0f}", r.figures.get("headline", "-")]
                    for r in results])
    for r in results:
        lines += ["", f"## {r.name}: {r.title}", "", f"Status: **{r.status}**, {r.seconds:.1f} s of {r.timeout:.0f} s.",
                  ""]
        lines += r.lines
        if r.commands:
            lines += ["", "Commands:", ""]
            lines += table(["command", "status", "s"], [[f"`{c.shown()}`", c.status, f"{c.seconds:.1f}"]
                                                       for c in r.commands])
        for c in r.commands:
            if c.status in ("failed", "timed out"):
                lines += ["", f"Tail of `{c.label}` ({c.status}, exit code {c.returncode}):", "", "```",
                          tail(c.output).rstrip(), "```"]
        if r.error:
            lines += ["", "The step raised:", "", "```", tail(r.error).rstrip(), "```"]
    return "\n".join(lines) + "\n"


def write_text(path, text):
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    atomic_write(path, write)


def write_report(path, info, results, args, seconds):
    write_text(path, render(info, results, args, seconds))
    data = {"machine": info, "args": {k: v for k, v in vars(args).items()},
            "steps": [{"name": r.name, "status": r.status, "seconds": r.seconds, "timeout": r.timeout,
                       "figures": r.figures, "commands": [{"command": c.shown(), "status": c.status,
                                                           "seconds": c.seconds} for c in r.commands]}
                      for r in results]}
    write_text(os.path.splitext(path)[0] + ".json", json.dumps(data, indent=1, default=str) + "\n")


# ---------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------

class CheckError(Exception):
    """A bad flag: reported in one line."""


def step_timeouts(text, steps, quick):
    """Each step's timeout: its own (full or --quick), overridden by --step-timeout,
    either one number for every step or name=seconds pairs ("tests=200,lora=120")."""
    timeouts = {s.name: s.quick_timeout if quick else s.timeout for s in steps}
    if not text:
        return timeouts
    for item in text.split(","):
        name, sep, value = item.strip().rpartition("=")
        try:
            seconds = float(value)
        except ValueError:
            raise CheckError(f"--step-timeout {text}: {value!r} is not a number of seconds; "
                             f"pass e.g. 300 or tests=200,lora=120") from None
        if seconds <= 0:
            raise CheckError(f"--step-timeout {text}: {value} must be over 0 seconds")
        if not sep:
            timeouts = dict.fromkeys(timeouts, seconds)
        elif name in timeouts:
            timeouts[name] = seconds
        else:
            raise CheckError(f"--step-timeout {text}: no step {name!r}; the steps are {', '.join(timeouts)}")
    return timeouts


def chosen_steps(text, steps):
    if not text:
        return list(steps)
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in {s.name for s in steps}]
    if unknown or not names:
        raise CheckError(f"--steps {text}: no step {', '.join(map(repr, unknown)) or 'named'}; "
                         f"pass a comma list of {', '.join(s.name for s in steps)}")
    return [s for s in steps if s.name in names]  # always in priority order


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage and message
        raise CheckError(f"{message} (see python bench.py gpu --help)")


def parse_args(argv):
    p = Parser(prog="bench.py gpu", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--quick", action="store_true", help="tiny shapes, a CoLA subset, few steps: every step in minutes")
    p.add_argument("--report", default=os.path.join("runs", "gpu-report.md"),
                   help="the Markdown report (default runs/gpu-report.md; its data beside it as .json)")
    p.add_argument("--steps", default=None, help=f"comma list of steps to run (default all: "
                                                 f"{','.join(s.name for s in STEPS)})")
    p.add_argument("--step-timeout", default=None,
                   help="seconds: one number for every step, or name=seconds pairs (tests=200,lora=120)")
    p.add_argument("--data-dir", default=os.path.join(PROJECT_ROOT, "data", "cola"), help="real CoLA")
    return p.parse_args(argv)


def main(argv=None, steps=STEPS):
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parse_args(argv)
        args.command = " ".join(["python bench.py gpu", *map(_quote, argv)])
        chosen = chosen_steps(args.steps, steps)
        timeouts = step_timeouts(args.step_timeout, steps, args.quick)
        check_setup(args)
    except CheckError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    start = time.monotonic()
    info = machine(args.device)
    results = []
    for step in chosen:
        print(f"[gpu check] {step.name}: {step.title} (timeout {timeouts[step.name]:.0f} s)", flush=True)
        result = run_step(step, timeouts[step.name], args.device, args.quick, args.data_dir)
        results.append(result)
        print(f"[gpu check] {step.name}: {result.status} in {result.seconds:.1f} s", flush=True)
        try:
            write_report(args.report, info, results, args, time.monotonic() - start)  # a killed check keeps its steps
        except UserError as e:  # a full disk, a read-only folder
            print(f"error: {e}", file=sys.stderr)
            return 2
    print(f"[gpu check] report: {args.report}")
    return 0 if all(r.status == "ok" for r in results) else 1


def check_setup(args):
    import torch
    if args.device not in ("cuda", "cpu") and not re.fullmatch(r"cuda:\d+", args.device):
        raise CheckError(f"--device {args.device}: pass cuda or cpu")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise CheckError("--device cuda but torch sees no CUDA GPU here; pass --device cpu (with --quick)")
    if not all(os.path.isfile(os.path.join(args.data_dir, name)) for name in COLA_FILES):
        raise CheckError(f"--data-dir {args.data_dir} lacks CoLA's {', '.join(COLA_FILES)}; pass the shipped data/cola")
    report_dir = os.path.dirname(os.path.abspath(args.report))
    if os.path.isdir(args.report) or (os.path.exists(report_dir) and not os.path.isdir(report_dir)):
        raise CheckError(f"--report {args.report} cannot be written as a file; pass a file path")


if __name__ == "__main__":
    sys.exit(main())
