"""The whole model in one file: GPT-2 (with a KV cache), LoRA adapters and the
DistilRNN student.

Nothing here knows about training, files, the network or the command line; it
only needs torch. checkpoints.py reads pretrained weights from disk.
"""
import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from rnn_steps import run_rnn
from sampling import sample_next


class WeightsError(ValueError):
    """Pretrained weights could not be found, read or matched to the model."""


# ---------------------------------------------------------------------------
# GPT-2
# ---------------------------------------------------------------------------

@dataclass
class GPTConfig:
    block_size: int = 1024      # n_positions in Hugging Face's config.json
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    layer_norm_epsilon: float = 1e-5
    dropout: float = 0.0


PRESETS = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),          # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),   # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),      # 1558M
}


def _init_normal(tensor, std=0.02):
    """GPT-2's initialisation; skipped on the meta device, where from_hf_state
    builds the model before adopting the checkpoint's tensors (and where init
    would only cost time)."""
    if not tensor.is_meta:
        nn.init.normal_(tensor, std=std)


class Linear(nn.Module):
    """nn.Linear's maths with the weight stored transposed, (in, out), as the GPT-2
    checkpoints store it (their "Conv1D"). Batch-1 decoding multiplies one row
    vector by every weight matrix, and on CPU (MKL) x @ W streams an (in, out)
    matrix at least as fast as nn.Linear's (out, in) one (bench.py gen measures
    both; figures in docs/benchmarks.md). It also means no transposes when loading
    a checkpoint."""

    def __init__(self, in_features, out_features, bias=True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        _init_normal(self.weight)

    def forward(self, x):
        if self.bias is None:
            return x @ self.weight
        if x.dim() == 2:  # decoding keeps the residual stream 2-D: one kernel, no reshapes
            return torch.addmm(self.bias, x, self.weight)
        return torch.addmm(self.bias, x.reshape(-1, self.in_features), self.weight).view(*x.shape[:-1], -1)


class TiedEmbedding(nn.Module):
    """Token embedding that is also the LM head (weight tying). Stored as
    (n_embd, vocab) for the same reason as Linear: the LM head, a third of
    gpt2's weights, is the largest product of every decoding step. A lookup
    reads one column per token, which costs nothing by comparison."""

    def __init__(self, vocab_size, n_embd):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_embd, vocab_size))
        _init_normal(self.weight)

    def forward(self, idx):
        return self.weight.t()[idx]

    def logits(self, x):
        return x @ self.weight


class KVCache:
    """Keys and values of every layer, preallocated once for the whole generation
    so that decoding a token writes into place instead of concatenating. One
    tensor per layer, (2, B, n_head, max_len, head_size): keys and values are
    written with one copy, and each is a plain batch of matrices for bmm."""

    def __init__(self, config, batch_size, max_len, device, dtype):
        shape = (2, batch_size, config.n_head, max_len, config.n_embd // config.n_head)
        self.kv = [torch.empty(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.max_len = max_len
        self.pos = 0  # number of positions already filled


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd)  # q, k, v in one matmul
        self.c_proj = Linear(config.n_embd, config.n_embd)
        self.dropout = config.dropout

    def forward(self, x, cache=None, layer=0):
        if x.dim() == 2:  # (B, C): one new token per sequence, against the cache
            return self.c_proj(self.decode_one(self.c_attn(x), cache.kv[layer], cache.pos))
        B, T, C = x.shape
        qkv = self.c_attn(x)
        q, k, v = qkv.view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)  # 3 x (B, nh, T, hs)
        mask, causal = None, True
        if cache is not None:
            start = cache.pos
            cache.kv[layer][:, :, :, start:start + T] = torch.stack((k, v))
            k, v = cache.kv[layer][:, :, :, :start + T]
            if start > 0 and T > 1:  # a chunk after a cached prefix: causal within the chunk only
                causal = False
                mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(diagonal=start)
        dropout = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))

    def decode_one(self, qkv, kv, pos):
        """Attention of one new token per sequence against the cache, as few and as
        small kernels as possible: in batch-1 decoding every op besides the weight
        products is overhead on top of the memory-bound ones (bench.py gen)."""
        B, nh = qkv.size(0), self.n_head
        hs = qkv.size(1) // (3 * nh)
        qkv = qkv.view(B, 3, nh, hs).transpose(0, 1)  # (3, B, nh, hs)
        kv[:, :, :, pos] = qkv[1:]
        q = qkv[0].reshape(B * nh, 1, hs)
        k, v = kv[:, :, :, :pos + 1].flatten(1, 2)  # 2 x (B * nh, pos + 1, hs), views
        scores = torch.baddbmm(q.new_empty(1, 1, 1), q, k.transpose(1, 2), beta=0, alpha=1.0 / math.sqrt(hs))
        return torch.bmm(scores.softmax(dim=-1), v).view(B, nh * hs)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x):
        # GPT-2 was trained with the tanh approximation of GELU ("gelu_new" in transformers)
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)
        self.dropout = config.dropout

    def forward(self, x, cache=None, layer=0):
        # (a function, not nn.Dropout modules: decoding pays for every module call)
        x = x + dropout(self.attn(self.ln_1(x), cache, layer), self.dropout, self.training)
        return x + dropout(self.mlp(self.ln_2(x)), self.dropout, self.training)


def dropout(x, p, training):
    return F.dropout(x, p, training=True) if training and p > 0 else x


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=TiedEmbedding(config.vocab_size, config.n_embd),
            # given its tensor, nn.Embedding skips its own init: on the meta device that
            # init imports torch._dynamo, two seconds that gen, predict and eval need not pay
            wpe=nn.Embedding(config.block_size, config.n_embd, _weight=torch.empty(config.block_size, config.n_embd)),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon),
        ))
        _init_normal(self.transformer.wpe.weight)

    def hidden_states(self, idx, cache=None):
        """Final (layer-normed) hidden states, shape (B, T, n_embd)."""
        T = idx.size(1)
        start = cache.pos if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds the context of {self.config.block_size}")
        # positions start:start+T as a slice of the table (the same rows as wpe(arange), one op less per step)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe.weight[start:start + T])
        if cache is not None and T == 1:  # decoding: the residual stream as (B, n_embd)
            x = x.view(idx.size(0), -1)
        for layer, block in enumerate(self.transformer.h):
            x = block(x, cache, layer)
        if cache is not None:
            cache.pos += T
        return self.transformer.ln_f(x).view(idx.size(0), T, -1)

    def forward(self, idx, cache=None, last_only=False):
        """Next-token logits (B, T, vocab); with last_only only for the final position,
        which is all generation needs and saves most of the LM head's work."""
        x = self.hidden_states(idx, cache)
        if last_only:
            x = x[:, -1:, :]
        return self.transformer.wte.logits(x)

    # -- pretrained weights -------------------------------------------------

    @classmethod
    def from_hf_state(cls, config, state, source):
        """A GPT holding the tensors of a Hugging Face GPT2Model / GPT2LMHeadModel
        state dict (source names it in errors); checkpoints.load_gpt reads one from
        a directory. Built on the meta device, adopting the tensors (assign=True),
        so no second full copy of the weights is ever allocated."""
        with torch.device("meta"):
            model = cls(config)
        model.load_state_dict(_hf_to_ours(state, model, source), assign=True)
        return model.eval()

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    # -- generation --------------------------------------------------------

    @torch.inference_mode()
    def generate_stream(self, idx, max_new_tokens, greedy=False, temperature=1.0, top_k=None, top_p=None,
                        generator=None, stop_token=None, use_cache=True):
        """Yield the next token of every sequence, a (B,) tensor per step.

        A sequence that produced stop_token keeps yielding stop_token; the stream
        ends when all sequences stopped or after max_new_tokens steps. Prompts
        longer than the context are cropped to its last block_size tokens."""
        block = self.config.block_size
        idx = idx[:, -block:]
        B = idx.size(0)
        finished = torch.zeros(B, dtype=torch.bool, device=idx.device)
        cache = None
        if use_cache:
            dtype = self.transformer.wte.weight.dtype
            if torch.is_autocast_enabled(idx.device.type):  # keys and values come out in autocast's dtype
                dtype = torch.get_autocast_dtype(idx.device.type)
            cache = KVCache(self.config, B, min(block, idx.size(1) + max_new_tokens), idx.device, dtype)
        context = idx
        logits = self(context, cache, last_only=True)[:, -1, :]
        for step in range(max_new_tokens):
            next_token = sample_next(logits, greedy, temperature, top_k, top_p, generator)
            if stop_token is not None:
                next_token = torch.where(finished, torch.full_like(next_token, stop_token), next_token)
                finished |= next_token == stop_token
            yield next_token
            if step == max_new_tokens - 1 or (stop_token is not None and bool(finished.all())):
                return
            context = torch.cat([context, next_token[:, None]], dim=1)[:, -block:]
            if cache is None:
                logits = self(context, last_only=True)[:, -1, :]
            elif cache.pos < cache.max_len:
                logits = self(next_token[:, None], cache, last_only=True)[:, -1, :]
            else:
                # The context window is full: restart the cache from the cropped context,
                # exactly what a model without cache would see.
                cache.pos = 0
                logits = self(context, cache, last_only=True)[:, -1, :]

    def generate(self, idx, max_new_tokens, **kwargs):
        """Return idx followed by the generated tokens, (B, T + steps)."""
        steps = list(self.generate_stream(idx, max_new_tokens, **kwargs))
        if not steps:
            return idx
        return torch.cat([idx, torch.stack(steps, dim=1)], dim=1)


def _hf_to_ours(state, model, source):
    """Map a GPT2Model / GPT2LMHeadModel state dict onto model's parameter names,
    checked against model's shapes."""
    ours = {}
    for key, tensor in state.items():
        name = key[len("transformer."):] if key.startswith("transformer.") else key
        # attention-mask buffers of old checkpoints, the tied LM head and heads of other tasks
        if name.endswith((".attn.bias", ".attn.masked_bias")) or not name.startswith(("wte.", "wpe.", "h.", "ln_f.")):
            continue
        if name == "wte.weight":
            tensor = tensor.t()  # TiedEmbedding keeps it as (n_embd, vocab)
        ours["transformer." + name] = tensor.float().contiguous()
    expected = {k: v.shape for k, v in model.state_dict().items()}
    extra = sorted(set(ours) - set(expected))
    if extra:
        raise WeightsError(f"{source} does not match its config.json: it has {len(extra)} tensors the config "
                           f"does not describe (first: {extra[0].removeprefix('transformer.')})")
    missing = sorted(set(expected) - set(ours))
    if missing:
        raise WeightsError(f"{source} does not match its config.json: {len(missing)} tensors missing "
                           f"(first: {missing[0].removeprefix('transformer.')})")
    for key, shape in expected.items():
        if ours[key].shape != shape:
            raise WeightsError(f"{source} does not match its config.json: "
                               f"{key.removeprefix('transformer.')} has shape {tuple(ours[key].shape)}, "
                               f"expected {tuple(shape)}")
    return {k: ours[k] for k in expected}


# ---------------------------------------------------------------------------
# LoRA
# ---------------------------------------------------------------------------

# target name (as --lora-targets and PEFT's target_modules spell it) -> path inside a Block
LORA_TARGET_PATHS = {"c_attn": "attn.c_attn", "attn.c_proj": "attn.c_proj",
                     "c_fc": "mlp.c_fc", "mlp.c_proj": "mlp.c_proj"}
LORA_TARGETS = tuple(LORA_TARGET_PATHS)


class LoRALinear(nn.Module):
    """A frozen Linear plus a trainable low-rank update (Hu et al. 2021):
    y = W0 x + b + (alpha / r) * B A dropout(x). A is (r, in) and B (out, r), the
    shapes PEFT saves, so adapters move between the two without reshaping. The base
    is our Linear (GPT-2's (in, out) weight) or an nn.Linear ((out, in): the layers of
    transformers' encoders); only merging needs to know which.

    Wraps the base layer instead of subclassing it, and merges only when asked
    (merge()/unmerge()), never as a side effect of .eval()."""

    def __init__(self, base: Linear | nn.Linear, rank: int = 4, alpha: float = 8.0, dropout: float = 0.0):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        if alpha <= 0:
            raise ValueError(f"LoRA alpha must be > 0, got {alpha}")
        self.base = base
        self.base.requires_grad_(False)
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **factory))  # zero: starts as W0
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear, loralib and PEFT do
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def forward(self, x):
        y = self.base(x)
        if self.merged:
            if self.training and torch.is_grad_enabled():
                # the adapter path is skipped, so A and B would get no gradient at all
                raise RuntimeError("LoRALinear is merged: unmerge() before training it")
            return y
        # Scale the thin (tokens, r) intermediate, not the (tokens, out) update, and let
        # the GEMM add the update into y (addmm): two fewer full-size passes over the
        # output, forward and backward, on the training path.
        low_rank = F.linear(self.lora_dropout(x), self.lora_A) * self.scaling
        out = torch.addmm(y.reshape(-1, y.size(-1)), low_rank.reshape(-1, self.rank), self.lora_B.t())
        return out.view(y.shape)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if self.merged:  # unmerge() would then subtract an update W0 never received
            raise RuntimeError("LoRALinear is merged: unmerge() before loading adapter weights into it")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def delta_weight(self):
        """The update in the base weight's layout: (in, out) for our Linear, (out, in) for nn.Linear."""
        if isinstance(self.base, nn.Linear):
            return (self.lora_B @ self.lora_A) * self.scaling
        return (self.lora_A.t() @ self.lora_B.t()) * self.scaling

    @torch.no_grad()
    def merge(self):
        """Fold the update into W0: inference then costs exactly one plain Linear."""
        if not self.merged:
            self.base.weight += self.delta_weight()
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.base.weight -= self.delta_weight()
            self.merged = False


@dataclass
class LoRAConfig:
    rank: int = 4
    alpha: float = 8.0            # the update is scaled by alpha / rank
    dropout: float = 0.0          # on the adapters' input
    targets: tuple = LORA_TARGETS
    train_layernorm: bool = False  # also train the LayerNorms (with the adapters and the head)


def lora_targets(text):
    """"c_attn, c_fc" -> ("c_attn", "c_fc"); ValueError naming the choices for an
    unknown or empty list."""
    targets = tuple(t.strip() for t in text.split(",") if t.strip()) if isinstance(text, str) else tuple(text)
    unknown = [t for t in targets if t not in LORA_TARGETS]
    if unknown or not targets:
        raise ValueError(f"unknown LoRA target(s) {','.join(unknown) or '(none)'}; "
                         f"choose from {','.join(LORA_TARGETS)}")
    return targets


def add_lora(gpt: GPT, targets=LORA_TARGETS, rank=4, alpha=8.0, dropout=0.0):
    """Freeze gpt and wrap the chosen Linear layers of every block in LoRALinear."""
    targets = lora_targets(targets)
    gpt.requires_grad_(False)
    for block in gpt.transformer.h:
        for target in targets:
            parent_name, _, child = LORA_TARGET_PATHS[target].rpartition(".")
            parent = block.get_submodule(parent_name)
            setattr(parent, child, LoRALinear(getattr(parent, child), rank, alpha, dropout))
    return gpt


def lora_layers(model):
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def merge_lora(model):
    """Fold every adapter of model into its base weight (for inference)."""
    for layer in lora_layers(model):
        layer.merge()
    return model


LAYERNORMS = ("ln_1", "ln_2", "ln_f")


def set_trainable(classifier, train_layernorm=False):
    """Only the LoRA matrices and the head learn (and, if asked, the LayerNorms)."""
    for name, p in classifier.named_parameters():
        is_layernorm = any(f".{ln}." in name for ln in LAYERNORMS)
        p.requires_grad = ".lora_" in name or name.startswith("score.") or (train_layernorm and is_layernorm)
    return classifier


def store_frozen_in_bf16(model):
    """Under bf16 autocast every product reads its weight in bf16: store the frozen
    Linear weights (GPT-2's, or an encoder's nn.Linear) so once, rather than casting ~85M numbers again at every forward
    (and hold half the bytes). What is trained (adapters, head, LayerNorms with
    --train-layernorm) and its optimizer state stay float32."""
    for module in model.modules():
        if isinstance(module, (Linear, nn.Linear)) and not module.weight.requires_grad:
            module.weight.data = module.weight.data.to(torch.bfloat16)


class GPTClassifier(nn.Module):
    """GPT-2 with a linear head on the hidden state of each sentence's last real
    token. With right padding and causal attention, pads come after every real
    token, so they never influence it and no attention mask is needed."""

    def __init__(self, gpt: GPT, n_classes: int = 2):
        super().__init__()
        self.gpt = gpt
        self.score = nn.Linear(gpt.config.n_embd, n_classes, bias=False)
        nn.init.normal_(self.score.weight, std=0.02)

    @property
    def max_len(self):
        return self.gpt.config.block_size

    def forward(self, idx, lengths):
        hidden = self.gpt.hidden_states(idx)
        last = hidden[torch.arange(idx.size(0), device=idx.device), lengths - 1]
        return self.score(last)


# ---------------------------------------------------------------------------
# DistilRNN
# ---------------------------------------------------------------------------

@dataclass
class RNNConfig:
    vocab_size: int = 50257
    n_embd: int = 768
    rnn_type: str = "rnn"   # rnn (ReLU, as in the original study) | gru | lstm
    n_layers: int = 2
    hidden: int = 768
    bidirectional: bool = False
    dropout: float = 0.0        # between RNN layers
    embd_dropout: float = 0.0   # on the token embeddings (CoLA is small: the student overfits it)
    head_dropout: float = 0.0   # on the sentence's features, before the classifier
    n_classes: int = 2
    pool: str = "last"          # the sentence's features: last (the final states) | max | mean over time
    mlp_hidden: int = 0         # a ReLU layer of this many units before the classifier; 0 = none
    embd_channels: str = "trained"  # trained | frozen (not trained) | both (a frozen and a trained copy)

    @classmethod
    def from_dict(cls, d):
        """A saved config; settings it predates take their defaults (today's behaviour then)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


RNN_TYPES, POOLS, EMBD_CHANNELS = ("rnn", "gru", "lstm"), ("last", "max", "mean"), ("trained", "frozen", "both")


class DistilRNN(nn.Module):
    """The small student: token embedding, a multi-layer RNN, a sentence's features
    (the final states, or the top layer's outputs max- or mean-pooled over its real
    tokens), an optional ReLU layer, a linear classifier. Sequences are packed and
    pooling skips the pads, so padding never changes a sentence's output.

    Tang et al. 2019's two embedding channels (embd_channels="both"): a frozen copy
    of the initial vectors (static_embedding) next to a trained one, concatenated."""

    def __init__(self, config: RNNConfig):
        super().__init__()
        for name, value, choices in (("rnn type", config.rnn_type, RNN_TYPES), ("pool", config.pool, POOLS),
                                     ("embedding channels", config.embd_channels, EMBD_CHANNELS)):
            if value not in choices:
                raise ValueError(f"unknown {name} {value!r}; choose {', '.join(choices)}")
        if config.mlp_hidden < 0:
            raise ValueError(f"mlp_hidden must be >= 0, got {config.mlp_hidden}")
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.n_embd)
        self.static_embedding = None
        if config.embd_channels == "frozen":
            self.embedding.weight.requires_grad_(False)
        elif config.embd_channels == "both":  # a copy, made without drawing numbers: the RNN's init stays
            self.static_embedding = nn.Embedding.from_pretrained(self.embedding.weight.detach().clone(), freeze=True)
        width = config.n_embd * (2 if self.static_embedding is not None else 1)
        kwargs = dict(input_size=width, hidden_size=config.hidden, num_layers=config.n_layers,
                      batch_first=True, bidirectional=config.bidirectional,
                      dropout=config.dropout if config.n_layers > 1 else 0.0)
        if config.rnn_type == "rnn":
            self.rnn = nn.RNN(nonlinearity="relu", **kwargs)
        else:
            self.rnn = (nn.GRU if config.rnn_type == "gru" else nn.LSTM)(**kwargs)
        self.embd_dropout = nn.Dropout(config.embd_dropout)
        self.head_dropout = nn.Dropout(config.head_dropout)
        features = config.hidden * (2 if config.bidirectional else 1)
        self.mlp = nn.Linear(features, config.mlp_hidden) if config.mlp_hidden else None
        self.classifier = nn.Linear(config.mlp_hidden or features, config.n_classes)

    max_len = 1 << 30  # an RNN reads sentences of any length

    @torch.no_grad()
    def init_embeddings(self, token_embeddings):
        """Start from another model's token embeddings (vocab, width), e.g. GPT-2's;
        a wider table keeps the n_embd directions along which it varies most (PCA).
        Row i stays token i's. Both channels start from them."""
        token_embeddings = token_embeddings.float()
        if token_embeddings.size(1) != self.config.n_embd:
            centred = token_embeddings - token_embeddings.mean(0)
            _, _, v = torch.linalg.svd(centred, full_matrices=False)
            token_embeddings = centred @ v[:self.config.n_embd].t()
        self.embedding.weight.copy_(token_embeddings)
        if self.static_embedding is not None:
            self.static_embedding.weight.copy_(token_embeddings)

    def embed(self, idx):
        embedded = self.embedding(idx)
        if self.static_embedding is not None:
            embedded = torch.cat([self.static_embedding(idx), embedded], dim=-1)
        return self.embd_dropout(embedded)

    # training on CPU, the ReLU RNN runs step by step in Python (packed_relu_rnn): the same
    # numbers, a faster backward; without gradients torch's kernel is the faster (no backward
    # to save, no Python per step). False: always the kernel (the tests compare the two)
    python_steps = True
    reads_host_lengths = True  # the loops pass forward the lengths they keep on the host

    def rnn_runs_in(self, device_type, precision):
        """The precision the RNN computes in when the rest of the model runs in
        precision ("float32", "tf32" or "bfloat16"). Under autocast only the ReLU RNN
        on a CPU stays inside it (its products then in bf16): CUDA's autocast runs
        cuDNN's RNNs in float16, whatever the autocast dtype, and a CPU's leaves the
        GRU and LSTM in float32. Those run in float32 outside autocast instead (on
        CUDA as IEEE float32 or TF32, as the run's matrix products)."""
        if precision != "bfloat16" or (device_type == "cpu" and self.config.rnn_type == "rnn"):
            return precision
        return "float32"

    def forward(self, idx, lengths, host_lengths=None):
        """Logits (B, n_classes) of right-padded idx (B, T). lengths (B,) may live on
        the device; host_lengths, the same on the host, spares packing a read back
        (without it, eager mode copies lengths to the host: a sync on CUDA)."""
        embedded = self.embed(idx)
        device_type = embedded.device.type
        pad = {"last": None, "max": float("-inf"), "mean": 0.0}[self.config.pool]  # what pooling ignores
        if torch.is_autocast_enabled(device_type) and self.rnn_runs_in(device_type, "bfloat16") == "float32":
            with torch.autocast(device_type, enabled=False):
                h_n, padded = run_rnn(self.rnn, embedded.float(), lengths, host_lengths, self.python_steps, pad)
        else:
            h_n, padded = run_rnn(self.rnn, embedded, lengths, host_lengths, self.python_steps, pad)
        if self.config.pool == "last":
            if isinstance(h_n, tuple):  # LSTM returns (h_n, c_n)
                h_n = h_n[0]
            # h_n: (layers * directions, B, hidden); the last layer's forward state has read
            # up to the last real token, its backward state (if any) back to the first.
            features = torch.cat([h_n[-2], h_n[-1]], dim=-1) if self.config.bidirectional else h_n[-1]
        else:
            # the top layer's outputs (both directions side by side) at every real token,
            # the pads filled with what the pooling ignores: -inf for max, 0 for the sum
            if self.config.pool == "max":
                features = padded.amax(dim=1)
            else:
                features = padded.sum(dim=1) / lengths.to(padded.device, padded.dtype).unsqueeze(1)
        features = self.head_dropout(features)
        if self.mlp is not None:
            features = torch.relu(self.mlp(features))
        return self.classifier(features)
