"""Training, read top-down: metrics, losses, one training loop and one evaluation
loop for LoRA, rnn and distil (the modes differ in their loss and trainable
parameters only), resumable state, files and plots, checkpoints, the teachers and
their logits cache, a run's directory and metrics.json, and at the end the three
training modes themselves, each a straight line of named steps."""
import hashlib
import json
import math
import os
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from utils import barrier, gather, info, one_line, sha256_of_file, world


# ---------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------

def confusion(predictions, labels):
    """2x2 confusion matrix [[tn, fp], [fn, tp]] as plain ints."""
    predictions, labels = torch.as_tensor(predictions), torch.as_tensor(labels)
    tp = int(((predictions == 1) & (labels == 1)).sum())
    tn = int(((predictions == 0) & (labels == 0)).sum())
    fp = int(((predictions == 1) & (labels == 0)).sum())
    fn = int(((predictions == 0) & (labels == 1)).sum())
    return [[tn, fp], [fn, tp]]


def mcc_from_confusion(matrix):
    """Matthews correlation, CoLA's official metric; 0 when undefined (as sklearn)."""
    (tn, fp), (fn, tp) = matrix
    denominator = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return (tp * tn - fp * fn) / denominator if denominator else 0.0


def matthews_corrcoef(predictions, labels):
    return mcc_from_confusion(confusion(predictions, labels))


def accuracy(predictions, labels):
    predictions, labels = torch.as_tensor(predictions), torch.as_tensor(labels)
    return float((predictions == labels).float().mean()) if len(labels) else 0.0


# ---------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------

def distillation_loss(student_logits, teacher_logits, labels, alpha=0.5, temperature=2.0, kind="kl"):
    """Per row alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, label),
    averaged over the rows (Hinton et al. 2015). The T^2 keeps the soft term's
    gradients on the same scale whatever the temperature. kind="mse" matches logits
    instead (Tang et al. 2019). A row labelled -1 (a synthetic sentence: no gold
    label) gets the teacher term only."""
    if alpha == 0:
        return F.cross_entropy(student_logits, labels)
    hard = F.cross_entropy(student_logits, labels, ignore_index=-1, reduction="none")
    if kind == "mse":
        soft = (student_logits - teacher_logits).pow(2).mean(-1)
    else:
        soft = F.kl_div(F.log_softmax(student_logits / temperature, dim=-1),
                        F.log_softmax(teacher_logits / temperature, dim=-1),
                        reduction="none", log_target=True).sum(-1) * temperature ** 2
    return (alpha * soft + (1 - alpha) * hard).mean()


def cross_entropy_loss(logits, batch):
    return F.cross_entropy(logits, batch.labels)


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------

@dataclass
class TrainConfig:
    epochs: int = 5
    batch_size: int = 128
    lr: float = 1e-3
    optimizer: str = "adamw"       # adam | adamw
    weight_decay: float = 0.01     # adamw only
    warmup_ratio: float = 0.06     # share of all steps spent warming the lr up linearly
    grad_clip: float = 1.0         # max gradient norm; 0 turns clipping off
    seed: int = 0
    embd_weight_decay: float = None  # adamw's weight decay on a student's token embedding; None: weight_decay
    dtype: str = "auto"            # auto | float32 | bfloat16, see uses_bf16


def has_amx():
    """Intel's AMX matrix units: bf16 matrix products at many times the float32 rate."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe and probe())


def uses_bf16(device, dtype="auto", matrix_bound=True):
    """The one precision policy of training, eval, predict, the teacher and gen.
    "float32" and "bfloat16" force one; "auto" is bf16 autocast (float32's range,
    no loss scaling) where it pays: on CUDA, and on a CPU with AMX for work made of
    matrix products (training and classifying batches; not gen's batch-1 decoding,
    which is bound by memory and would cast every weight at every step). A CPU with
    AVX512-BF16 but no AMX stays in float32: on such an Intel Xeon bf16 products ran
    at 0.55x float32's rate and a LoRA epoch took 1.7x as long (README, Benchmarks)."""
    if dtype != "auto":
        return dtype == "bfloat16"
    return device.type == "cuda" or (matrix_bound and device.type == "cpu" and has_amx())


def autocast_for(device, dtype="auto", matrix_bound=True):
    if uses_bf16(device, dtype, matrix_bound):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def store_frozen_in_bf16(model):
    """Under bf16 autocast every product reads its weight in bf16: store the frozen
    GPT-2 weights so once, rather than casting ~85M numbers again at every forward
    (and hold half the bytes). What is trained (adapters, head, LayerNorms with
    --train-layernorm) and its optimizer state stay float32."""
    from model import Linear
    for module in model.modules():
        if isinstance(module, Linear) and not module.weight.requires_grad:
            module.weight.data = module.weight.data.to(torch.bfloat16)


def make_optimizer(named_params, cfg: TrainConfig):
    """Adam or AdamW over (name, parameter) pairs. The fused kernel updates each
    tensor in one pass over memory: the DistilRNN's 50257x768 embedding makes the
    step memory-bound, and the fused step is ~10x faster on CPU than the default."""
    device_type = named_params[0][1].device.type
    fused = dict(fused=True) if device_type in ("cpu", "cuda") else {}
    if cfg.optimizer == "adam":
        return torch.optim.Adam([p for _, p in named_params], lr=cfg.lr, **fused)
    embedding = [p for n, p in named_params if n == "embedding.weight"]
    others = [p for n, p in named_params if n != "embedding.weight"]
    embd_decay = cfg.weight_decay if cfg.embd_weight_decay is None else cfg.embd_weight_decay
    groups = [{"params": others}] + ([{"params": embedding, "weight_decay": embd_decay}] if embedding else [])
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, **fused)


def make_scheduler(optimizer, total_steps, warmup_ratio):
    """Linear warm-up to the full lr, then linear decay to zero."""
    warmup = int(total_steps * warmup_ratio)

    def factor(step):
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@torch.no_grad()
def evaluate(model, batches, device, loss_fn=cross_entropy_loss, dtype="auto"):
    """Loss, accuracy, MCC, confusion matrix and per-row logits over batches.
    Under torchrun each rank evaluates its share of the batches and the results
    are gathered, so every sentence counts exactly once."""
    rank, size = world()
    model.eval()
    torch.set_flush_denormal(True)  # see make_training: an RNN's tiny states would run up to 5x slower
    loss_sum, logits_parts, row_parts, label_parts = 0.0, [], [], []
    for batch in batches[rank::size]:
        batch_on_device = batch.to(device)
        with autocast_for(device, dtype):
            logits = model(batch_on_device.idx, batch_on_device.lengths).float()
        loss_sum += float(loss_fn(logits, batch_on_device)) * len(batch.labels)
        logits_parts.append(logits.cpu())
        row_parts.append(batch.rows)
        label_parts.append(batch.labels)
    parts = gather((loss_sum, logits_parts, row_parts, label_parts))
    loss_sum = sum(p[0] for p in parts)
    logits = torch.cat([t for p in parts for t in p[1]])
    rows = torch.cat([t for p in parts for t in p[2]])
    labels = torch.cat([t for p in parts for t in p[3]])
    order = rows.argsort()  # back to the split's row order
    logits, labels = logits[order], labels[order]
    predictions = logits.argmax(-1)
    matrix = confusion(predictions, labels)
    return {"loss": loss_sum / max(len(labels), 1), "acc": accuracy(predictions, labels),
            "mcc": mcc_from_confusion(matrix), "confusion": matrix, "n": len(labels), "logits": logits}


def train_epoch(model, batches, optimizer, scheduler, params, device, loss_fn=cross_entropy_loss,
                grad_clip=1.0, bar=None, dtype="auto"):
    """One pass of optimisation over batches; returns (mean loss, predictions, labels)
    over all the epoch's sentences (gathered from every rank under torchrun)."""
    rank, size = world()
    model.train()
    loss_sum, rows, predictions, labels = 0.0, 0, [], []
    for batch in batches:
        local = batch.shard(rank, size)
        if len(local.labels) == 0:  # fewer sentences than ranks: join in with a zero-weight row
            local, weight = batch.shard(0, size), 0.0
        else:
            # DDP averages gradients over ranks: weigh this rank's mean loss by its share
            # of the global batch so the result is the global batch's mean
            weight = size * len(local.labels) / len(batch.labels)
        batch_on_device = local.to(device)
        with autocast_for(device, dtype):
            logits = model(batch_on_device.idx, batch_on_device.lengths).float()
        loss = loss_fn(logits, batch_on_device)
        optimizer.zero_grad(set_to_none=True)
        (loss * weight if size > 1 else loss).backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        scheduler.step()
        loss_value = loss.item()
        if weight:
            loss_sum += loss_value * len(local.labels)
            rows += len(local.labels)
            real = local.labels >= 0  # synthetic sentences (label -1) have no accuracy to count
            predictions.append(logits.detach().argmax(-1).cpu()[real])
            labels.append(local.labels[real])
        if bar is not None:
            bar.update()
            bar.set_postfix(loss=f"{loss_value:.4f}")
    parts = gather((loss_sum, rows, predictions, labels))
    predictions = torch.cat([t for p in parts for t in p[2]])
    labels = torch.cat([t for p in parts for t in p[3]])
    return sum(p[0] for p in parts) / sum(p[1] for p in parts), predictions, labels


def make_training(model, cfg: TrainConfig, batches_per_epoch):
    """(trainable params, optimizer, lr scheduler) for cfg.epochs epochs."""
    # Tiny gradients and Adam's squared averages of them underflow into denormal
    # floats, which x86 CPUs process up to 100x slower; zero is as good here.
    torch.set_flush_denormal(True)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    optimizer = make_optimizer(named, cfg)
    scheduler = make_scheduler(optimizer, batches_per_epoch * cfg.epochs, cfg.warmup_ratio)
    return params, optimizer, scheduler


class Interrupted(Exception):
    """Training stopped early (Ctrl-C); everything up to the last full epoch is saved."""


def fit(model, train_set, val_set, cfg: TrainConfig, device, loss_fn=cross_entropy_loss,
        on_epoch_end=None, progress=True, state_path=None, resume=False, signature=None, stop_after=None,
        compile=False):
    """Train the parameters of model that require grad; evaluate on val_set after
    each epoch.

    on_epoch_end(history, is_best, val) runs on rank 0 after every epoch (to save
    metrics and the best weights). With state_path, everything needed to continue
    (trainable weights, optimiser, scheduler, RNG states, history) is saved there
    after each epoch; resume=True continues from it. stop_after=N ends this call
    after N epochs, as if killed there. Returns the epoch records."""
    from tqdm import tqdm
    rank, size = world()
    params, optimizer, scheduler = make_training(model, cfg, math.ceil(len(train_set) / cfg.batch_size))
    generator = torch.Generator().manual_seed(cfg.seed)
    history = []
    if resume:
        history = load_training_state(state_path, model, optimizer, scheduler, generator, signature)
        info(f"resuming after epoch {len(history)} of {cfg.epochs} from {state_path}")
    # model itself keeps its parameter names for the saved state; only the training
    # forward goes through the DDP and compiled wrappers, so --compile may change on --resume
    trained = model
    if size > 1:
        from torch.nn.parallel import DistributedDataParallel
        trained = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if compile:
        # dynamic: CoLA batches vary in length and size; one graph with symbolic shapes
        # instead of a recompilation for every new shape
        trained = torch.compile(trained, dynamic=True)
    val_batches = val_set.batches(cfg.batch_size)
    epochs_this_call = 0
    for epoch in range(len(history) + 1, cfg.epochs + 1):
        if stop_after is not None and epochs_this_call >= stop_after:
            break
        start = time.time()
        batches = train_set.batches(cfg.batch_size, shuffle=True, generator=generator)
        try:
            with tqdm(total=len(batches), desc=f"epoch {epoch}/{cfg.epochs}", leave=False, unit="batch",
                      disable=not progress or rank != 0) as bar:
                train_loss, predictions, labels = train_epoch(trained, batches, optimizer, scheduler, params,
                                                              device, loss_fn, cfg.grad_clip, bar, cfg.dtype)
        except KeyboardInterrupt:
            if epoch == 1:
                raise Interrupted("interrupted in epoch 1, before any epoch finished; nothing was saved") from None
            saved = "epoch 1 is saved" if epoch == 2 else f"epochs 1-{epoch - 1} are saved"
            raise Interrupted(f"interrupted in epoch {epoch}; {saved}"
                              + (" and --resume continues from there" if state_path else "")) from None
        val = evaluate(model, val_batches, device, loss_fn=cross_entropy_loss, dtype=cfg.dtype)
        record = {"epoch": epoch, "train_loss": train_loss, "train_acc": accuracy(predictions, labels),
                  "train_mcc": matthews_corrcoef(predictions, labels), "val_loss": val["loss"],
                  "val_acc": val["acc"], "val_mcc": val["mcc"], "val_n": val["n"], "seconds": time.time() - start}
        is_best = all(val["mcc"] > r["val_mcc"] for r in history)
        history.append(record)
        epochs_this_call += 1
        info(f"epoch {epoch}/{cfg.epochs}: train loss {record['train_loss']:.4f} acc {record['train_acc']:.4f} | "
             f"val loss {val['loss']:.4f} acc {val['acc']:.4f} mcc {val['mcc']:.4f} | "
             f"{record['seconds']:.1f}s{' (best)' if is_best else ''}")
        if rank == 0:
            # a Ctrl-C now must not leave half the epoch's files written
            with defer_interrupts():
                if on_epoch_end is not None:
                    on_epoch_end(history, is_best, val)
                if state_path is not None:
                    save_training_state(state_path, model, optimizer, scheduler, generator, history, signature)
        barrier()
    return history


class defer_interrupts:
    """Hold a Ctrl-C until the block is done, then raise it."""

    def __enter__(self):
        import signal
        self.received = False
        try:
            self.previous = signal.signal(signal.SIGINT, lambda *_: setattr(self, "received", True))
        except ValueError:  # not the main thread: nothing to defer
            self.previous = None
        return self

    def __exit__(self, *exc):
        import signal
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
        if self.received:
            raise Interrupted("interrupted; every finished epoch is saved")
        return False


# ---------------------------------------------------------------------------
# Resumable state
# ---------------------------------------------------------------------------

def save_training_state(path, model, optimizer, scheduler, generator, history, signature):
    import random

    import numpy as np
    numpy_state = np.random.get_state()
    state = {
        "epoch": len(history), "history": history, "signature": signature,
        "trainable": {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad},
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "data_generator": generator.get_state(), "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python_rng": random.getstate(),
        # plain types only, so the file loads with weights_only=True
        "numpy_rng": [numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]],
    }
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_training_state(path, model, optimizer, scheduler, generator, signature):
    """Restore what save_training_state wrote; returns the history so far."""
    import random

    import numpy as np
    if not os.path.isfile(path):
        raise CheckpointError(f"--resume: {path} does not exist; nothing to resume (drop --resume to start anew)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"--resume: {path} is corrupt ({one_line(e)[:120]}); "
                              "drop --resume to start anew") from None
    saved = state.get("signature") or {}
    for key, value in ADDED_SETTINGS.items():  # a run saved before a setting existed ran as its default
        if key in (signature or {}):
            saved.setdefault(key, value)
    changed = sorted(k for k in set(saved) | set(signature or {}) if saved.get(k) != (signature or {}).get(k))
    if changed:
        details = ", ".join(f"{k}: saved {saved.get(k)!r}, now {(signature or {}).get(k)!r}" for k in changed[:4])
        raise CheckpointError(f"--resume: the saved run used other settings ({details}); "
                              "resume with the same settings or start a new --out-dir")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in state["trainable"].items():
            params[name].copy_(tensor)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    generator.set_state(state["data_generator"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    random.setstate(state["python_rng"])
    kind, keys, *rest = state["numpy_rng"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    return state["history"]


def best_epoch(history):
    """The first epoch with the highest validation MCC."""
    return max(history, key=lambda r: (r["val_mcc"], -r["epoch"]))["epoch"]


# ---------------------------------------------------------------------------
# Files: atomic writes, metrics, plots
# ---------------------------------------------------------------------------

def atomic_write(path, write):
    """Call write(tmp_path), then rename onto path: a crash leaves the old file whole."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path), suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make every output private
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_json(path, obj):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
    atomic_write(path, write)


def save_tensors(path, tensors, metadata=None):
    from safetensors.torch import save_file
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only: no display needed, none opened
    import matplotlib.pyplot as plt
    return plt


def _save_figure(plt, fig, path):
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def _epoch_axis(ax, epochs):
    """Whole-number epoch ticks; a single epoch centred with room around it."""
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    if len(set(epochs)) == 1:
        ax.set_xlim(epochs[0] - 1, epochs[0] + 1)


def plot_history(history, path, title):
    """Loss, accuracy and MCC per epoch, train and validation, side by side."""
    plt = _pyplot()
    epochs = [r["epoch"] for r in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, metric, label in zip(axes, ("loss", "acc", "mcc"), ("loss", "accuracy", "Matthews correlation")):
        ax.plot(epochs, [r[f"train_{metric}"] for r in history], "o-", label="train")
        ax.plot(epochs, [r[f"val_{metric}"] for r in history], "s-", label="validation")
        _epoch_axis(ax, epochs)
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    _save_figure(plt, fig, path)


def plot_comparison(runs, path, title):
    """Validation accuracy and MCC per epoch of several runs ({name: history})."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, metric, label in zip(axes, ("val_acc", "val_mcc"), ("validation accuracy", "validation MCC")):
        for name, history in runs.items():
            ax.plot([r["epoch"] for r in history], [r[metric] for r in history], "o-", label=name)
        _epoch_axis(ax, [r["epoch"] for history in runs.values() for r in history])
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    _save_figure(plt, fig, path)


def plot_tuning(rows, path, title):
    """Mean best validation MCC of every setting of a sweep (+- std over seeds), best on top."""
    plt = _pyplot()
    rows = sorted(rows, key=lambda r: r["val_mcc"])
    fig, ax = plt.subplots(figsize=(8, 0.4 * len(rows) + 1.5))
    labels = [f"{r['settings']} (n={r['n']})" for r in rows]
    ax.barh(labels, [r["val_mcc"] for r in rows], xerr=[r["val_mcc_std"] for r in rows], color="tab:blue",
            capsize=3)
    ax.set_xlabel("best validation MCC (mean ± std over seeds)")
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    _save_figure(plt, fig, path)


def plot_compare(seeds, mcc_a, mcc_b, name_a, name_b, teacher_mcc, path):
    """Best validation MCC per seed of two runs, paired seeds joined by a line."""
    plt = _pyplot()
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
    fig.tight_layout()
    _save_figure(plt, fig, path)


# ---------------------------------------------------------------------------
# Classifier checkpoints: LoRA adapters in PEFT's format, students as safetensors
# ---------------------------------------------------------------------------

PEFT_PREFIX = "base_model.model."   # PEFT's name for the wrapped transformers model
LAYERNORMS = ("ln_1", "ln_2", "ln_f")


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt or does not fit the model it is loaded into."""


def trainable_state(model):
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def peft_name(name):
    """Our GPTClassifier parameter name -> the key PEFT saves for the same tensor
    when it wraps transformers.GPT2ForSequenceClassification."""
    name = name.removeprefix("gpt.")
    if name.endswith((".lora_A", ".lora_B")):
        name += ".weight"
    return PEFT_PREFIX + name


def save_lora_adapter(classifier, adapter_dir, base, lora):
    """Write adapter_config.json + adapter_model.safetensors as PEFT does, so that
    peft.PeftModel.from_pretrained(GPT2ForSequenceClassification(base), adapter_dir)
    reproduces our classifier. lora: dict(rank, alpha, dropout, targets, train_layernorm)."""
    tensors = {peft_name(name): p for name, p in trainable_state(classifier).items()}
    save_tensors(os.path.join(adapter_dir, "adapter_model.safetensors"), tensors, metadata={"format": "pt"})
    modules_to_save = ["score"] + (list(LAYERNORMS) if lora["train_layernorm"] else [])
    save_json(os.path.join(adapter_dir, "adapter_config.json"), {
        "peft_type": "LORA", "task_type": "SEQ_CLS", "base_model_name_or_path": base,
        "r": lora["rank"], "lora_alpha": lora["alpha"], "lora_dropout": lora["dropout"],
        "target_modules": list(lora["targets"]), "modules_to_save": modules_to_save,
        # GPT-2's checkpoints store these layers as Conv1D, (in, out)
        "fan_in_fan_out": True, "bias": "none", "init_lora_weights": True, "inference_mode": True,
        "use_rslora": False, "use_dora": False, "rank_pattern": {}, "alpha_pattern": {},
        "layers_to_transform": None, "layers_pattern": None, "revision": None,
    })


def find_adapter_dir(checkpoint):
    for candidate in (os.path.join(checkpoint, "adapter"), checkpoint):
        if os.path.isfile(os.path.join(candidate, "adapter_config.json")):
            return candidate
    return None


def read_json(path, what):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing; is this {what}?") from None
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is corrupt ({e}); re-run training to write it again") from None


def read_tensors(path):
    from safetensors.torch import load_file
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} is missing; re-run training to write it")
    try:
        return load_file(path)
    except Exception as e:
        raise CheckpointError(f"{path} is corrupt ({one_line(e)[:120]}); "
                              "re-run training to write it again") from None


def load_lora_classifier(adapter_dir, weights=None):
    """Rebuild a LoRA classifier from a PEFT adapter dir; the base comes from
    weights (a local directory) or else from the adapter's base_model_name_or_path."""
    from model import GPT, GPTClassifier, add_lora
    config = read_json(os.path.join(adapter_dir, "adapter_config.json"), "a LoRA adapter directory")
    if config.get("peft_type") != "LORA" or config.get("rank_pattern") or config.get("alpha_pattern"):
        raise CheckpointError(f"{adapter_dir}: only plain LoRA adapters (one rank, one alpha) are supported")
    base = weights or config.get("base_model_name_or_path")
    if not base:
        raise CheckpointError(f"{adapter_dir}/adapter_config.json names no base model; pass --weights DIR")
    targets = config.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else list(targets)
    from utils import gpt2_directory
    gpt = GPT.from_pretrained(gpt2_directory(base))
    try:
        add_lora(gpt, targets, rank=int(config["r"]), alpha=float(config["lora_alpha"]))
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{adapter_dir}/adapter_config.json: {e}") from None
    classifier = GPTClassifier(gpt)
    train_layernorm = "ln_1" in (config.get("modules_to_save") or [])
    set_trainable(classifier, train_layernorm)
    tensors = read_tensors(os.path.join(adapter_dir, "adapter_model.safetensors"))
    load_into(classifier, {peft_name(n): n for n in trainable_state(classifier)}, tensors, adapter_dir, base)
    return classifier.eval(), base


def set_trainable(classifier, train_layernorm=False):
    """Only LoRA matrices and the head learn (and, if asked, the LayerNorms)."""
    for name, p in classifier.named_parameters():
        is_layernorm = any(f".{ln}." in name for ln in LAYERNORMS)
        p.requires_grad = ".lora_" in name or name.startswith("score.") or (train_layernorm and is_layernorm)


def load_into(model, key_to_param, tensors, source, base=None):
    """Copy tensors (keyed as saved) into model's parameters, with clear errors."""
    from model import lora_layers
    if any(layer.merged for layer in lora_layers(model)):
        raise CheckpointError(f"cannot load {source} into merged LoRA layers; unmerge them first")
    params = dict(model.named_parameters())
    missing = [k for k in key_to_param if k not in tensors]
    if missing:
        raise CheckpointError(f"{source} lacks {len(missing)} tensor(s) the model needs (first: {missing[0]})")
    with torch.no_grad():
        for key, name in key_to_param.items():
            if tensors[key].shape != params[name].shape:
                hint = f"; it was trained on another base than {base}: pass the --weights it was trained with" \
                    if base else ""
                raise CheckpointError(f"{source}: {key} has shape {tuple(tensors[key].shape)}, the model needs "
                                      f"{tuple(params[name].shape)}{hint}")
            params[name].copy_(tensors[key])


def save_student(student, out_dir, extra=None):
    save_tensors(os.path.join(out_dir, "student.safetensors"), student.state_dict())
    save_json(os.path.join(out_dir, "student.json"), {"kind": "DistilRNN", "config": asdict(student.config),
                                                      **(extra or {})})


def load_student(out_dir):
    from model import DistilRNN, RNNConfig
    settings = read_json(os.path.join(out_dir, "student.json"), "an rnn/distil run directory")
    try:
        student = DistilRNN(RNNConfig.from_dict(settings["config"]))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{out_dir}/student.json is corrupt ({e})") from None
    tensors = read_tensors(os.path.join(out_dir, "student.safetensors"))
    load_into(student, {n: n for n in student.state_dict()}, tensors, os.path.join(out_dir, "student.safetensors"))
    return student.eval()


def load_classifier(checkpoint, weights=None, merge=False):
    """A trained classifier from a run directory of any mode (or an adapter dir).
    merge=True folds LoRA adapters into the base weights: inference at the cost of
    the plain model. Returns (model, description)."""
    if os.path.isfile(checkpoint):
        raise CheckpointError(f"--checkpoint {checkpoint} is a file; pass the run's directory (its --out-dir)")
    if not os.path.isdir(checkpoint):
        raise CheckpointError(f"checkpoint directory {checkpoint} does not exist")
    adapter_dir = find_adapter_dir(checkpoint)
    if adapter_dir is not None:
        model, base = load_lora_classifier(adapter_dir, weights)
        if merge:
            from model import lora_layers
            for layer in lora_layers(model):
                layer.merge()
        return model, f"GPT-2 + LoRA ({base}{', merged' if merge else ''})"
    if os.path.isfile(os.path.join(checkpoint, "student.json")):
        return load_student(checkpoint), "DistilRNN"
    raise CheckpointError(f"{checkpoint} holds no checkpoint (neither adapter/adapter_config.json from LoRA "
                          "nor student.json from rnn/distil)")


# ---------------------------------------------------------------------------
# Distillation teacher
# ---------------------------------------------------------------------------

class DistilLoss:
    """The loss of distil: distillation_loss against the teacher's logits of each
    batch row. Rows of the transfer set past the real sentences are synthetic
    (label -1): they get the teacher term only."""

    def __init__(self, teacher_logits, alpha=0.5, temperature=2.0, kind="kl"):
        self.teacher_logits, self.alpha, self.temperature, self.kind = teacher_logits, alpha, temperature, kind

    def __call__(self, student_logits, batch):
        rows = batch.rows.to(self.teacher_logits.device)
        return distillation_loss(student_logits, self.teacher_logits[rows].to(student_logits.device), batch.labels,
                                 self.alpha, self.temperature, self.kind)


@torch.no_grad()
def predict_logits(model, batches, device, dtype="auto"):
    """Logits of every row of batches, in the split's row order, computed by this
    process alone (no collectives: safe on one rank of several)."""
    model.eval()
    torch.set_flush_denormal(True)  # see make_training: an RNN's tiny states would run up to 5x slower
    logits, rows = [], []
    for batch in batches:
        batch_on_device = batch.to(device)
        with autocast_for(device, dtype):
            logits.append(model(batch_on_device.idx, batch_on_device.lengths).float().cpu())
        rows.append(batch.rows)
    logits, rows = torch.cat(logits), torch.cat(rows)
    return logits[rows.argsort()]


def precision_of(device, dtype="auto"):
    """How a model's outputs are computed on device: part of every teacher cache key,
    and a run's environment.precision in metrics.json."""
    return "bf16-autocast" if uses_bf16(device, dtype) else "float32"


class LoRATeacher:
    """A LoRA run's GPT-2 classifier as the teacher."""
    mask_token = "<|endoftext|>"  # GPT-2 has no mask or unknown token; end-of-text stands in

    def __init__(self, run_dir, weights=None):
        self.directory, self.weights = run_dir, weights
        self.adapter_dir = find_adapter_dir(run_dir)
        self.base = weights or read_json(os.path.join(self.adapter_dir, "adapter_config.json"),
                                         "a LoRA adapter").get("base_model_name_or_path", "")
        self.description = f"GPT-2 + LoRA from {run_dir}"
        self._model = None

    def key(self):
        """Digest of everything the outputs depend on: the adapter files and the base
        weights (its resolved file: for a hub id that names the revision; path, size
        and modification time, since hashing GBs each run would cost more than the
        cache saves)."""
        from model import _checkpoint_files
        from utils import gpt2_directory
        digest = hashlib.sha256()
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            path = os.path.join(self.adapter_dir, name)
            if not os.path.isfile(path):
                raise CheckpointError(f"teacher checkpoint file {path} is missing; re-run LoRA training")
            digest.update(sha256_of_file(path).encode())
        for path in _checkpoint_files(gpt2_directory(self.base)):
            stat = os.stat(path)
            digest.update(f"{os.path.realpath(path)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        return digest.hexdigest()

    def logits(self, texts, device):
        from utils import Split, TokenizedSplit
        if self._model is None:
            self._model, _ = load_lora_classifier(self.adapter_dir, self.weights)
        model = self._model.to(device)
        split = TokenizedSplit(Split(texts, [0] * len(texts), "teacher input"), model.max_len)
        return predict_logits(model, split.batches(128), device)


# files a Hugging Face tokenizer directory may carry its vocabulary in
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model",
                   "tokenizer.model")


class HFTeacher:
    """Any local Hugging Face sequence classifier with 2 labels (BERT, MiniLM,
    RoBERTa, a fine-tuned GPT-2, ...) as the teacher, with its own tokenizer."""

    def __init__(self, directory):
        self.directory = directory
        config = read_json(os.path.join(directory, "config.json"), "a Hugging Face model directory")
        architectures = config.get("architectures") or []
        if not any(a.endswith("ForSequenceClassification") for a in architectures):
            raise CheckpointError(f"teacher {directory} is a {'/'.join(architectures) or 'model'} without a "
                                  "classification head; the teacher must be a LoRA run or a "
                                  "*ForSequenceClassification directory")
        labels = len(config["id2label"]) if "id2label" in config else config.get("num_labels", 2)
        if labels != 2:
            raise CheckpointError(f"teacher {directory} has {labels} labels; CoLA needs a classifier with 2 "
                                  "(label 1 = acceptable)")
        if not any(os.path.isfile(os.path.join(directory, name)) for name in TOKENIZER_FILES):
            raise CheckpointError(f"teacher {directory} has no tokenizer files (one of {', '.join(TOKENIZER_FILES)});"
                                  " save the tokenizer next to the model: tokenizer.save_pretrained(DIR)")
        self.architecture = architectures[0]
        self.description = f"{self.architecture} from {directory}"
        self._tokenizer = self._model = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer
            try:
                self._tokenizer = AutoTokenizer.from_pretrained(self.directory)
            except Exception as e:
                raise CheckpointError(f"teacher {self.directory}: its tokenizer does not load "
                                      f"({one_line(e)})") from None
        return self._tokenizer

    @property
    def mask_token(self):
        return self.tokenizer.mask_token or self.tokenizer.unk_token or ""

    def key(self):
        digest = hashlib.sha256()
        for name in sorted(os.listdir(self.directory)):
            path = os.path.join(self.directory, name)
            if os.path.isfile(path):
                digest.update(f"{name}:{sha256_of_file(path)}".encode())
        return digest.hexdigest()

    @property
    def model(self):
        if self._model is None:
            from transformers import AutoModelForSequenceClassification
            from transformers.utils import logging
            logging.disable_progress_bar()
            try:  # float32 whatever the files hold: float16 matmuls are slow or missing on CPUs
                self._model = AutoModelForSequenceClassification.from_pretrained(self.directory, dtype=torch.float32)
            except Exception as e:
                raise CheckpointError(f"teacher {self.directory} does not load ({one_line(e)})") from None
            if self.tokenizer.pad_token is None:  # GPT-2-style tokenizers: pad with end-of-text, masked anyway
                self.tokenizer.pad_token = self.tokenizer.eos_token
                self._model.config.pad_token_id = self.tokenizer.pad_token_id
        return self._model

    def logits(self, texts, device, batch_size=128):
        tokenizer = self.tokenizer
        model = self.model.to(device).eval()
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # batches of similar length
        out = torch.empty(len(texts), model.config.num_labels)
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                rows = order[start:start + batch_size]
                encoded = tokenizer([texts[i] for i in rows], padding=True, truncation=True, return_tensors="pt")
                with autocast_for(device):
                    out[rows] = model(**encoded.to(device)).logits.float().cpu()
        return out


def load_teacher(directory, weights=None):
    """The teacher in directory: a LoRA run, or a Hugging Face classifier."""
    if not os.path.isdir(directory):
        raise CheckpointError(f"teacher {directory} does not exist; train one with `python run.py LoRA`, or "
                              "pass --teacher DIR (a LoRA run or a Hugging Face classifier) or --teacher-logits FILE")
    if find_adapter_dir(directory) is not None:
        return LoRATeacher(directory, weights)
    if os.path.isfile(os.path.join(directory, "config.json")):
        return HFTeacher(directory)
    raise CheckpointError(f"teacher {directory} is neither a LoRA run (no adapter/) nor a Hugging Face classifier "
                          "(no config.json)")


def teacher_cache_dir(teacher_dir):
    """Where a teacher's logits are cached: next to it, or in the user's cache when
    its directory is read-only (a shared teacher). The mode bits decide, not
    os.access, which says yes to root whatever the bits."""
    import stat
    own = os.path.join(teacher_dir, "teacher_logits")
    if os.access(teacher_dir, os.W_OK) and os.stat(teacher_dir).st_mode & stat.S_IWUSR:
        return own
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    name = hashlib.sha256(os.path.realpath(teacher_dir).encode()).hexdigest()[:16]
    return os.path.join(base, "gpt2-lora-distil", "teacher_logits", name)


def cached_teacher_logits(teacher, texts_by_name, cache_dir, device):
    """{name: logits} of the teacher for each list of texts, computed once and
    cached as cache_dir/<name>-<teacher key>-<input key>.npy. The teacher key
    covers its files and the precision it ran in; the input key the texts, so
    other data or another augmentation get files of their own. Caches of an
    earlier version of this teacher are removed; other splits are kept."""
    teacher_key = hashlib.sha256(f"{teacher.key()}|{precision_of(device)}".encode()).hexdigest()[:16]
    logits, paths = {}, {}
    for name, texts in texts_by_name.items():
        input_key = hashlib.sha256(json.dumps(texts).encode()).hexdigest()[:16]
        paths[name] = os.path.join(cache_dir, f"{name}-{teacher_key}-{input_key}.npy")
        if os.path.isfile(paths[name]):
            try:
                logits[name] = read_logits(paths[name], len(texts))
                info(f"teacher logits ({name}) from cache {paths[name]}")
            except CheckpointError as e:
                info(f"warning: {e}; recomputing it")
    for name, texts in texts_by_name.items():
        if name not in logits:
            info(f"running the teacher ({teacher.description}) over {len(texts)} {name} sentences, once")
            logits[name] = teacher.logits(texts, device)
            save_logits(paths[name], logits[name])
    for name in os.listdir(cache_dir):
        parts = name.split("-")
        if name.endswith(".npy") and len(parts) == 3 and parts[1] != teacher_key:
            os.remove(os.path.join(cache_dir, name))
    return logits


@dataclass
class TeacherTargets:
    """What distil learns from: the transfer set (the training sentences, then the
    synthetic ones), the teacher's logits for each of its rows, the teacher's
    predictions on the validation set (None from a logits file) and its record."""
    transfer: object
    logits: torch.Tensor
    val_predictions: torch.Tensor
    record: dict


def teacher_from_file(path, train_set):
    """--teacher-logits FILE: one row of logits per training sentence, nothing else."""
    return TeacherTargets(train_set, read_logits(path, len(train_set)), None,
                          {"source": os.path.abspath(path), "val_acc": None, "val_mcc": None})


def teacher_targets(teacher, train_set, val_set, device, augment_config, cache_dir=None):
    """Run the teacher (or read its cache) over the training and validation sentences
    and augment_config.copies synthetic sentences per training sentence. Under
    torchrun rank 0 fills the cache, with no collectives inside, and the others read it."""
    from utils import Split, TokenizedSplit, augment, barrier, encode, is_main_process
    synthetic = augment(train_set.split.sentences, augment_config) if augment_config.copies else []
    texts = {"train": train_set.split.sentences, "val": val_set.split.sentences}
    if synthetic:
        texts["augment"] = [s.render(teacher.mask_token) for s in synthetic]
    cache_dir = cache_dir or teacher_cache_dir(teacher.directory)
    start = time.time()
    if is_main_process():
        logits = cached_teacher_logits(teacher, texts, cache_dir, device)
    barrier()
    if not is_main_process():
        logits = cached_teacher_logits(teacher, texts, cache_dir, device)
    val_predictions = logits["val"].argmax(-1)
    record = {"source": os.path.abspath(teacher.directory), "val_acc": accuracy(val_predictions, val_set.labels),
              "val_mcc": matthews_corrcoef(val_predictions, val_set.labels),
              "seconds": time.time() - start}  # for the teacher's logits: seconds when it ran, ~0 from the cache
    info(f"teacher ({teacher.description}) on validation: acc {record['val_acc']:.4f} MCC {record['val_mcc']:.4f}")
    if not synthetic:
        return TeacherTargets(train_set, logits["train"], val_predictions, record)
    # the student reads a masked word as the unknown word; GPT-2 has none, end-of-text stands in
    student_texts = [s.render("<|endoftext|>") for s in synthetic]
    transfer = TokenizedSplit(Split(train_set.split.sentences + student_texts,
                                    train_set.split.labels + [-1] * len(synthetic), train_set.split.source),
                              tokens=train_set.tokens + [encode(text) for text in student_texts])
    info(f"transfer set: {len(train_set)} training sentences + {len(synthetic)} synthetic "
         f"({augment_config.copies} each)")
    return TeacherTargets(transfer, torch.cat([logits["train"], logits["augment"]]), val_predictions, record)


def read_logits(path, rows):
    """A (rows, 2) float array of teacher logits from a .npy file."""
    import numpy as np
    try:
        array = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise CheckpointError(f"teacher logits file {path} does not exist") from None
    except Exception as e:
        raise CheckpointError(f"teacher logits file {path} is not a readable .npy array ({e})") from None
    if array.ndim != 2 or array.shape[1] != 2 or array.shape[0] != rows:
        raise CheckpointError(f"teacher logits {path} have shape {array.shape}, expected ({rows}, 2): "
                              "one row of 2 logits per training sentence, in the training file's order")
    if not np.issubdtype(array.dtype, np.floating) or not np.isfinite(array).all():
        raise CheckpointError(f"teacher logits {path} must be finite floating-point numbers")
    return torch.from_numpy(array.astype(np.float32))


def save_logits(path, logits):
    import numpy as np

    def write(tmp):
        with open(tmp, "wb") as f:
            np.save(f, logits.float().numpy())
    atomic_write(path, write)


# ---------------------------------------------------------------------------
# A training run: its directory, metrics.json, plots
# ---------------------------------------------------------------------------

def train_config(args):
    """The TrainConfig of a training mode's flags."""
    return TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer,
                       weight_decay=args.weight_decay, warmup_ratio=args.warmup_ratio, grad_clip=args.grad_clip,
                       seed=args.seed, embd_weight_decay=getattr(args, "embd_weight_decay", None),
                       dtype=args.dtype)


def run_record(args, model, device, data):
    """The parts of metrics.json that describe the run: what, with what, on what."""
    import platform
    from importlib.metadata import version

    from utils import file_sha256s
    return {"mode": args.mode, "args": {k: v for k, v in vars(args).items() if k != "mode"},
            "params": {"total": sum(p.numel() for p in model.parameters()),
                       "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)},
            "environment": {"seed": args.seed, "device": str(device),
                            "precision": precision_of(device, args.dtype),
                            "python": platform.python_version(),
                            "torch": torch.__version__, "numpy": version("numpy"),
                            "safetensors": version("safetensors"), "tiktoken": version("tiktoken"),
                            "data_sha256": file_sha256s([split.split.source for split in data])},
            "epochs": [], "best_epoch": None}


# Flags that steer a run without changing what it computes: they may differ on --resume.
RUN_CONTROL = ("resume", "stop_after", "no_progress", "device", "out_dir", "plots_dir", "tune", "tuning_dir",
               "compile", "overwrite", "keep_resume_state")
# Settings added to the flags after runs were already being saved, with the value such
# a run behaved as: it resumes under that value instead of being refused as changed.
ADDED_SETTINGS = {"dtype": "auto", "embd_dropout": 0.0, "head_dropout": 0.0, "embd_weight_decay": None}
# What a run writes into its --out-dir (--overwrite removes these, nothing else)
RUN_FILES = ("metrics.json", "resume_state.pt", "student.safetensors", "student.json", "adapter", "plots")


class RunRecorder:
    """After every epoch (rank 0): the best epoch's weights, and metrics.json with
    every epoch so far (and, for distil, how often the student agrees with its teacher)."""

    def __init__(self, args, model, record, teacher_val_predictions=None):
        self.args, self.model, self.record = args, model, record
        self.teacher_val_predictions = teacher_val_predictions

    def epoch_end(self, history, is_best, val):
        if self.teacher_val_predictions is not None:
            history[-1]["val_agreement"] = accuracy(val["logits"].argmax(-1), self.teacher_val_predictions)
        if is_best:
            save_checkpoint(self.model, self.args.out_dir, self.record)
        self.record["epochs"] = history
        self.record["best_epoch"] = best_epoch(history)
        save_json(os.path.join(self.args.out_dir, "metrics.json"), self.record)


def save_checkpoint(model, out_dir, record):
    """A LoRA run keeps its adapter in PEFT's format, rnn and distil their student."""
    if "lora" in record:
        save_lora_adapter(model, os.path.join(out_dir, "adapter"), record["lora"]["base"], record["lora"])
    else:
        save_student(model, out_dir, {"trained_by": record["mode"]})


def train_run(args, model, device, data, record, loss_fn=None, teacher_val_predictions=None):
    """The shared body of every training mode: fit, keep the best epoch's weights,
    write metrics.json (and the resumable state) after every epoch, plot."""
    from utils import is_main_process
    train_set, val_set = data
    params = record["params"]
    if params["trainable"] == params["total"]:
        info(f"parameters: {params['total']:,}, all trained")
    else:
        info(f"parameters: {params['total']:,} total, {params['trainable']:,} trained "
             f"({100 * params['trainable'] / params['total']:.2f}% of them)")
    metrics_path = os.path.join(args.out_dir, "metrics.json")
    recorder = RunRecorder(args, model, record, teacher_val_predictions)
    signature = {k: v for k, v in vars(args).items() if k not in RUN_CONTROL}
    history = fit(model, train_set, val_set, train_config(args), device, loss_fn=loss_fn or cross_entropy_loss,
                  on_epoch_end=recorder.epoch_end, progress=not args.no_progress,
                  state_path=os.path.join(args.out_dir, "resume_state.pt"), resume=args.resume,
                  signature=signature, stop_after=args.stop_after, compile=args.compile)
    if not is_main_process():
        return record
    if len(history) < args.epochs:
        info(f"stopped after epoch {len(history)} of {args.epochs} (--stop-after); continue with --resume")
        return record
    if not args.keep_resume_state:  # only an interrupted run needs it; it is the bulk of a run's bytes
        os.remove(os.path.join(args.out_dir, "resume_state.pt"))
    run_name = os.path.basename(os.path.normpath(args.out_dir))
    plot_path = os.path.join(plots_dir(args), f"{args.mode}_{run_name}.png")
    plot_history(record["epochs"], plot_path, f"{args.mode} ({run_name})")
    best = record["epochs"][record["best_epoch"] - 1]
    info(f"best epoch {best['epoch']}: val acc {best['val_acc']:.4f}, val MCC {best['val_mcc']:.4f}; "
         f"wrote {metrics_path} and {plot_path}")
    return record


def plots_dir(args):
    return args.plots_dir or os.path.join(args.out_dir, "plots")


def claim_out_dir(args):
    """Never lose a finished run by accident: an --out-dir holding one is refused
    unless --resume continues it or --overwrite replaces it."""
    out = args.out_dir
    if args.resume:
        if not os.path.isfile(os.path.join(out, "resume_state.pt")):
            raise CheckpointError(f"--resume: {out} has no resume_state.pt; nothing to resume "
                                  "(drop --resume to start anew)")
        return
    import shutil
    held = [name for name in ("metrics.json", "resume_state.pt") if os.path.exists(os.path.join(out, name))]
    if held and not args.overwrite:
        raise CheckpointError(f"--out-dir {out} already holds a run ({held[0]}); pass --resume to continue it, "
                              "--overwrite to replace it, or another --out-dir")
    for name in RUN_FILES if held else ():
        path = os.path.join(out, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)


def plot_rnn_vs_distil(args):
    """When the rnn and distil runs side by side both exist, compare them in one plot."""
    parent = os.path.dirname(os.path.normpath(args.out_dir))
    runs = {}
    for mode in ("rnn", "distil"):
        path = os.path.join(args.out_dir if mode == args.mode else os.path.join(parent, mode), "metrics.json")
        try:
            with open(path) as f:
                runs[mode] = json.load(f)["epochs"]
        except (OSError, ValueError, KeyError):
            return
    path = os.path.join(plots_dir(args), "rnn_vs_distil.png")
    plot_comparison(runs, path, "DistilRNN: labels only (rnn) vs distilled from its teacher (distil)")
    info(f"wrote {path}")


# ---------------------------------------------------------------------------
# The training modes: LoRA, rnn, distil (their flags checked by run.py)
# ---------------------------------------------------------------------------

def prepare(args):
    """Pick the device (joining torchrun's process group if there is one) and seed
    everything from --seed."""
    from utils import init_distributed, resolve_device, seed_everything, world
    device = init_distributed(args.device) if world()[1] > 1 else resolve_device(args.device)
    seed_everything(args.seed)
    return device


def load_data(args, block_size=1024):
    from utils import TokenizedSplit, load_cola
    train, val = load_cola(args.data_dir, args.val_split)
    info(f"CoLA: {len(train)} training sentences ({train.source}), {len(val)} validation ({val.source})")
    return TokenizedSplit(train, block_size), TokenizedSplit(val, block_size)


def load_gpt(args, device="cpu"):
    from model import GPT, PRESETS
    from utils import UserError, gpt2_directory
    if args.weights:
        source = args.weights
        if not os.path.isdir(source):
            raise UserError(f"--weights {source}: no such directory (expected config.json + model.safetensors)")
    else:
        if args.gpt_variant not in PRESETS:
            raise UserError(f"unknown --gpt-variant {args.gpt_variant!r}; choose from {', '.join(PRESETS)}")
        source = args.gpt_variant
    info(f"loading GPT-2 weights from {source}")
    return GPT.from_pretrained(gpt2_directory(source)).to(device)


def train_lora(args):
    """LoRA: GPT-2 frozen, adapters and a head trained on CoLA's labels."""
    from model import GPTClassifier, add_lora
    from utils import HUB_IDS
    targets = [t.strip() for t in args.lora_targets.split(",") if t.strip()]
    device = prepare(args)
    gpt = load_gpt(args, device="cpu")
    data = load_data(args, gpt.config.block_size)
    add_lora(gpt, targets, args.lora_rank, args.lora_alpha, args.lora_dropout)
    classifier = GPTClassifier(gpt)
    set_trainable(classifier, args.train_layernorm)
    classifier.to(device)
    if uses_bf16(device, args.dtype):
        store_frozen_in_bf16(classifier)
    base = os.path.abspath(args.weights) if args.weights else HUB_IDS[args.gpt_variant]
    record = run_record(args, classifier, device, data)
    record["lora"] = dict(rank=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout, targets=targets,
                          train_layernorm=args.train_layernorm, base=base)
    train_run(args, classifier, device, data, record)


def build_student(args, gpt=None):
    """A fresh DistilRNN, its embeddings optionally initialised from GPT-2's."""
    from model import DistilRNN, RNNConfig
    from utils import VOCAB_SIZE, UserError
    student = DistilRNN(RNNConfig(vocab_size=VOCAB_SIZE, n_embd=args.rnn_embd, rnn_type=args.rnn_type,
                                  n_layers=args.rnn_layers, hidden=args.rnn_hidden,
                                  bidirectional=args.bidirectional, dropout=args.rnn_dropout,
                                  embd_dropout=args.embd_dropout, head_dropout=args.head_dropout))
    if gpt is not None:
        if args.rnn_embd > gpt.config.n_embd:
            raise UserError(f"--rnn-embd {args.rnn_embd} exceeds GPT-2's embedding size "
                            f"{gpt.config.n_embd}; --init-embeddings gpt2 can only shrink it")
        student.init_embeddings(gpt.transformer.wte.weight.detach().t())
    return student


def train_rnn(args):
    """rnn: the DistilRNN trained on the labels alone, the baseline of distil."""
    device = prepare(args)
    data = load_data(args)
    train_student(args, device, data)


def train_student(args, device, data, loss_fn=None, record_extra=None, teacher_val_predictions=None):
    """Build the DistilRNN (seeded right before, so rnn and distil start from the same
    weights and see the same batches whatever the teacher did with the RNG), train it
    and save the best epoch's student."""
    from utils import is_main_process, seed_everything
    gpt = load_gpt(args, device="cpu") if args.init_embeddings == "gpt2" else None
    seed_everything(args.seed)
    student = build_student(args, gpt=gpt).to(device)
    del gpt
    record = run_record(args, student, device, data)
    record.update(record_extra or {})
    record = train_run(args, student, device, data, record, loss_fn, teacher_val_predictions)
    if is_main_process() and len(record["epochs"]) == args.epochs:
        plot_rnn_vs_distil(args)


def augment_config(args):
    from utils import AugmentConfig
    return AugmentConfig(copies=args.augment, mask_prob=args.mask_prob, swap_prob=args.swap_prob,
                         ngram_prob=args.ngram_prob, max_ngram=args.max_ngram, seed=args.seed)


def train_distil(args):
    """distil: the DistilRNN trained on the teacher's logits (and the labels), over
    the training sentences and, with --augment N, N synthetic sentences each."""
    if args.teacher_logits is None and args.teacher is None:
        args.teacher = "runs/LoRA"
    # the teacher before the data: a missing teacher is the quicker mistake to report
    teacher = None if args.teacher_logits else load_teacher(args.teacher, args.weights)
    device = prepare(args)
    train_set, val_set = load_data(args)
    if teacher is None:
        targets = teacher_from_file(args.teacher_logits, train_set)
    else:
        targets = teacher_targets(teacher, train_set, val_set, device, augment_config(args), args.teacher_cache)
    loss_fn = DistilLoss(targets.logits.to(device), args.kd_alpha, args.kd_temperature, args.kd_loss)
    extra = {"teacher": targets.record,
             "distillation": {"alpha": args.kd_alpha, "temperature": args.kd_temperature, "loss": args.kd_loss,
                              "augment": args.augment, "mask_prob": args.mask_prob, "swap_prob": args.swap_prob,
                              "ngram_prob": args.ngram_prob, "max_ngram": args.max_ngram,
                              "transfer_sentences": len(targets.transfer)}}
    train_student(args, device, (targets.transfer, val_set), loss_fn, extra, targets.val_predictions)


def predict(args, sentences):
    """predict: the probability of "acceptable" for each sentence, by the checkpoint
    with its adapters merged, in length-sorted batches."""
    from utils import Split, TokenizedSplit, resolve_device
    device = resolve_device(args.device)
    model, description = load_classifier(args.checkpoint, args.weights, merge=True)
    info(f"classifier: {description}")
    model.to(device)
    tokenized = TokenizedSplit(Split(sentences, [0] * len(sentences), "input"), model.max_len)
    probabilities = predict_logits(model, tokenized.batches(args.batch_size), device, args.dtype).softmax(-1)[:, 1]
    return probabilities.tolist()


def evaluate_checkpoint(args):
    """eval: a checkpoint's loss, accuracy, MCC and confusion on a validation split,
    printed and written as JSON."""
    from utils import TokenizedSplit, load_cola, resolve_device
    device = resolve_device(args.device)
    model, description = load_classifier(args.checkpoint, args.weights)
    model.to(device)
    _, val = load_cola(args.data_dir, args.val_split)
    result = evaluate(model, TokenizedSplit(val, model.max_len).batches(args.batch_size), device, dtype=args.dtype)
    (tn, fp), (fn, tp) = result["confusion"]
    print(f"checkpoint: {args.checkpoint} ({description})")
    print(f"data: {val.source} ({result['n']} sentences)")
    print(f"loss {result['loss']:.4f}  accuracy {result['acc']:.4f}  MCC {result['mcc']:.4f}")
    print("confusion (rows: true label, columns: predicted)")
    print(f"            pred 0  pred 1\ntrue 0  {tn:>8} {fp:>7}\ntrue 1  {fn:>8} {tp:>7}")
    output = args.output or os.path.join(args.checkpoint, f"eval_{args.val_split}.json")
    save_json(output, {"checkpoint": args.checkpoint, "data": val.source, "n": result["n"], "loss": result["loss"],
                       "acc": result["acc"], "mcc": result["mcc"],
                       "confusion": {"tn": tn, "fp": fp, "fn": fn, "tp": tp}})
    info(f"wrote {output}")
