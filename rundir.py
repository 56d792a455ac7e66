"""A training run's directory: its settings, claiming --out-dir, metrics.json (written
after every epoch, read by eval, tune-report and compare) and the run's plot."""
import csv
import json
import os
import platform
import shutil
from dataclasses import dataclass, field
from importlib.metadata import version

import torch

from train_utils import best_epoch, precision_of, precision_parts
from utils import UserError, atomic_write, file_sha256s, info, save_json

# What a run writes into its --out-dir (--overwrite removes these, nothing else)
RUN_FILES = ("metrics.json", "resume_state.pt", "student.safetensors", "student.json", "tokenizer", "adapter",
             "plots")


@dataclass
class RunConfig:
    """How a run is driven and where it writes; none of it changes what is computed."""
    out_dir: str
    plots_dir: str = None          # default OUT/plots
    plot: bool = True              # draw the run's plot when it ends
    resume: bool = False           # continue from OUT/resume_state.pt
    overwrite: bool = False        # replace the run already in out_dir
    stop_after: int = None         # end after this many epochs of this call, resumable
    compile: bool = False          # torch.compile the training forward
    keep_resume_state: bool = False  # keep resume_state.pt once the run completes
    progress: bool = True          # progress bars
    log_dir: str = None            # per-step and per-epoch logs: CSV, and TensorBoard when installed
    settings: dict = field(default_factory=dict)        # the flags as given: metrics.json's "args"
    signature: dict = field(default_factory=dict)       # the settings --resume must find unchanged
    signature_defaults: dict = field(default_factory=dict)  # what a run saved before a setting existed ran as

    @property
    def plots(self):
        return self.plots_dir or os.path.join(self.out_dir, "plots")

    @property
    def metrics_path(self):
        return os.path.join(self.out_dir, "metrics.json")

    @property
    def state_path(self):
        return os.path.join(self.out_dir, "resume_state.pt")


def claim_out_dir(run: RunConfig):
    """Never lose a finished run by accident: an --out-dir holding one is refused
    unless --resume continues it or --overwrite replaces it."""
    if run.resume:
        if os.path.isfile(run.metrics_path) and not os.path.isfile(run.state_path):
            raise UserError(f"--resume: the run in {run.out_dir} is complete (no resume_state.pt); "
                            "to train it again pass --overwrite, or choose another --out-dir")
        if not os.path.isfile(run.state_path):
            raise UserError(f"--resume: {run.out_dir} has nothing to resume (no resume_state.pt); "
                            "drop --resume to start a run there")
        return
    held = [name for name in ("metrics.json", "resume_state.pt") if os.path.exists(os.path.join(run.out_dir, name))]
    if held and not run.overwrite:
        advice = ("--resume to continue it, " if "resume_state.pt" in held else "") + "--overwrite to replace it"
        raise UserError(f"--out-dir {run.out_dir} already holds a run ({held[0]}); pass {advice}, "
                        "or choose another --out-dir")
    for name in RUN_FILES if held else ():
        path = os.path.join(run.out_dir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)


def what_is_kept(run: RunConfig):
    """After a save failed (a full disk): what of the run stays whole and how to go
    on, from the run's own files. Every file is written whole or not at all, and
    the resume state is written last in an epoch, so its epoch is the one resumed."""
    epoch = None
    if os.path.isfile(run.state_path):
        try:
            epoch = torch.load(run.state_path, map_location="cpu", weights_only=True)["epoch"]
        except Exception:  # unreadable: as good as none
            epoch = None
    try:
        with open(run.metrics_path) as f:
            metrics = json.load(f)
        total = metrics["args"]["epochs"]
        finished = len(metrics["epochs"])
    except (OSError, ValueError, KeyError, TypeError):
        total = finished = None
    if total is not None and finished >= total and (epoch is None or epoch >= total):
        return f"every epoch of the run is saved in {run.out_dir}; only this file is missing"
    if epoch:
        return (f"the run in {run.out_dir} is saved up to epoch {epoch}, each file whole: free some space, "
                f"then add --resume to continue after epoch {epoch}")
    again = "run it again with --overwrite" if os.path.isfile(run.metrics_path) else "run it again"
    return f"no epoch was saved in {run.out_dir}: free some space (or pass another --out-dir) and {again}"


def new_record(mode, run: RunConfig, model, device, dtype, data):
    """The parts of metrics.json that describe the run: what, with what, on what."""
    return {"mode": mode, "args": run.settings,
            "params": {"total": sum(p.numel() for p in model.parameters()),
                       "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)},
            "environment": {"seed": run.settings.get("seed"), "device": str(device),
                            "precision": precision_of(device, dtype),
                            "precision_parts": precision_parts(model, device, dtype),
                            "python": platform.python_version(),
                            "torch": torch.__version__, "numpy": version("numpy"),
                            "safetensors": version("safetensors"), "tiktoken": version("tiktoken"),
                            "data_sha256": file_sha256s([split.split.source for split in data])},
            "epochs": [], "best_epoch": None}


def write_metrics(run: RunConfig, record, history):
    record["epochs"] = history
    record["best_epoch"] = best_epoch(history)["epoch"]
    save_json(run.metrics_path, record)


class TrainingLog:
    """--log-dir: every step's loss and learning rate (steps.csv) and every epoch's
    metrics (epochs.csv), and the same as TensorBoard scalars when tensorboard is
    installed (optional: CSV alone otherwise). A resumed run appends; a new one starts
    the files anew."""
    STEP_COLUMNS = ("epoch", "step", "loss", "lr")
    EPOCH_COLUMNS = ("epoch", "train_loss", "train_acc", "train_mcc", "val_loss", "val_acc", "val_mcc",
                     "val_agreement", "seconds")

    def __init__(self, log_dir, steps_per_epoch, resume=False):
        self.dir, self.steps_per_epoch = log_dir, steps_per_epoch
        os.makedirs(log_dir, exist_ok=True)
        for name, columns in (("steps.csv", self.STEP_COLUMNS), ("epochs.csv", self.EPOCH_COLUMNS)):
            path = os.path.join(log_dir, name)
            if not (resume and os.path.isfile(path)):
                with open(path, "w", newline="") as f:
                    csv.writer(f).writerow(columns)
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tensorboard = SummaryWriter(log_dir)
        except ImportError:
            self.tensorboard = None
            info(f"note: tensorboard is not installed; --log-dir {log_dir} gets CSV files only "
                 "(pip install tensorboard for its event files)")

    def _append(self, name, rows):
        with open(os.path.join(self.dir, name), "a", newline="") as f:
            csv.writer(f).writerows(rows)

    def steps(self, epoch, losses, lrs):
        first = (epoch - 1) * self.steps_per_epoch + 1
        rows = [(epoch, first + i, f"{loss:.6g}", f"{lr:.6g}") for i, (loss, lr) in enumerate(zip(losses, lrs))]
        self._append("steps.csv", rows)
        if self.tensorboard is not None:
            for _, step, loss, lr in rows:
                self.tensorboard.add_scalar("train/step_loss", float(loss), step)
                self.tensorboard.add_scalar("train/lr", float(lr), step)

    def epoch(self, record):
        self._append("epochs.csv", [[record.get(c, "") for c in self.EPOCH_COLUMNS]])
        if self.tensorboard is not None:
            for column in self.EPOCH_COLUMNS[1:-1]:
                if column in record:
                    self.tensorboard.add_scalar(column.replace("_", "/", 1), record[column], record["epoch"])
            self.tensorboard.flush()


def read_metrics(run_dir):
    """A run's metrics.json (UserError, naming the fix, when it is missing or unreadable)."""
    path = os.path.join(run_dir, "metrics.json")
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path} is missing; pass a run's --out-dir or a sweep's") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not readable JSON ({e}); the run that wrote it was cut short: "
                        "re-run it with --overwrite") from None


def best_record(metrics):
    """The best epoch's record of a metrics.json (chosen on the validation set, by MCC)."""
    epochs = metrics.get("epochs") if isinstance(metrics, dict) else None
    if not epochs:
        raise UserError("a metrics.json without finished epochs: let the run finish (or --resume it)")
    return best_epoch(epochs)


# ---------------------------------------------------------------------------
# Plots (matplotlib, files only)
# ---------------------------------------------------------------------------

def pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only: no display needed, none opened
    import matplotlib.pyplot as plt
    return plt


def save_figure(plt, fig, path):
    # a constrained layout already fits every label; "tight" would draw the figure a second time
    tight = None if fig.get_layout_engine() else "tight"
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches=tight))
    plt.close(fig)


def epoch_axis(ax, epochs):
    """Whole-number epoch ticks; a single epoch centred with room around it."""
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    if len(set(epochs)) == 1:
        ax.set_xlim(epochs[0] - 1, epochs[0] + 1)


def plot_history(record, path, title):
    """A run's epochs: the training objective and the validation cross-entropy in
    panels of their own (distil's objective is measured on the transfer set against
    the teacher, not comparable to a cross-entropy), accuracy and MCC with the
    teacher's level where there is one, and the kept (best) epoch marked."""
    plt = pyplot()
    history = record["epochs"]
    epochs = [r["epoch"] for r in history]
    best = record["best_epoch"]
    teacher = record.get("teacher") or {}
    objective = "training objective (teacher + labels)" if teacher else "training cross-entropy"
    fig, axes = plt.subplots(1, 4, figsize=(16, 4), layout="constrained")
    axes[0].plot(epochs, [r["train_loss"] for r in history], "o-", color="tab:blue")
    axes[0].set_title(objective)
    axes[1].plot(epochs, [r["val_loss"] for r in history], "s-", color="tab:orange")
    axes[1].set_title("validation cross-entropy")
    for ax, metric, label in zip(axes[2:], ("acc", "mcc"), ("accuracy", "Matthews correlation")):
        ax.plot(epochs, [r[f"train_{metric}"] for r in history], "o-", label="train (real sentences)")
        ax.plot(epochs, [r[f"val_{metric}"] for r in history], "s-", label="validation")
        if teacher.get(f"val_{metric}") is not None:
            ax.axhline(teacher[f"val_{metric}"], color="tab:red", linestyle="--", label="teacher (validation)")
        ax.set_title(label)
    for ax in axes:
        epoch_axis(ax, epochs)
        ax.axvline(best, color="0.5", linestyle=":", label=f"kept: epoch {best}")
        ax.grid(alpha=0.3)
    axes[3].legend(fontsize="small")
    fig.suptitle(title)
    save_figure(plt, fig, path)
