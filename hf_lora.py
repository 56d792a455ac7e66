"""LoRA on any Hugging Face encoder or classifier (`run.py LoRA --base`): the base as
transformers' AutoModelForSequenceClassification loads it, frozen; model.py's
LoRALinear on the chosen nn.Linear layers; the classification head trained whole;
the adapters and the head saved, and read back, in PEFT's format. A GPT-2 base
(model_type gpt2) goes through model.py's GPT instead (modes.lora).

Layers are named as PEFT's target_modules name them: a target matches every Linear
whose name is the target or ends with "." + the target ("query" matches
bert.encoder.layer.3.attention.self.query)."""
import json
import os
import re
from dataclasses import dataclass, replace
from functools import lru_cache

import torch
import torch.nn as nn

from checkpoints import (PEFT_PREFIX, TOKENIZER_FILES, CheckpointError, load_into, read_json, read_tensors,
                         trainable_state, write_peft_adapter)
from hub import HUB_IDS, hub_directory, looks_like_hub_id
from model import LoRAConfig, LoRALinear
from utils import UserError, one_line

# Per model type, the layers adapted by default: attention and MLP, as GPT-2's default does.
DEFAULT_TARGETS = {
    "bert": ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"),
    "roberta": ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"),
    "distilbert": ("q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"),
}
# LoRA's recipe on an encoder, where it differs from GPT-2's (run.py's defaults for a
# --base of these types): measured on all-MiniLM-L6-v2 against full fine-tuning
# (docs/results.md, "LoRA on real weights").
ENCODER_RECIPE = {"epochs": 4, "batch_size": 32, "lr": 1e-3, "lora_rank": 8, "lora_alpha": 16.0,
                  "train_layernorm": True}
# The classification head: the modules past the encoder that turn its states into two
# logits (BERT's pooler and classifier, DistilBERT's pre_classifier and classifier,
# RoBERTa's classifier). They are trained whole, as PEFT's modules_to_save.
HEAD_NAMES = ("pooler", "pre_classifier", "classifier", "score")
BASE_HINT = ("download it on a machine with internet (python -c \"from huggingface_hub import snapshot_download; "
             "print(snapshot_download('ID'))\") and pass that directory as --base DIR")


@dataclass(frozen=True)
class HFBase:
    """A checked --base: where its files are and what it is."""
    source: str        # as an adapter names it: the directory's absolute path, or the hub id
    directory: str     # the local directory (a hub id's snapshot in the Hugging Face cache)
    model_type: str    # config.json's model_type: "gpt2" goes through model.py's GPT
    targets: tuple = ()   # the layers to adapt, checked against the architecture (none for GPT-2)


def base_directory(base):
    """(source, local directory) of --base: a directory, or a hub id from the cache
    first, else downloaded (offline: a one-line UserError)."""
    if os.path.isdir(base):
        return os.path.abspath(base), base
    if os.path.exists(base):
        raise UserError(f"--base {base} is a file; pass a Hugging Face model directory (config.json, weights and "
                        "tokenizer files) or a hub id")
    if not looks_like_hub_id(base):
        raise UserError(f"--base {base} does not exist; pass a Hugging Face model directory or a hub id")
    hub_id = HUB_IDS.get(base, base)
    return hub_id, hub_directory(hub_id, BASE_HINT.replace("ID", hub_id))


def read_config(directory, flag="--base"):
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise UserError(f"{flag} {directory} has no config.json; pass a Hugging Face model directory "
                        "(saved with save_pretrained)")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not readable JSON ({one_line(e)})") from None


@lru_cache(maxsize=8)
def check_base(base, targets=None):
    """--base checked before any training: a classifier base (classifier_base) and
    targets (None: its type's default) naming Linear layers it has. A GPT-2 base is
    returned unchecked beyond its type: model.py's GPT and its own targets take it
    from there."""
    found = classifier_base(base)
    if found.model_type == "gpt2":
        return found
    skeleton = model_skeleton(found.directory)
    layers = layer_names(skeleton)
    if targets is None:
        if found.model_type not in DEFAULT_TARGETS:
            raise UserError(f"--base {base}: there is no default --lora-targets for {found.model_type}; name its "
                            f"layers with --lora-targets (its Linear layers: {','.join(layers)})")
        targets = DEFAULT_TARGETS[found.model_type]
    targets = parse_targets(targets)
    check_targets(skeleton, targets, found.model_type, layers)
    return replace(found, targets=targets)


def classifier_base(base):
    """The HFBase of base, without targets: its directory, a model type with a
    sequence-classification class in transformers, and its tokenizer's files
    (GPT-2 is taken as it is)."""
    source, directory = base_directory(base)
    model_type = read_config(directory).get("model_type")
    if model_type == "gpt2":
        return HFBase(source, directory, model_type)
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES
    if model_type not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
        raise UserError(f"--base {base} is a {model_type or 'model without a model_type'}, which has no "
                        "sequence-classification head in transformers (AutoModelForSequenceClassification); "
                        "pass an encoder such as BERT, RoBERTa or DistilBERT")
    if not any(os.path.isfile(os.path.join(directory, name)) for name in TOKENIZER_FILES):
        raise UserError(f"--base {base} has no tokenizer files (one of {', '.join(TOKENIZER_FILES)}); save the "
                        "tokenizer next to the model: tokenizer.save_pretrained(DIR)")
    return HFBase(source, directory, model_type)


def parse_targets(text):
    """"query, value" -> ("query", "value")."""
    targets = tuple(t.strip() for t in text.split(",") if t.strip()) if isinstance(text, str) else tuple(text)
    if not targets:
        raise UserError("--lora-targets is empty; name at least one layer")
    return targets


def model_skeleton(directory):
    """The classifier built from config.json on the meta device: its module names, no weights read."""
    from transformers import AutoConfig, AutoModelForSequenceClassification
    try:
        config = AutoConfig.from_pretrained(directory, num_labels=2)
        with torch.device("meta"):
            return AutoModelForSequenceClassification.from_config(config)
    except Exception as e:
        raise UserError(f"--base {directory}: its config.json does not build a classifier ({one_line(e)})") from None


def head_modules(model):
    """Names of the head's modules (HEAD_NAMES), outermost only."""
    heads = [name for name, _ in model.named_modules() if name.rpartition(".")[2] in HEAD_NAMES]
    return [h for h in heads if not any(h.startswith(other + ".") for other in heads)]


def in_any(name, modules):
    return any(name == m or name.startswith(m + ".") for m in modules)


def encoder_linears(model):
    """{name: layer} of the layers LoRA may adapt: every Linear outside the head (an
    adapted one as its LoRALinear)."""
    heads = head_modules(model)
    adapted = [name for name, m in model.named_modules() if isinstance(m, LoRALinear)]
    return {name: m for name, m in model.named_modules()
            if (name in adapted or isinstance(m, nn.Linear) and not in_any(name, adapted)) and not in_any(name, heads)}


def layer_names(model):
    """The encoder's Linear layers as a target names them, once each: the path past
    the layer number ("attention.self.query"), in the model's order."""
    names = [re.sub(r"^(.*\.)?\d+\.", "", name) for name in encoder_linears(model)]
    return list(dict.fromkeys(names))


def matches(name, target):
    """PEFT's rule: the module's name is the target or ends with "." + target."""
    return name == target or name.endswith("." + target)


def check_targets(model, targets, model_type, layers=None):
    layers = layers or layer_names(model)
    linears = encoder_linears(model)
    for target in targets:
        if not any(matches(name, target) for name in linears):
            raise UserError(f"--lora-targets: {model_type} has no Linear layer named {target!r}; its layers: "
                            f"{','.join(layers)}")
        head = [name for name, m in model.named_modules()
                if isinstance(m, nn.Linear) and name not in linears and matches(name, target)]
        if head:
            raise UserError(f"--lora-targets: {target!r} also names {head[0]}, in the classification head, "
                            "which is trained whole; name the encoder's layers (e.g. "
                            f"{','.join(layers[:2])})")


# ---------------------------------------------------------------------------
# The classifier: a transformers model called as the project's classifiers are
# ---------------------------------------------------------------------------

class ClassifierTokens:
    """The base's tokenizer as the classifier reads a sentence: with the special
    tokens its model was trained with ([CLS] ... [SEP]), cut to max_len, padded with
    its pad token (TokenizedSplit's tokenizer)."""

    def __init__(self, tokenizer, max_len):
        self.tokenizer, self.max_len = tokenizer, max_len
        self.vocab_size = len(tokenizer)
        self.pad_id = next(i for i in (tokenizer.pad_token_id, tokenizer.unk_token_id, 0) if i is not None)

    def encode(self, texts):
        if not texts:
            return []
        return self.tokenizer(list(texts), truncation=True, max_length=self.max_len, verbose=False)["input_ids"]


class HFClassifier(nn.Module):
    """A transformers sequence classifier taking (right-padded token ids, lengths),
    as GPTClassifier does; the attention mask comes from the lengths."""

    def __init__(self, hf, max_len):
        super().__init__()
        self.hf, self.max_len = hf, max_len

    def forward(self, idx, lengths):
        return self.hf(input_ids=idx, attention_mask=attention_mask(idx, lengths)).logits


def attention_mask(idx, lengths):
    """transformers' attention mask of right-padded rows: 1 on each row's first
    length tokens, 0 on its padding."""
    return (torch.arange(idx.size(1), device=idx.device)[None, :] < lengths[:, None]).long()


def load_tokenizer(directory):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(directory)
    except Exception as e:
        raise CheckpointError(f"the tokenizer of {directory} does not load ({one_line(e)})") from None


def load_model(directory):
    """The base with a 2-label head (a fresh one unless it has one already), in float32
    whatever its files hold."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # the fresh head's "newly initialized" notice: it is meant to be
    logging.disable_progress_bar()
    try:
        return AutoModelForSequenceClassification.from_pretrained(directory, num_labels=2, dtype=torch.float32,
                                                                  ignore_mismatched_sizes=True)
    except Exception as e:
        raise CheckpointError(f"the base {directory} does not load ({one_line(e)})") from None
    finally:
        logging.set_verbosity(verbosity)


def max_len_of(tokenizer, config):
    """The longest input: the tokenizer's limit when it states one, else the positions."""
    limit = tokenizer.model_max_length
    return limit if limit and limit < 100_000 else getattr(config, "max_position_embeddings", 512)


def add_hf_lora(model, targets, rank=4, alpha=8.0, dropout=0.0):
    """Freeze model and wrap the target Linear layers of its encoder in LoRALinear."""
    model.requires_grad_(False)
    for name in [n for n in encoder_linears(model) if any(matches(n, t) for t in targets)]:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent)
        setattr(owner, child, LoRALinear(getattr(owner, child), rank, alpha, dropout))
    return model


def layernorm_names(model):
    """The LayerNorms' names as modules_to_save names them (the last part, once each)."""
    return list(dict.fromkeys(name.rpartition(".")[2] for name, m in model.named_modules()
                              if isinstance(m, nn.LayerNorm)))


def set_hf_trainable(classifier, train_layernorm=False):
    """Only the LoRA matrices and the head learn (and, if asked, the LayerNorms)."""
    heads = head_modules(classifier.hf)
    layernorms = {name for name, m in classifier.hf.named_modules() if isinstance(m, nn.LayerNorm)}
    for name, p in classifier.hf.named_parameters():
        owner = name.rpartition(".")[0]
        p.requires_grad = ".lora_" in name or in_any(name, heads) or (train_layernorm and owner in layernorms)
    return classifier


def lora_classifier(base: HFBase, cfg: LoRAConfig):
    """(classifier, its tokenizer): the base frozen, cfg's adapters on base.targets,
    the head trainable."""
    tokenizer = load_tokenizer(base.directory)
    model = load_model(base.directory)
    add_hf_lora(model, base.targets, cfg.rank, cfg.alpha, cfg.dropout)
    max_len = max_len_of(tokenizer, model.config)
    classifier = set_hf_trainable(HFClassifier(model, max_len), cfg.train_layernorm)
    return classifier, ClassifierTokens(tokenizer, max_len)


# ---------------------------------------------------------------------------
# Adapters in PEFT's format
# ---------------------------------------------------------------------------

def peft_key(name):
    """Our HFClassifier's parameter name -> the key PEFT saves for the same tensor."""
    name = name.removeprefix("hf.")
    return PEFT_PREFIX + (name + ".weight" if name.endswith((".lora_A", ".lora_B")) else name)


def modules_to_save(classifier, train_layernorm):
    heads = [h.rpartition(".")[2] for h in head_modules(classifier.hf)]
    return heads + (layernorm_names(classifier.hf) if train_layernorm else [])


def save_adapter(classifier, adapter_dir, base: HFBase, cfg: LoRAConfig):
    """adapter_config.json + adapter_model.safetensors as PEFT writes them, so that
    peft.PeftModel.from_pretrained(AutoModelForSequenceClassification(base), adapter_dir)
    reproduces the classifier."""
    tensors = {peft_key(name): p for name, p in trainable_state(classifier).items()}
    write_peft_adapter(adapter_dir, tensors, base.source, LoRAConfig(cfg.rank, cfg.alpha, cfg.dropout, base.targets),
                       modules_to_save(classifier, cfg.train_layernorm), fan_in_fan_out=False)


def adapter_base(adapter_dir, weights=None):
    """(the base an adapter applies to, its adapter_config.json): weights when they
    are a Hugging Face encoder (a base moved elsewhere), else the base it names;
    --weights naming GPT-2 (distil's, for --init-embeddings gpt2) leaves it be."""
    config = read_json(os.path.join(adapter_dir, "adapter_config.json"), "a LoRA adapter directory")
    if weights and model_type_at(weights) not in (None, "gpt2"):
        return weights, config
    return config.get("base_model_name_or_path") or weights or "", config


def model_type_at(base):
    """config.json's model_type of a local directory or a hub id in the cache; None
    when it cannot be found here (the GPT-2 loader then says what is missing)."""
    if not base or base in HUB_IDS or base in HUB_IDS.values():
        return "gpt2" if base else None
    if os.path.isdir(base):
        path = os.path.join(base, "config.json")
    elif looks_like_hub_id(base):
        from huggingface_hub import hf_hub_download
        try:
            path = hf_hub_download(base, "config.json", local_files_only=True)
        except Exception:
            return None
    else:
        return None
    try:
        with open(path) as f:
            return json.load(f).get("model_type")
    except (OSError, json.JSONDecodeError):
        return None


def is_hf_adapter(adapter_dir, weights=None):
    """Whether the adapter's base is a Hugging Face encoder rather than GPT-2."""
    return model_type_at(adapter_base(adapter_dir, weights)[0]) not in (None, "gpt2")


def adapter_hf_base(adapter_dir, weights=None):
    """The checked HFBase of an adapter on a Hugging Face encoder: weights, or else
    the adapter's base_model_name_or_path, with its target_modules."""
    base_name, config = adapter_base(adapter_dir, weights)
    if config.get("peft_type") != "LORA" or config.get("rank_pattern") or config.get("alpha_pattern"):
        raise CheckpointError(f"{adapter_dir}: only plain LoRA adapters (one rank, one alpha) are supported")
    targets = config.get("target_modules") or []
    return check_base(base_name, tuple([targets] if isinstance(targets, str) else targets))


def load_adapter_classifier(adapter_dir, weights=None):
    """(classifier, tokenizer, HFBase) from a PEFT adapter on a Hugging Face encoder."""
    base = adapter_hf_base(adapter_dir, weights)
    config = adapter_base(adapter_dir, weights)[1]
    saved = config.get("modules_to_save") or []
    try:
        cfg = LoRAConfig(rank=int(config["r"]), alpha=float(config["lora_alpha"]), targets=base.targets,
                         train_layernorm=any(name not in HEAD_NAMES for name in saved))
        classifier, tokenizer = lora_classifier(base, cfg)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{adapter_dir}/adapter_config.json: {e}") from None
    tensors = read_tensors(os.path.join(adapter_dir, "adapter_model.safetensors"))
    load_into(classifier, {peft_key(n): n for n in trainable_state(classifier)}, tensors, adapter_dir, base.source)
    return classifier.eval(), tokenizer, base
