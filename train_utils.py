"""One training loop and one evaluation loop for LoRA, rnn and distil (the modes
differ in their loss and trainable parameters only), plus metrics, the
distillation loss, plots and atomic checkpoint files."""
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

from utils import barrier, gather, info, world


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
    """alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, labels)
    (Hinton et al. 2015). The T^2 keeps the soft term's gradients on the same
    scale whatever the temperature. kind="mse" matches logits instead (Tang et
    al. 2019, "Distilling task-specific knowledge from BERT into simple networks")."""
    hard = F.cross_entropy(student_logits, labels)
    if alpha == 0:
        return hard
    if kind == "mse":
        soft = F.mse_loss(student_logits, teacher_logits)
    else:
        soft = F.kl_div(F.log_softmax(student_logits / temperature, dim=-1),
                        F.log_softmax(teacher_logits / temperature, dim=-1),
                        reduction="batchmean", log_target=True) * temperature ** 2
    return alpha * soft + (1 - alpha) * hard


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


def autocast_for(device):
    # bf16 autocast on CUDA: same range as fp32, no loss scaling needed
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def make_optimizer(params, cfg: TrainConfig):
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_scheduler(optimizer, total_steps, warmup_ratio):
    """Linear warm-up to the full lr, then linear decay to zero."""
    warmup = int(total_steps * warmup_ratio)

    def factor(step):
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@torch.no_grad()
def evaluate(model, batches, device, loss_fn=cross_entropy_loss):
    """Loss, accuracy, MCC, confusion matrix and per-row logits over batches.
    Under torchrun each rank evaluates its share of the batches and the results
    are gathered, so every sentence counts exactly once."""
    rank, size = world()
    model.eval()
    loss_sum, logits_parts, row_parts, label_parts = 0.0, [], [], []
    for batch in batches[rank::size]:
        batch_on_device = batch.to(device)
        with autocast_for(device):
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
                grad_clip=1.0, bar=None):
    """One pass of optimisation over batches; returns (mean loss, predictions, labels)
    over all the epoch's sentences (gathered from every rank under torchrun)."""
    rank, size = world()
    model.train()
    loss_sum, predictions, labels = 0.0, [], []
    for batch in batches:
        local = batch.shard(rank, size)
        if len(local.labels) == 0:  # fewer sentences than ranks: join in with a zero-weight row
            local, weight = batch.shard(0, size), 0.0
        else:
            # DDP averages gradients over ranks: weigh this rank's mean loss by its share
            # of the global batch so the result is the global batch's mean
            weight = size * len(local.labels) / len(batch.labels)
        batch_on_device = local.to(device)
        with autocast_for(device):
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
            predictions.append(logits.detach().argmax(-1).cpu())
            labels.append(local.labels)
        if bar is not None:
            bar.update()
            bar.set_postfix(loss=f"{loss_value:.4f}")
    parts = gather((loss_sum, predictions, labels))
    labels = torch.cat([t for p in parts for t in p[2]])
    predictions = torch.cat([t for p in parts for t in p[1]])
    return sum(p[0] for p in parts) / len(labels), predictions, labels


def make_training(model, cfg: TrainConfig, batches_per_epoch):
    """(trainable params, optimizer, lr scheduler) for cfg.epochs epochs."""
    # Tiny gradients and Adam's squared averages of them underflow into denormal
    # floats, which x86 CPUs process up to 100x slower; zero is as good here.
    torch.set_flush_denormal(True)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg)
    scheduler = make_scheduler(optimizer, batches_per_epoch * cfg.epochs, cfg.warmup_ratio)
    return params, optimizer, scheduler


class Interrupted(Exception):
    """Training stopped early (Ctrl-C); everything up to the last full epoch is saved."""


def fit(model, train_set, val_set, cfg: TrainConfig, device, loss_fn=cross_entropy_loss,
        on_epoch_end=None, progress=True, state_path=None, resume=False, signature=None, stop_after=None):
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
    trained = model
    if size > 1:
        from torch.nn.parallel import DistributedDataParallel
        trained = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
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
                                                              device, loss_fn, cfg.grad_clip, bar)
        except KeyboardInterrupt:
            raise Interrupted(f"interrupted in epoch {epoch}; epochs 1-{epoch - 1} are saved"
                              + (" and --resume continues from there" if state_path and epoch > 1 else "")) from None
        val = evaluate(model, val_batches, device, loss_fn=cross_entropy_loss)
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
        raise CheckpointError(f"--resume: {path} is corrupt ({str(e).splitlines()[0][:120]}); "
                              "drop --resume to start anew") from None
    saved = state.get("signature") or {}
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


def plot_history(history, path, title):
    """Loss, accuracy and MCC per epoch, train and validation, side by side."""
    plt = _pyplot()
    epochs = [r["epoch"] for r in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, metric, label in zip(axes, ("loss", "acc", "mcc"), ("loss", "accuracy", "Matthews correlation")):
        ax.plot(epochs, [r[f"train_{metric}"] for r in history], "o-", label="train")
        ax.plot(epochs, [r[f"val_{metric}"] for r in history], "s-", label="validation")
        ax.set_xlabel("epoch")
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
        ax.set_xlabel("epoch")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    _save_figure(plt, fig, path)


def plot_tuning(rows, path, title):
    """Validation MCC of every run of a sweep, best on top."""
    plt = _pyplot()
    rows = sorted(rows, key=lambda r: float(r["val_mcc"]))
    fig, ax = plt.subplots(figsize=(8, 0.4 * len(rows) + 1.5))
    ax.barh([r["settings"] for r in rows], [float(r["val_mcc"]) for r in rows], color="tab:blue")
    ax.set_xlabel("best validation MCC")
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
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
        raise CheckpointError(f"{path} is corrupt ({str(e).splitlines()[0][:120]}); "
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
    gpt = GPT.from_pretrained(base)
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


def load_classifier(checkpoint, weights=None):
    """A trained classifier from a run directory of any mode (or an adapter dir).
    Returns (model, description)."""
    if not os.path.isdir(checkpoint):
        raise CheckpointError(f"checkpoint directory {checkpoint} does not exist")
    adapter_dir = find_adapter_dir(checkpoint)
    if adapter_dir is not None:
        model, base = load_lora_classifier(adapter_dir, weights)
        return model, f"GPT-2 + LoRA ({base})"
    if os.path.isfile(os.path.join(checkpoint, "student.json")):
        return load_student(checkpoint), "DistilRNN"
    raise CheckpointError(f"{checkpoint} holds no checkpoint (neither adapter/adapter_config.json from LoRA "
                          "nor student.json from rnn/distil)")


# ---------------------------------------------------------------------------
# Distillation teacher
# ---------------------------------------------------------------------------

class Teacher:
    """The teacher's logits for distil: from a LoRA run (computed once, then cached
    on disk keyed by the teacher checkpoint and the data) or from a .npy file."""

    def __init__(self, checkpoint=None, logits_file=None, weights=None):
        self.checkpoint, self.logits_file, self.weights = checkpoint, logits_file, weights

    def prepare(self, args, data, device):
        """(loss_fn, per-epoch extra metrics, extra metrics.json fields) for fit."""
        train_set, val_set = data
        if self.logits_file is not None:
            train_logits, val_logits = read_logits(self.logits_file, len(train_set)), None
            source = os.path.abspath(self.logits_file)
        else:
            train_logits, val_logits = self.cached_logits(train_set, val_set, device)
            source = os.path.abspath(self.checkpoint)
        teacher_record = {"source": source, "val_acc": None, "val_mcc": None}
        if val_logits is not None:
            teacher_predictions = val_logits.argmax(-1)
            teacher_record["val_acc"] = accuracy(teacher_predictions, val_set.labels)
            teacher_record["val_mcc"] = matthews_corrcoef(teacher_predictions, val_set.labels)
            info(f"teacher on validation: acc {teacher_record['val_acc']:.4f} MCC {teacher_record['val_mcc']:.4f}")
        train_logits = train_logits.to(device)

        def loss_fn(student_logits, batch):
            return distillation_loss(student_logits, train_logits[batch.rows.to(device)], batch.labels,
                                     args.kd_alpha, args.kd_temperature, args.kd_loss)

        def epoch_extra(val):
            if val_logits is None:
                return {}
            return {"val_agreement": accuracy(val["logits"].argmax(-1), teacher_predictions)}

        extra = {"teacher": teacher_record,
                 "distillation": {"alpha": args.kd_alpha, "temperature": args.kd_temperature, "loss": args.kd_loss}}
        return loss_fn, epoch_extra, extra

    def cached_logits(self, train_set, val_set, device):
        if not os.path.isdir(self.checkpoint) or find_adapter_dir(self.checkpoint) is None:
            raise CheckpointError(f"teacher {self.checkpoint} is not a LoRA run directory (no adapter/); "
                                  "train one with `python run.py LoRA` or pass --teacher DIR / --teacher-logits FILE")
        cache_dir = os.path.join(self.checkpoint, "teacher_logits")
        key = self.cache_key()
        paths = {name: os.path.join(cache_dir, f"{name}-{teacher_data_key(key, split)}.npy")
                 for name, split in (("train", train_set), ("val", val_set))}
        logits = {}
        for name, split in (("train", train_set), ("val", val_set)):
            if os.path.isfile(paths[name]):
                try:
                    logits[name] = read_logits(paths[name], len(split))
                    info(f"teacher logits ({name}) from cache {paths[name]}")
                except CheckpointError as e:
                    info(f"warning: {e}; recomputing it")
        missing = [name for name in ("train", "val") if name not in logits]
        if missing:
            model, description = load_classifier(self.checkpoint, self.weights)
            model.to(device)
            for name in missing:
                split = (train_set if name == "train" else val_set).cropped(model.max_len)
                info(f"running the teacher ({description}) over {len(split)} {name} sentences, once")
                logits[name] = evaluate(model, split.batches(128), device)["logits"]
                save_logits(paths[name], logits[name])
            del model
        # older caches of this teacher (other data or an earlier checkpoint) are stale
        for name in os.listdir(cache_dir):
            if name.endswith(".npy") and os.path.join(cache_dir, name) not in paths.values():
                os.remove(os.path.join(cache_dir, name))
        return logits["train"], logits["val"]

    def cache_key(self):
        """Digest of everything the teacher's outputs depend on: its adapter files and
        its base weights (path, size and modification time: hashing GBs each run
        would cost more than the cache saves)."""
        adapter_dir = find_adapter_dir(self.checkpoint)
        digest = hashlib.sha256()
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            path = os.path.join(adapter_dir, name)
            if not os.path.isfile(path):
                raise CheckpointError(f"teacher checkpoint file {path} is missing; re-run LoRA training")
            with open(path, "rb") as f:
                digest.update(f.read())
        base = self.weights or read_json(os.path.join(adapter_dir, "adapter_config.json"),
                                         "a LoRA adapter").get("base_model_name_or_path", "")
        digest.update(str(base).encode())
        if base and os.path.isdir(base):
            for name in sorted(os.listdir(base)):
                stat = os.stat(os.path.join(base, name))
                digest.update(f"{name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        return digest.hexdigest()


def teacher_data_key(teacher_key, split):
    """Cache file key: the teacher's digest plus the split's token ids and labels."""
    digest = hashlib.sha256(teacher_key.encode())
    digest.update(json.dumps(split.tokens).encode())
    digest.update(json.dumps(split.labels.tolist()).encode())
    return digest.hexdigest()[:20]


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
