"""Sweeps and comparisons: --tune runs a grid of settings one after another,
tune-report summarises the table (rows that differ only in seed grouped, mean and
std), compare pits two runs or two seed sweeps against each other with paired
statistics. run.py parses; this file does the work."""
import csv
import itertools
import json
import math
import os

from rundir import best_record, pyplot, read_metrics, save_figure
from utils import DirectoryLocked, UserError, info

TUNE_COLUMNS = ("settings", "best_epoch", "val_acc", "val_mcc", "seconds", "out_dir", "fixed")


# ---------------------------------------------------------------------------
# --tune
# ---------------------------------------------------------------------------

def parse_grid(text, mode_parser, run_control):
    """'lr=1e-3,3e-4 lora_rank=4,8' -> [('lr', ['1e-3', '3e-4'], action), ...],
    every name checked against the mode's flags."""
    grid = []
    for item in text.split():
        name, _, values = item.partition("=")
        name = name.strip().lstrip("-").replace("-", "_")
        action = mode_parser._option_string_actions.get("--" + name.replace("_", "-"))
        if not values or action is None or name in run_control:
            raise UserError(f"--tune: {item!r} is not FLAG=V1,V2,... with a training flag of "
                            f"{mode_parser.prog} (e.g. lr=1e-3,3e-4)")
        grid.append((name, [v for v in values.split(",") if v], action))
    if not grid:
        raise UserError('--tune needs at least one FLAG=V1,V2 (e.g. --tune "lr=1e-3,3e-4")')
    return grid


def run_tune(args, argv, parser, runner, run_control):
    """Run every combination of the grid in args.tune with runner(args), one row per
    run appended to TUNING_DIR/<mode>.tsv; combinations already there are skipped."""
    mode_parser = parser._subparsers._group_actions[0].choices[args.mode]
    grid = parse_grid(args.tune, mode_parser, run_control)
    varied = {name for name, _, _ in grid}
    fixed = json.dumps({k: v for k, v in sorted(vars(args).items()) if k not in varied and k not in run_control},
                       sort_keys=True)
    table = os.path.join(args.tuning_dir, f"{args.mode}.tsv")
    base_argv = drop_flag(argv, "--tune")
    for values in itertools.product(*[v for _, v, _ in grid]):
        settings = " ".join(f"{name}={value}" for (name, _, _), value in zip(grid, values))
        # read before every run: another process may share the sweep (rows it finished are skipped here)
        done = {(row["settings"], row["fixed"]) for row in read_table(table)} if os.path.isfile(table) else set()
        if (settings, fixed) in done:
            info(f"tune: {settings} already in {table}, skipped")
            continue
        run_argv = list(base_argv)
        for (name, _, action), value in zip(grid, values):
            run_argv = drop_flag(run_argv, "--" + name)
            if action.nargs == 0:  # a switch: name=true / name=false
                if value.lower() not in ("true", "false", "1", "0"):
                    raise UserError(f"--tune: {name} is a switch; use {name}=true,false")
                run_argv += ["--" + name] if value.lower() in ("true", "1") else []
            else:
                run_argv += ["--" + name, value]
        name = settings.replace(" ", "_").replace("=", "-")
        out_dir = os.path.join(args.out_dir, name)
        run_args = parser.parse_args(drop_flag(run_argv, "--out-dir") + ["--out-dir", out_dir])
        if args.log_dir:  # each run its own logs: one shared steps.csv would be started anew by every run
            run_args.log_dir = os.path.join(args.log_dir, name)
        info(f"tune: {settings} -> {out_dir}")
        try:
            runner(run_args)
        except DirectoryLocked:
            info(f"tune: {settings} is running in another process, skipped")
            continue
        metrics = read_metrics(out_dir)
        best = best_record(metrics)
        append_tsv_row(table, {"settings": settings, "best_epoch": metrics["best_epoch"],
                               "val_acc": f"{best['val_acc']:.4f}", "val_mcc": f"{best['val_mcc']:.4f}",
                               "seconds": f"{sum(r['seconds'] for r in metrics['epochs']):.1f}",
                               "out_dir": out_dir, "fixed": fixed})


def drop_flag(argv, flag):
    """argv without flag (either spelling) and its value."""
    spellings = {flag, flag.replace("-", "_").replace("__", "--", 1)}
    out, skip = [], False
    for i, item in enumerate(argv):
        if skip:
            skip = False
            continue
        name = item.split("=", 1)[0]
        if name in spellings:
            skip = "=" not in item and i + 1 < len(argv) and not argv[i + 1].startswith("--")
            continue
        out.append(item)
    return out


def append_tsv_row(path, row):
    """Append one row (header first if the file is new), flushed to disk at once."""
    new = not os.path.isfile(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=TUNE_COLUMNS, delimiter="\t")
        if new:
            writer.writeheader()
        writer.writerow(row)
        f.flush()
        os.fsync(f.fileno())


def read_table(path):
    try:
        with open(path, newline="") as f:
            return list(csv.DictReader(f, delimiter="\t"))
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None


# ---------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------

# two-sided 95% quantiles of Student's t for 1..30 degrees of freedom
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def mean_std(values):
    """Mean and sample standard deviation (n - 1; 0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def paired_interval(a, b):
    """Mean of the paired differences b - a and its 95% confidence interval
    (Student's t with n - 1 degrees of freedom); None bounds for one pair."""
    differences = [y - x for x, y in zip(a, b)]
    mean, std = mean_std(differences)
    n = len(differences)
    if n < 2:
        return mean, None, None
    half = (T_975[n - 2] if n - 1 <= len(T_975) else 1.960) * std / math.sqrt(n)
    return mean, mean - half, mean + half


# ---------------------------------------------------------------------------
# tune-report
# ---------------------------------------------------------------------------

def without_seed(settings, fixed):
    """A tuning row's settings and fixed settings with the seed taken out."""
    kept = " ".join(item for item in settings.split() if not item.startswith("seed="))
    try:
        fixed = json.loads(fixed)
        fixed.pop("seed", None)
        fixed = json.dumps(fixed, sort_keys=True)
    except (TypeError, ValueError):
        pass
    return kept or "(defaults)", fixed


def distinct_labels(keys):
    """{(settings, fixed): label}: the settings, and where several groups share them,
    the fixed settings in which they differ (e.g. "(defaults) augment=0")."""
    labels = {}
    for settings, fixed in keys:
        twins = [json.loads(f) if f else {} for s, f in keys if s == settings]
        mine = json.loads(fixed) if fixed else {}
        differing = sorted(k for k in set().union(*twins) if len({json.dumps(t.get(k)) for t in twins}) > 1)
        labels[(settings, fixed)] = " ".join([settings] + [f"{k}={mine.get(k)}" for k in differing])
    return labels


def run_tune_report(args):
    """The table of a sweep, rows that differ only in the seed grouped into one line
    with n and mean +- std, best mean validation MCC first; and its plot."""
    rows = read_table(args.table)
    if not rows or not {"settings", "val_mcc", "val_acc"} <= set(rows[0]):
        raise UserError(f"{args.table} is not a tuning table written by --tune (no settings/val_mcc rows)")
    groups = {}
    for line, row in enumerate(rows, start=2):
        try:
            mcc, acc = float(row["val_mcc"]), float(row["val_acc"])
        except (TypeError, ValueError):
            raise UserError(f"{args.table}:{line}: val_mcc / val_acc is not a number") from None
        groups.setdefault(without_seed(row["settings"], row.get("fixed")), []).append((mcc, acc))
    labels = distinct_labels(list(groups))
    summary = []
    for key, values in groups.items():
        settings = labels[key]
        mcc_mean, mcc_std = mean_std([m for m, _ in values])
        acc_mean, acc_std = mean_std([a for _, a in values])
        summary.append({"settings": settings, "n": len(values), "val_mcc": mcc_mean, "val_mcc_std": mcc_std,
                        "val_acc": acc_mean, "val_acc_std": acc_std})
    summary.sort(key=lambda r: -r["val_mcc"])
    width = max(len(r["settings"]) for r in summary)
    print(f"{'settings':<{width}}  {'n':>2}  {'val_mcc (mean ± std)':>20}  {'val_acc (mean ± std)':>20}")
    for r in summary:
        print(f"{r['settings']:<{width}}  {r['n']:>2}  {r['val_mcc']:>11.4f} ± {r['val_mcc_std']:.4f}  "
              f"{r['val_acc']:>11.4f} ± {r['val_acc_std']:.4f}")
    name = os.path.splitext(os.path.basename(args.table))[0]
    path = os.path.join(args.plots_dir, f"tune_{name}.png")
    curve = one_numeric_setting(summary)
    if curve:
        plot_curve(summary, curve, path, f"sweep: {args.table}")
    else:
        plot_tuning(summary, path, f"sweep: {args.table}")
    info(f"wrote {path}")
    return summary


# ---------------------------------------------------------------------------
# compare
# ---------------------------------------------------------------------------

def runs_by_seed(path):
    """{seed: metrics} of a run directory, or of every run in a sweep directory
    (its subdirectories), which must differ in nothing but the seed."""
    if not os.path.isdir(path):
        raise UserError(f"{path} is not a directory; pass a run's --out-dir or a sweep's")
    if os.path.isfile(os.path.join(path, "metrics.json")):
        metrics = [read_metrics(path)]
    else:
        subdirs = sorted(d for d in os.listdir(path) if os.path.isfile(os.path.join(path, d, "metrics.json")))
        if not subdirs:
            raise UserError(f"{path} holds no metrics.json, nor do its subdirectories; pass a run's --out-dir "
                            "or a sweep's")
        metrics = [read_metrics(os.path.join(path, d)) for d in subdirs]
    settings = {json.dumps({k: v for k, v in m["args"].items() if k not in ("seed", "out_dir", "tune")},
                           sort_keys=True) for m in metrics}
    if len(settings) > 1:
        raise UserError(f"the runs in {path} differ in more than the seed; compare two runs or two seed sweeps "
                        "(--tune \"seed=0,1,2,3,4\")")
    out = {}
    for m in metrics:
        if len(m.get("epochs") or []) < m["args"].get("epochs", 0):  # still running, or stopped early
            info(f"compare: {path}: seed {m['args']['seed']} has {len(m.get('epochs') or [])} of "
                 f"{m['args']['epochs']} epochs, left out until it finishes")
            continue
        out[m["args"]["seed"]] = m
    return out


def run_compare(args):
    """Two runs or seed sweeps side by side: per-seed best validation MCC and
    accuracy, the paired difference (B - A) with its 95% interval, each one's share
    of the teacher's MCC; and a plot."""
    name_a, name_b = (os.path.basename(os.path.normpath(p)) for p in (args.run_a, args.run_b))
    if name_a == name_b:
        name_a, name_b = args.run_a, args.run_b
    a, b = runs_by_seed(args.run_a), runs_by_seed(args.run_b)
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise UserError(f"{args.run_a} (seeds {sorted(a)}) and {args.run_b} (seeds {sorted(b)}) share no seed; "
                        "paired statistics need runs with the same seeds")
    best_a = [best_record(a[s]) for s in seeds]
    best_b = [best_record(b[s]) for s in seeds]
    print(f"A = {args.run_a}\nB = {args.run_b}")
    print(f"best validation epoch of each run (chosen by val MCC on the same validation set); "
          f"{len(seeds)} paired seed(s)")
    print(f"{'seed':>6}  {'A mcc':>7}  {'B mcc':>7}  {'B - A':>7}  {'A acc':>7}  {'B acc':>7}")
    for seed, ra, rb in zip(seeds, best_a, best_b):
        print(f"{seed:>6}  {ra['val_mcc']:7.4f}  {rb['val_mcc']:7.4f}  {rb['val_mcc'] - ra['val_mcc']:+7.4f}  "
              f"{ra['val_acc']:7.4f}  {rb['val_acc']:7.4f}")
    result = {"seeds": seeds}
    for metric in ("val_mcc", "val_acc"):
        values_a, values_b = [r[metric] for r in best_a], [r[metric] for r in best_b]
        mean_a, std_a = mean_std(values_a)
        mean_b, std_b = mean_std(values_b)
        diff, low, high = paired_interval(values_a, values_b)
        interval = f"95% CI [{low:+.4f}, {high:+.4f}]" if low is not None else "no interval from one pair"
        if len(seeds) == 1:  # the spread of one value is undefined: no "± 0"
            std_a = std_b = None
            sides = f"A {mean_a:.4f}   B {mean_b:.4f}   (n=1, no std)"
        else:
            sides = f"A {mean_a:.4f} ± {std_a:.4f}   B {mean_b:.4f} ± {std_b:.4f}"
        print(f"{metric}: {sides}   B - A {diff:+.4f}, {interval}")
        result[metric] = {"a": (mean_a, std_a), "b": (mean_b, std_b), "difference": (diff, low, high)}
    differences = student_differences(a[seeds[0]], b[seeds[0]])
    if differences:
        info(f"warning: A and B train different students ({'; '.join(differences)}), so B - A measures that "
             "difference too; to measure distillation alone compare `rnn --teacher X` with `distil --teacher X`")
    teacher_mcc = [m["teacher"]["val_mcc"] for runs in (a, b) for m in runs.values()
                   if (m.get("teacher") or {}).get("val_mcc") is not None]
    if teacher_mcc:
        teacher = teacher_mcc[0]
        share_a, share_b = (result["val_mcc"][k][0] / teacher if teacher else float("nan") for k in ("a", "b"))
        print(f"share of the teacher's validation MCC ({teacher:.4f}): A {share_a:.0%}, B {share_b:.0%}")
        result["teacher_mcc"], result["share"] = teacher, (share_a, share_b)
    path = os.path.join(args.plots_dir, f"compare_{safe_name(name_a)}_vs_{safe_name(name_b)}.png")
    plot_compare(seeds, [r["val_mcc"] for r in best_a], [r["val_mcc"] for r in best_b], name_a, name_b,
                 result.get("teacher_mcc"), path)
    info(f"wrote {path}")
    return result


# ---------------------------------------------------------------------------
# teacher-curve
# ---------------------------------------------------------------------------

def run_teacher_curve(args):
    """The student's best validation MCC against its teacher's: one point per seed
    sweep of distil (one teacher each), mean +- std over its seeds, the share of
    the teacher's MCC and how often the student agrees with its teacher; the
    least-squares slope of the means over the teachers (1: the student gains what
    the teacher gains; 0: it is capped); and a plot."""
    points = []
    for path in args.sweeps:
        runs = runs_by_seed(path)
        if not runs:
            raise UserError(f"{path}: no run has finished all its epochs yet")
        teacher = next(iter(runs.values())).get("teacher") or {}
        if teacher.get("val_mcc") is None:
            raise UserError(f"{path} has no teacher's validation MCC in its metrics.json; teacher-curve takes "
                            "sweeps of distil --teacher DIR (--tune \"seed=0,1,2\")")
        seeds = sorted(runs)
        best = [best_record(runs[s]) for s in seeds]
        mcc = [b["val_mcc"] for b in best]
        mean, std = mean_std(mcc)
        agreement = [b.get("val_agreement") for b in best]  # None for runs that did not record it
        points.append({"sweep": str(path), "teacher": teacher.get("source", "?"), "teacher_mcc": teacher["val_mcc"],
                       "seeds": seeds, "val_mcc": mcc, "mean": mean, "std": std,
                       "share": mean / teacher["val_mcc"] if teacher["val_mcc"] else float("nan"),
                       "agreement": None if None in agreement else mean_std(agreement)[0]})
    points.sort(key=lambda p: p["teacher_mcc"])
    print(f"{'teacher MCC':>11}  {'n':>2}  {'student MCC (mean ± std)':>24}  {'share':>5}  {'agrees':>6}  "
          "sweep (teacher)")
    for p in points:
        agrees = "-" if p["agreement"] is None else f"{p['agreement']:.1%}"
        print(f"{p['teacher_mcc']:11.4f}  {len(p['seeds']):>2}  {p['mean']:13.4f} ± {p['std']:.4f}  "
              f"{p['share']:5.0%}  {agrees:>6}  {p['sweep']} ({p['teacher']})")
    print("agrees: how often the student's best epoch predicts what its teacher predicts on the validation "
          "sentences, mean over the seeds")
    slope = curve_slope([p["teacher_mcc"] for p in points], [p["mean"] for p in points])
    if slope is None:
        print("slope: needs two teachers of different MCC")
    else:
        print(f"slope of the student's mean MCC over the teacher's: {slope:+.2f} (1: it tracks its teacher; "
              "0: it is capped)")
    path = os.path.join(args.plots_dir, "teacher_curve.png")
    plot_teacher_curve(points, path)
    info(f"wrote {path}")
    return {"points": points, "slope": slope}


def curve_slope(x, y):
    """Least-squares slope of y over x; None without two distinct x."""
    if len(set(x)) < 2:
        return None
    mx, my = sum(x) / len(x), sum(y) / len(y)
    return sum((a - mx) * (b - my) for a, b in zip(x, y)) / sum((a - mx) ** 2 for a in x)


# What makes a student: how metrics.json's "student" record and its args name it, and how a warning names it
STUDENT_SETTINGS = (("tokenizer", "student", "vocab_size", "{} tokens"),
                    ("starting vectors", "student", "init_embeddings", "{}"),
                    ("embedding width", "student", "n_embd", "{}"),
                    ("cell", "args", "rnn_type", "{}"),
                    ("hidden width", "args", "rnn_hidden", "{}"),
                    ("layers", "args", "rnn_layers", "{}"),
                    ("bidirectional", "args", "bidirectional", "{}"))


def student_differences(metrics_a, metrics_b):
    """The settings in which the students of two runs differ, each as "name: A x, B y";
    none where either run trained no student (LoRA) or predates the record."""
    if not (metrics_a.get("student") and metrics_b.get("student")):
        return []
    differences = []
    for name, record, key, form in STUDENT_SETTINGS:
        value_a, value_b = ((m.get(record) or {}).get(key) for m in (metrics_a, metrics_b))
        if value_a is not None and value_b is not None and value_a != value_b:
            differences.append(f"{name}: A {form.format(value_a)}, B {form.format(value_b)}")
    return differences


def safe_name(text):
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text).strip("_") or "run"


# ---------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------

def one_numeric_setting(summary):
    """The name of the one setting in which every row differs, when it is a number
    (e.g. augment=1,3,6), else None: such a sweep reads best as a curve."""
    names = set()
    for row in summary:
        name, _, value = row["settings"].partition("=")
        try:  # "lr=1e-3 epochs=1" (two settings) is no number either
            float(value)
        except ValueError:
            return None
        names.add(name)
    return names.pop() if len(names) == 1 and len(summary) > 2 else None


def plot_curve(rows, name, path, title):
    """Mean best validation MCC (+- std over seeds) against the one numeric setting."""
    plt = pyplot()
    rows = sorted(rows, key=lambda r: float(r["settings"].partition("=")[2]))
    x = [float(r["settings"].partition("=")[2]) for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.errorbar(x, [r["val_mcc"] for r in rows], yerr=[r["val_mcc_std"] for r in rows], marker="o", capsize=3)
    for xi, r in zip(x, rows):
        ax.annotate(f"n={r['n']}", (xi, r["val_mcc"]), textcoords="offset points", xytext=(4, -12), fontsize="small")
    ax.set_xlabel(name)
    ax.set_ylabel("best validation MCC (mean ± std over seeds)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    save_figure(plt, fig, path)


def plot_tuning(rows, path, title):
    """Mean best validation MCC of every setting of a sweep (+- std over seeds), best
    on top; the figure grows with the longest setting so no label is clipped."""
    plt = pyplot()
    rows = sorted(rows, key=lambda r: r["val_mcc"])
    labels = [f"{r['settings']} (n={r['n']})" for r in rows]
    width = 5 + 0.09 * max(len(label) for label in labels)
    fig, ax = plt.subplots(figsize=(width, 0.4 * len(rows) + 1.5))
    ax.barh(labels, [r["val_mcc"] for r in rows], xerr=[r["val_mcc_std"] for r in rows], color="tab:blue",
            capsize=3)
    ax.set_xlabel("best validation MCC (mean ± std over seeds)")
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    save_figure(plt, fig, path)


def plot_compare(seeds, mcc_a, mcc_b, name_a, name_b, teacher_mcc, path):
    """Best validation MCC per seed of two runs, paired seeds joined by a line."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 4))
    for x, y in zip(mcc_a, mcc_b):
        ax.plot([0, 1], [x, y], "-", color="0.7", zorder=1)
    ax.scatter([0] * len(mcc_a), mcc_a, label=name_a, zorder=2)
    ax.scatter([1] * len(mcc_b), mcc_b, label=name_b, zorder=2)
    if teacher_mcc is not None:
        ax.axhline(teacher_mcc, color="tab:red", linestyle="--", label="teacher")
    ax.set_xticks([0, 1], [name_a, name_b])
    ax.set_xlim(-0.5, 1.5)
    ax.set_ylabel("best validation MCC")
    ax.set_title(f"{len(seeds)} paired seed(s)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small")
    save_figure(plt, fig, path)


def plot_teacher_curve(points, path):
    """Student MCC (mean +- std over seeds) against the teacher's, with the teacher's
    own line (share 100%) and 80% of it."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    x = [p["teacher_mcc"] for p in points]
    ax.errorbar(x, [p["mean"] for p in points], yerr=[p["std"] for p in points], marker="o", capsize=3,
                linestyle="none", label="student (mean ± std)")
    for p in points:
        name = os.path.basename(os.path.normpath(p["sweep"]))
        ax.annotate(f"{name} (n={len(p['seeds'])})", (p["teacher_mcc"], p["mean"]), textcoords="offset points",
                    xytext=(5, -12), fontsize="small")
    low, high = min(x) - 0.02, max(x) + 0.02
    ax.plot([low, high], [low, high], "--", color="tab:red", label="the teacher (100%)")
    ax.plot([low, high], [0.8 * low, 0.8 * high], ":", color="0.5", label="80% of the teacher")
    ax.set_xlabel("teacher's validation MCC")
    ax.set_ylabel("student's best validation MCC")
    ax.set_title(f"{len(points)} teacher(s)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    save_figure(plt, fig, path)
