"""The modes, each a small function of typed configs (run.py makes them from the
flags). A training mode returns a Task, what the one generic run (`train`, below)
needs: the model, its loss, how its weights are saved and its own metrics.json
fields. Read top-down, a mode is a straight line: mode, train, then fit's loop
(train_utils.py). predict and eval classify with a saved checkpoint."""
import os
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

import torch

import hf_lora
from checkpoints import CheckpointError, load_classifier, load_gpt, save_lora_adapter, save_student
from deploy import is_export
from distil import DistilConfig, DistilLoss, load_teacher, teacher_from_file, teacher_targets
from export import evaluate_export
from hub import HUB_IDS
from model import PRESETS, DistilRNN, GPTClassifier, LoRAConfig, RNNConfig, add_lora, set_trainable, \
    store_frozen_in_bf16
from rundir import RunConfig, TrainingLog, new_record, plot_history, write_metrics
from train_utils import (TrainConfig, accuracy, cross_entropy_loss, evaluate, fit, infer, resolve_precision)
from utils import (GPT2_TOKENS, DataConfig, TokenizedSplit, UserError, info, init_distributed, is_main_process,
                   load_cola, resolve_device, save_json, seed_everything, world)


@dataclass(frozen=True)
class GPTSource:
    """Where GPT-2's weights come from: a local directory, else a hub preset."""
    weights: str = None       # local Hugging Face GPT-2 directory; wins over variant
    variant: str = "gpt2"     # gpt2 | gpt2-medium | gpt2-large | gpt2-xl

    @property
    def base(self):
        """The base as an adapter names it: the directory's absolute path, or the hub id."""
        return os.path.abspath(self.weights) if self.weights else HUB_IDS[self.variant]

    def load(self, device="cpu"):
        if self.weights and not os.path.isdir(self.weights):
            raise UserError(f"--weights {self.weights}: no such directory (expected config.json + model.safetensors)")
        if not self.weights and self.variant not in PRESETS:
            raise UserError(f"unknown --gpt-variant {self.variant!r}; choose from {', '.join(PRESETS)}")
        source = self.weights or self.variant
        info(f"loading GPT-2 weights from {source}")
        return load_gpt(source).to(device)


@dataclass
class Task:
    """What a training mode hands the generic run."""
    model: torch.nn.Module
    data: tuple                          # (train, validation) TokenizedSplits
    save: Callable                       # save(out_dir): the weights of the best epoch
    loss_fn: Callable = cross_entropy_loss
    record: dict = field(default_factory=dict)   # the mode's own metrics.json fields
    epoch_metrics: Callable = None       # epoch_metrics(val) -> extra fields of an epoch's record


def prepare(device_name, seed):
    """Pick the device (joining torchrun's process group if there is one) and seed
    everything."""
    device = init_distributed(device_name) if world()[1] > 1 else resolve_device(device_name)
    seed_everything(seed)
    return device


def load_data(data: DataConfig, block_size=1024, tokenizer=GPT2_TOKENS):
    train, val = load_cola(data.data_dir, data.val_split)
    info(f"CoLA: {len(train)} training sentences ({train.source}), {len(val)} validation ({val.source})")
    return TokenizedSplit(train, block_size, tokenizer=tokenizer), TokenizedSplit(val, block_size, tokenizer=tokenizer)


# ---------------------------------------------------------------------------
# The training modes
# ---------------------------------------------------------------------------

def lora(gpt: GPTSource, cfg: LoRAConfig, data: DataConfig, device, dtype="auto"):
    """LoRA: GPT-2 frozen, adapters and a head trained on CoLA's labels."""
    base = gpt.load("cpu")
    splits = load_data(data, base.config.block_size)
    add_lora(base, cfg.targets, cfg.rank, cfg.alpha, cfg.dropout)
    classifier = set_trainable(GPTClassifier(base), cfg.train_layernorm).to(device)
    if resolve_precision(device, dtype) == "bfloat16":
        store_frozen_in_bf16(classifier)
    return Task(classifier, splits,
                save=lambda out_dir: save_lora_adapter(classifier, os.path.join(out_dir, "adapter"), gpt.base, cfg),
                record={"lora": {**asdict(cfg), "targets": list(cfg.targets), "base": gpt.base}})


def lora_hf(base: hf_lora.HFBase, cfg: LoRAConfig, data: DataConfig, device, dtype="auto"):
    """LoRA on a Hugging Face encoder (hf_lora.py): its base frozen, adapters on
    base.targets and its classification head trained on CoLA's labels, read with the
    base's own tokenizer."""
    classifier, tokenizer = hf_lora.lora_classifier(base, cfg)
    splits = load_data(data, classifier.max_len, tokenizer)
    classifier.to(device)
    if resolve_precision(device, dtype) == "bfloat16":
        store_frozen_in_bf16(classifier)
    return Task(classifier, splits,
                save=lambda out_dir: hf_lora.save_adapter(classifier, os.path.join(out_dir, "adapter"), base, cfg),
                record={"lora": {**asdict(cfg), "targets": list(base.targets), "base": base.source,
                                 "model_type": base.model_type}})


def student_start(cfg: RNNConfig, init_embeddings="random", gpt: GPTSource = None, teacher=None):
    """What the student starts from, read before any data (a bad source is the
    quicker mistake to report): (tokenizer, token embeddings (vocab, width) or None
    for random ones). GPT-2's tokenizer, with GPT-2's embeddings for "gpt2"; for
    "teacher", the teacher's tokenizer and input embeddings (a LoRA teacher's: its
    base GPT-2's). Wider embeddings are reduced by PCA (DistilRNN.init_embeddings)."""
    if init_embeddings == "random":
        return GPT2_TOKENS, None
    if init_embeddings == "gpt2":
        tokenizer, embeddings, source = GPT2_TOKENS, gpt.load("cpu").transformer.wte.weight.detach().t(), "GPT-2"
    else:
        tokenizer, embeddings, source = teacher.student_tokenizer(), teacher.input_embeddings(), "teacher"
        if embeddings.size(0) < tokenizer.vocab_size:
            raise CheckpointError(f"teacher {teacher.directory}: its tokenizer has {tokenizer.vocab_size} tokens but "
                                  f"its input embeddings only {embeddings.size(0)} rows")
        embeddings = embeddings[:tokenizer.vocab_size]  # rows past the tokenizer's (padding) no token reads
    if cfg.n_embd is not None and cfg.n_embd > embeddings.size(1):
        raise UserError(f"--rnn-embd {cfg.n_embd} exceeds the {source}'s embedding width {embeddings.size(1)}; "
                        f"--init-embeddings {init_embeddings} can only shrink it: pass --rnn-embd "
                        f"{embeddings.size(1)} or less")
    return tokenizer, embeddings


def student_width(cfg: RNNConfig, embeddings=None):
    """cfg with its embedding width settled: as given, else the starting embeddings'
    width up to the study's 768 (wider ones are reduced by PCA), else 768."""
    if cfg.n_embd is not None:
        return cfg
    width = RNNConfig.n_embd if embeddings is None else min(embeddings.size(1), RNNConfig.n_embd)
    return replace(cfg, n_embd=width)


def student(cfg: RNNConfig, seed, tokenizer=GPT2_TOKENS, embeddings=None, device=torch.device("cpu")):
    """A fresh DistilRNN over tokenizer's vocabulary, seeded right before so rnn and
    distil start from the same weights whatever ran before; its embeddings
    optionally from another model's (student_start), its width settled by
    student_width; on device."""
    seed_everything(seed)
    model = DistilRNN(replace(student_width(cfg, embeddings), vocab_size=tokenizer.vocab_size))
    if embeddings is not None:
        model.init_embeddings(embeddings)
    return model.to(device)


def student_record(model, init_embeddings):
    """metrics.json's "student": what the student became (args holds rnn_embd null when left to the default)."""
    return {"init_embeddings": init_embeddings, "n_embd": model.config.n_embd,
            "vocab_size": model.config.vocab_size}


def rnn(cfg: RNNConfig, data: DataConfig, device, seed, gpt: GPTSource = None, init_embeddings="random",
        teacher_dir=None):
    """rnn: the DistilRNN trained on the labels alone, the baseline of distil. With
    init_embeddings "teacher", teacher_dir's teacher gives the student its tokenizer
    and first embeddings, as in distil, and nothing else: it never runs."""
    teacher = load_teacher(teacher_dir, gpt.weights if gpt else None) if init_embeddings == "teacher" else None
    tokenizer, embeddings = student_start(cfg, init_embeddings, gpt, teacher)
    splits = load_data(data, tokenizer=tokenizer)
    model = student(cfg, seed, tokenizer, embeddings, device)
    return Task(model, splits, save=lambda out_dir: save_student(model, out_dir, tokenizer, {"trained_by": "rnn"}),
                record={"student": student_record(model, init_embeddings)})


def distil(cfg: DistilConfig, student_cfg: RNNConfig, data: DataConfig, device, seed, dtype="auto",
           gpt: GPTSource = None, init_embeddings="random", progress=True):
    """distil: the DistilRNN trained on the teacher's logits (and the labels), over
    the training sentences and cfg.augment.copies synthetic sentences each (less
    duplicates). The teacher runs in the run's precision (dtype), like the student."""
    # the teacher and what the student starts from before the data: the quicker mistakes to report
    teacher = None if cfg.teacher_logits else load_teacher(cfg.teacher, gpt.weights if gpt else None)
    tokenizer, embeddings = student_start(student_cfg, init_embeddings, gpt, teacher)
    train_set, val_set = load_data(data, tokenizer=tokenizer)
    if teacher is None:
        targets = teacher_from_file(cfg.teacher_logits, train_set)
    else:
        targets = teacher_targets(teacher, train_set, val_set, device, cfg, dtype, progress)
    model = student(student_cfg, seed, tokenizer, embeddings, device)
    record = {"student": student_record(model, init_embeddings), "teacher": targets.record,
              "distillation": {"alpha": cfg.alpha, "alpha_real": cfg.alpha_real, "temperature": cfg.temperature, "loss": cfg.loss,
                               "augment": cfg.augment.copies, "mask_prob": cfg.augment.mask_prob,
                               "swap_prob": cfg.augment.swap_prob, "ngram_prob": cfg.augment.ngram_prob,
                               "max_ngram": cfg.augment.max_ngram, "transfer_sentences": len(targets.transfer),
                               "duplicates_dropped": targets.duplicates}}
    agreement = None
    if targets.val_predictions is not None:  # how often the student agrees with its teacher
        agreement = lambda val: {"val_agreement": accuracy(val["logits"].argmax(-1), targets.val_predictions)}  # noqa: E731
    return Task(model, (targets.transfer, val_set),
                save=lambda out_dir: save_student(model, out_dir, tokenizer, {"trained_by": "distil"}),
                loss_fn=DistilLoss(targets.logits.to(device), cfg), record=record, epoch_metrics=agreement)


# ---------------------------------------------------------------------------
# The generic run
# ---------------------------------------------------------------------------

def train(mode, task: Task, run: RunConfig, cfg: TrainConfig, device):
    """Train any mode's task: fit, keep the best epoch's weights, write metrics.json
    (and the resumable state) after every epoch, plot. Returns the metrics record."""
    record = {**new_record(mode, run, task.model, device, cfg.dtype, task.data), **task.record}
    params = record["params"]
    if params["trainable"] == params["total"]:
        info(f"parameters: {params['total']:,}, all trained")
    else:
        info(f"parameters: {params['total']:,} total, {params['trainable']:,} trained "
             f"({100 * params['trainable'] / params['total']:.2f}% of them)")

    train_set, val_set = task.data
    log = TrainingLog(run.log_dir, cfg.steps_per_epoch(len(train_set)), run.resume) \
        if run.log_dir and is_main_process() else None

    def epoch_end(history, is_best, val):
        if task.epoch_metrics is not None:
            history[-1].update(task.epoch_metrics(val))
        if is_best:
            task.save(run.out_dir)
        write_metrics(run, record, history)
        if log is not None:
            log.epoch(history[-1])

    history = fit(task.model, task.data, cfg, device, loss_fn=task.loss_fn, loop=run, on_epoch_end=epoch_end,
                  on_steps=log.steps if log is not None else None)
    if not is_main_process():
        return record
    if len(history) < cfg.epochs:
        info(f"stopped after epoch {len(history)} of {cfg.epochs} (--stop-after); continue with --resume")
        return record
    if not run.keep_resume_state:  # only an interrupted run needs it; it is the bulk of a run's bytes
        os.remove(run.state_path)
    wrote = run.metrics_path
    if run.plot:
        plot_path = os.path.join(run.plots, f"{mode}_{os.path.basename(os.path.normpath(run.out_dir))}.png")
        plot_history(record, plot_path, f"{mode} in {run.out_dir}: {len(history)} epochs, "
                                        f"seed {record['environment']['seed']}")
        wrote += f" and {plot_path}"
    best = record["epochs"][record["best_epoch"] - 1]
    info(f"best epoch {best['epoch']}: val acc {best['val_acc']:.4f}, val MCC {best['val_mcc']:.4f}; wrote {wrote}")
    return record


# ---------------------------------------------------------------------------
# predict and eval
# ---------------------------------------------------------------------------

def predict(checkpoint, sentences, device_name="auto", dtype="auto", weights=None, batch_size=64):
    """The probability of "acceptable" for each sentence, by the checkpoint with its
    adapters merged, in length-sorted batches."""
    device = resolve_device(device_name)
    model, tokenizer, description = load_classifier(checkpoint, weights, merge=True)
    info(f"classifier: {description}")
    model.to(device)
    batches = TokenizedSplit.of_texts(sentences, model.max_len, tokenizer=tokenizer).batches(batch_size)
    logits = infer(model, batches, device, resolve_precision(device, dtype))[0]
    return logits.softmax(-1)[:, 1].tolist()


def evaluate_checkpoint(checkpoint, data: DataConfig, output=None, device_name="auto", dtype="auto",
                        weights=None, batch_size=64):
    """A checkpoint's loss, accuracy, MCC and confusion on a validation split,
    printed and written as JSON (default CHECKPOINT/eval_<split>.json)."""
    device = resolve_device(device_name)
    exported = is_export(checkpoint)  # an ONNX export: onnxruntime computes the logits, as deployed
    if not exported:
        model, tokenizer, description = load_classifier(checkpoint, weights)
        model.to(device)
    _, val = load_cola(data.data_dir, data.val_split)
    if exported:
        result, description = evaluate_export(checkpoint, val, batch_size)
    else:
        result = evaluate(model, TokenizedSplit(val, model.max_len, tokenizer=tokenizer).batches(batch_size), device,
                          resolve_precision(device, dtype))
    (tn, fp), (fn, tp) = result["confusion"]
    print(f"checkpoint: {checkpoint} ({description})")
    print(f"data: {val.source} ({result['n']} sentences)")
    print(f"loss {result['loss']:.4f}  accuracy {result['acc']:.4f}  MCC {result['mcc']:.4f}")
    print("confusion (rows: true label, columns: predicted)")
    print(f"            pred 0  pred 1\ntrue 0  {tn:>8} {fp:>7}\ntrue 1  {fn:>8} {tp:>7}")
    output = output or os.path.join(checkpoint, f"eval_{data.val_split}.json")
    save_json(output, {"checkpoint": checkpoint, "data": val.source, "n": result["n"], "loss": result["loss"],
                       "acc": result["acc"], "mcc": result["mcc"],
                       "confusion": {"tn": tn, "fp": fp, "fn": fn, "tp": tp}})
    info(f"wrote {output}")
    return result
