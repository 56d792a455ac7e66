"""model.GPT against transformers' GPT2LMHeadModel: loading, logits, generation."""
import json
import os
import shutil

import pytest
import torch

import model
from checkpoints import load_gpt
from model import WeightsError, sample_next
from utils import UserError

from conftest import EOT, TINY


def hf_logits(hf, idx):
    with torch.no_grad():
        return hf(idx).logits


def rand_ids(n, batch=1, seed=0, high=50000):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, high, (batch, n), generator=g)


def hf_greedy(hf, idx, n):
    with torch.no_grad():
        return hf.generate(idx, attention_mask=torch.ones_like(idx), do_sample=False, max_new_tokens=n,
                           min_new_tokens=n, pad_token_id=EOT)


# ---------------------------------------------------------------------------
# loading and logits
# ---------------------------------------------------------------------------

def test_tiny_logits_match_transformers(tiny_ckpt, tiny_gpt):
    idx = rand_ids(TINY["n_positions"], batch=2)  # the full context, two rows
    ours = tiny_gpt(idx)
    ref = hf_logits(tiny_ckpt.hf, idx)
    assert ours.shape == ref.shape == (2, TINY["n_positions"], 50257)
    assert (ours - ref).abs().max().item() < 1e-4


def test_gpt2_shape_logits_match_transformers(gpt2_ckpt):
    gpt = load_gpt(gpt2_ckpt.path)
    cfg = gpt.config
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size, cfg.vocab_size) == (12, 12, 768, 1024, 50257)
    assert gpt.num_params() == sum(p.numel() for p in gpt2_ckpt.hf.transformer.parameters())
    idx = rand_ids(12)
    ours = gpt(idx)
    ref = hf_logits(gpt2_ckpt.hf, idx)
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() < 1e-4
    # last_only gives the final position's logits only, the same values
    last = gpt(idx, last_only=True)
    assert last.shape == (1, 1, 50257)
    assert (last[:, 0] - ref[:, -1]).abs().max().item() < 1e-4


def test_pytorch_model_bin_loads(tiny_bin_ckpt):
    assert not os.path.exists(os.path.join(tiny_bin_ckpt.path, "model.safetensors"))
    gpt = load_gpt(tiny_bin_ckpt.path)
    idx = rand_ids(20)
    assert (gpt(idx) - hf_logits(tiny_bin_ckpt.hf, idx)).abs().max().item() < 1e-4


def test_loaded_model_is_in_eval_mode_on_cpu(tiny_gpt):
    assert not tiny_gpt.training
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in tiny_gpt.parameters())
    # the LM head is tied to the token embedding, stored (n_embd, vocab)
    assert tiny_gpt.transformer.wte.weight.shape == (TINY["n_embd"], 50257)


def test_sequence_longer_than_context_is_rejected_by_forward(tiny_gpt):
    with pytest.raises(ValueError, match="exceeds the context of 128"):
        tiny_gpt(rand_ids(TINY["n_positions"] + 1))


def test_chunk_after_cached_prefix_matches_full_forward(tiny_gpt):
    """The KV cache with a multi-token chunk after a prefix (the masked path)."""
    idx = rand_ids(30)
    full = tiny_gpt(idx)
    cache = model.KVCache(tiny_gpt.config, 1, 30, idx.device, torch.float32)
    with torch.no_grad():
        a = tiny_gpt(idx[:, :10], cache)
        b = tiny_gpt(idx[:, 10:25], cache)
        c = tiny_gpt(idx[:, 25:26], cache)
        d = tiny_gpt(idx[:, 26:], cache)
    assert cache.pos == 30
    assert (torch.cat([a, b, c, d], dim=1) - full).abs().max().item() < 1e-4


# ---------------------------------------------------------------------------
# generation
# ---------------------------------------------------------------------------

def test_greedy_matches_transformers_generate(tiny_ckpt, tiny_gpt):
    idx = rand_ids(9, batch=2, seed=3)
    ours = tiny_gpt.generate(idx, 40, greedy=True, stop_token=None)
    ref = hf_greedy(tiny_ckpt.hf, idx, 40)
    assert ours.shape == (2, 49)
    # min_new_tokens only matches stop_token=None as long as greedy never wants EOT
    assert EOT not in ours[:, 9:].tolist()[0] + ours[:, 9:].tolist()[1]
    assert ours.tolist() == ref.tolist()
    assert torch.equal(ours[:, :9], idx)


def test_greedy_matches_transformers_generate_gpt2_shape(gpt2_ckpt):
    gpt = load_gpt(gpt2_ckpt.path)
    idx = rand_ids(5, seed=5)
    assert gpt.generate(idx, 6, greedy=True, stop_token=None).tolist() == hf_greedy(gpt2_ckpt.hf, idx, 6).tolist()


def test_kv_cache_equals_no_cache_greedy(tiny_gpt):
    idx = rand_ids(7, batch=3, seed=11)
    with_cache = tiny_gpt.generate(idx, 50, greedy=True, stop_token=None, use_cache=True)
    without = tiny_gpt.generate(idx, 50, greedy=True, stop_token=None, use_cache=False)
    assert with_cache.shape == (3, 57)
    assert torch.equal(with_cache, without)


@pytest.mark.parametrize("kwargs", [dict(), dict(temperature=0.7, top_k=50), dict(top_p=0.9)])
def test_kv_cache_equals_no_cache_sampling(tiny_gpt, kwargs):
    idx = rand_ids(7, batch=3, seed=12)
    runs = [tiny_gpt.generate(idx, 20, generator=torch.Generator().manual_seed(42), stop_token=None,
                              use_cache=use_cache, **kwargs) for use_cache in (True, False)]
    assert torch.equal(runs[0], runs[1])
    # sampling really sampled: rows differ from each other and from greedy
    greedy = tiny_gpt.generate(idx, 20, greedy=True, stop_token=None)
    assert not torch.equal(runs[0], greedy)
    assert not torch.equal(runs[0][0, 7:], runs[0][1, 7:])


def test_same_generator_seed_same_samples_other_seed_other_samples(tiny_gpt):
    idx = rand_ids(5, seed=13)
    a, b, c = (tiny_gpt.generate(idx, 30, generator=torch.Generator().manual_seed(s), stop_token=None)
               for s in (1, 1, 2))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_batch_rows_equal_single_runs(tiny_gpt):
    """A batch of several prompts gives each row what it gets alone (greedy)."""
    idx = rand_ids(6, batch=4, seed=14)
    batch = tiny_gpt.generate(idx, 25, greedy=True, stop_token=None)
    assert batch.shape == (4, 31)
    for row in range(4):
        alone = tiny_gpt.generate(idx[row:row + 1], 25, greedy=True, stop_token=None)
        assert torch.equal(batch[row:row + 1], alone)


def test_generate_stream_yields_one_token_per_row_per_step(tiny_gpt):
    idx = rand_ids(4, batch=3, seed=15)
    steps = list(tiny_gpt.generate_stream(idx, 12, greedy=True, stop_token=None))
    assert len(steps) == 12
    assert all(s.shape == (3,) and s.dtype == torch.long for s in steps)
    assert torch.equal(torch.stack(steps, dim=1), tiny_gpt.generate(idx, 12, greedy=True, stop_token=None)[:, 4:])


def test_long_prompt_is_cropped_to_context(tiny_gpt):
    block = TINY["n_positions"]
    idx = rand_ids(block + 37, seed=16)
    for use_cache in (True, False):
        out = tiny_gpt.generate(idx, 10, greedy=True, stop_token=None, use_cache=use_cache)
        cropped = tiny_gpt.generate(idx[:, -block:], 10, greedy=True, stop_token=None, use_cache=use_cache)
        assert out.shape == (1, block + 37 + 10)
        assert torch.equal(out[:, :block + 37], idx)  # generate returns the whole prompt
        assert torch.equal(out[:, -10:], cropped[:, -10:])


def test_generation_past_context_window_matches_sliding_window_reference(tiny_ckpt, tiny_gpt):
    """Prompt 110 + 30 new tokens > 128 positions: with and without cache, every
    token is the argmax of transformers' logits over the last 128 tokens."""
    block = TINY["n_positions"]
    idx = rand_ids(110, seed=17)
    with_cache = tiny_gpt.generate(idx, 30, greedy=True, stop_token=None, use_cache=True)
    without = tiny_gpt.generate(idx, 30, greedy=True, stop_token=None, use_cache=False)
    assert with_cache.shape == (1, 140)
    assert torch.equal(with_cache, without)
    seq = idx
    for _ in range(30):
        nxt = hf_logits(tiny_ckpt.hf, seq[:, -block:])[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    assert with_cache.tolist() == seq.tolist()


def test_long_prompt_past_window_sampling_cache_equals_no_cache(tiny_gpt):
    idx = rand_ids(TINY["n_positions"] + 5, batch=2, seed=18)
    runs = [tiny_gpt.generate(idx, 20, generator=torch.Generator().manual_seed(3), stop_token=None,
                              use_cache=c) for c in (True, False)]
    assert torch.equal(runs[0], runs[1])


# -- stopping ---------------------------------------------------------------

@pytest.mark.parametrize("greedy", [True, False])
def test_stops_at_the_stop_token(eot_ckpt, greedy):
    gpt = load_gpt(eot_ckpt.path)
    idx = rand_ids(5, batch=2, seed=19)
    # the reference agrees that EOT is what comes next
    assert (hf_logits(eot_ckpt.hf, idx)[:, -1].argmax(-1) == EOT).all()
    out = gpt.generate(idx, 20, greedy=greedy, stop_token=EOT, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 6)  # one step, then every row has stopped
    assert out[:, -1].tolist() == [EOT, EOT]
    # without a stop token it keeps going for the full max_new_tokens
    assert gpt.generate(idx, 20, greedy=greedy, stop_token=None).shape == (2, 25)
    assert gpt.generate(idx, 20, greedy=greedy).shape == (2, 25)  # none is the default: the tokenizer owns EOT


def _first_new_token_at(seq, k):
    """Is seq[k] a token that does not appear in seq[:k]?"""
    return seq[k] not in seq[:k]


def test_stop_token_ends_generation_early(tiny_gpt):
    idx = rand_ids(6, seed=20)
    free = tiny_gpt.generate(idx, 30, greedy=True, stop_token=None)[0, 6:].tolist()
    k = max(i for i in range(30) if _first_new_token_at(free, i))
    assert k >= 2, free
    steps = list(tiny_gpt.generate_stream(idx, 30, greedy=True, stop_token=free[k]))
    assert len(steps) == k + 1
    assert torch.cat(steps).tolist() == free[:k + 1]


def test_stopped_row_keeps_yielding_stop_token_while_others_continue(tiny_gpt):
    idx = rand_ids(6, batch=2, seed=21)
    free = tiny_gpt.generate(idx, 30, greedy=True, stop_token=None)[:, 6:].tolist()
    a, b = free
    candidates = [i for i in range(1, 20) if _first_new_token_at(a, i) and a[i] not in b]
    assert candidates, free
    k = candidates[0]
    out = tiny_gpt.generate(idx, 30, greedy=True, stop_token=a[k])
    assert out.shape == (2, 36)
    assert out[0, 6:].tolist() == a[:k + 1] + [a[k]] * (29 - k)
    assert out[1, 6:].tolist() == b  # the other row is unaffected


# -- sampling controls --------------------------------------------------------

@pytest.mark.parametrize("kwargs", [dict(top_k=1), dict(top_p=1e-6), dict(top_k=1, top_p=0.5, temperature=3.0),
                                    dict(temperature=1e-4)])
def test_degenerate_sampling_equals_greedy(tiny_gpt, kwargs):
    idx = rand_ids(8, batch=2, seed=22)
    greedy = tiny_gpt.generate(idx, 30, greedy=True, stop_token=None)
    sampled = tiny_gpt.generate(idx, 30, generator=torch.Generator().manual_seed(5), stop_token=None, **kwargs)
    assert torch.equal(sampled, greedy)


def test_greedy_ignores_temperature(tiny_gpt):
    idx = rand_ids(8, seed=23)
    assert torch.equal(tiny_gpt.generate(idx, 10, greedy=True, temperature=0.0, stop_token=None),
                       tiny_gpt.generate(idx, 10, greedy=True, stop_token=None))


def test_sample_next_top_k_restricts_to_top_k_set():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 500, generator=g)
    k, n = 5, 6000
    top = set(torch.topk(logits[0], k).indices.tolist())
    draws = sample_next(logits.expand(n, -1), top_k=k, generator=g)
    assert draws.shape == (n,)
    counts = torch.bincount(draws, minlength=500).float()
    assert set(torch.nonzero(counts)[:, 0].tolist()) == top
    # and within the set the frequencies follow the renormalised softmax
    expected = torch.zeros(500)
    expected[list(top)] = logits[0, list(top)].softmax(-1)
    assert (counts / n - expected).abs().max().item() < 0.03


@pytest.mark.parametrize("top_p,kept", [(0.5, {3, 7}), (0.75, {3, 7, 1}), (0.95, {3, 7, 1, 0}), (0.3, {3})])
def test_sample_next_top_p_keeps_smallest_set_reaching_p(top_p, kept):
    probs = torch.full((10,), 1e-9)
    probs[[3, 7, 1, 0]] = torch.tensor([0.4, 0.3, 0.2, 0.1])
    logits = probs.log()[None].expand(4000, -1)
    draws = sample_next(logits, top_p=top_p, generator=torch.Generator().manual_seed(1))
    assert set(draws.tolist()) == kept
    if kept == {3, 7}:
        share = (draws == 3).float().mean().item()
        assert abs(share - 0.4 / 0.7) < 0.04


def test_sample_next_follows_softmax_and_never_draws_a_masked_token():
    """The inverse-CDF draw: frequencies follow the softmax over the whole
    vocabulary and a -inf logit (probability 0) is never drawn, even at the ends."""
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(1, 40, generator=g)
    logits[0, [0, 17, 39]] = float("-inf")
    n = 20000
    draws = sample_next(logits.expand(n, -1), generator=g)
    counts = torch.bincount(draws, minlength=40).float()
    assert counts[[0, 17, 39]].sum() == 0
    assert (counts / n - logits[0].softmax(-1)).abs().max().item() < 0.015


def test_sample_next_temperature_sharpens_and_flattens():
    logits = torch.tensor([[2.0, 1.0, 0.0]]).expand(6000, -1)
    g = torch.Generator().manual_seed(2)
    share = {t: (sample_next(logits, temperature=t, generator=g) == 0).float().mean().item() for t in (0.25, 1.0, 100)}
    expected = {t: torch.tensor([2.0, 1.0, 0.0]).div(t).softmax(-1)[0].item() for t in share}
    for t in share:
        assert abs(share[t] - expected[t]) < 0.03, (t, share, expected)


# ---------------------------------------------------------------------------
# loading errors
# ---------------------------------------------------------------------------

def _copy_with_config(ckpt_dir, dest, **changes):
    os.makedirs(dest, exist_ok=True)
    shutil.copy(os.path.join(ckpt_dir, "model.safetensors"), dest)
    with open(os.path.join(ckpt_dir, "config.json")) as f:
        config = json.load(f)
    config.update(changes)
    with open(os.path.join(dest, "config.json"), "w") as f:
        json.dump(config, f)
    return str(dest)


@pytest.mark.parametrize("changes,pattern", [
    (dict(n_embd=128), r"does not match its config\.json: wte\.weight has shape \(64, 50257\), expected \(128, 50257\)"),
    (dict(vocab_size=50000), r"does not match its config\.json: wte\.weight has shape .*expected \(64, 50000\)"),
    (dict(n_positions=256), r"does not match its config\.json: wpe\.weight has shape \(128, 64\), expected \(256, 64\)"),
    (dict(n_layer=3), r"does not match its config\.json: \d+ tensors missing \(first: h\.2\."),
])
def test_mismatched_weights_raise_weights_error(tiny_ckpt, tmp_path, changes, pattern):
    bad = _copy_with_config(tiny_ckpt.path, tmp_path / "bad", **changes)
    with pytest.raises(WeightsError, match=pattern) as info:
        load_gpt(bad)
    assert "model.safetensors" in str(info.value)  # names the file
    assert "\n" not in str(info.value)


def test_weights_with_more_layers_than_config_raise(tiny_ckpt, tmp_path):
    bad = _copy_with_config(tiny_ckpt.path, tmp_path / "bad", n_layer=1)
    with pytest.raises(WeightsError, match=r"does not match its config\.json: it has \d+ tensors the config does "
                                           r"not describe \(first: h\.1\."):
        load_gpt(bad)


def test_n_embd_not_divisible_by_n_head(tiny_ckpt, tmp_path):
    bad = _copy_with_config(tiny_ckpt.path, tmp_path / "bad", n_head=5)
    with pytest.raises(WeightsError, match="not divisible by n_head 5"):
        load_gpt(bad)


def test_dir_without_weights(tmp_path, tiny_ckpt):
    shutil.copy(os.path.join(tiny_ckpt.path, "config.json"), tmp_path)
    with pytest.raises(WeightsError, match="neither model.safetensors nor pytorch_model.bin"):
        load_gpt(str(tmp_path))


def test_dir_without_config(tmp_path, tiny_ckpt):
    shutil.copy(os.path.join(tiny_ckpt.path, "model.safetensors"), tmp_path)
    with pytest.raises(WeightsError, match="has no config.json"):
        load_gpt(str(tmp_path))


def test_missing_directory(tmp_path):
    with pytest.raises(UserError, match="weights directory .*dir does not exist"):
        load_gpt(str(tmp_path / "no" / "such" / "dir"))


@pytest.mark.parametrize("content", [b"this is not a safetensors file", b"", "half"])
def test_corrupt_safetensors(tmp_path, tiny_ckpt, content):
    shutil.copy(os.path.join(tiny_ckpt.path, "config.json"), tmp_path)
    if content == "half":  # a download cut off in the middle
        with open(os.path.join(tiny_ckpt.path, "model.safetensors"), "rb") as f:
            data = f.read()
        content = data[:len(data) // 2]
    (tmp_path / "model.safetensors").write_bytes(content)
    with pytest.raises(WeightsError, match=r"cannot read weights .*model\.safetensors") as info:
        load_gpt(str(tmp_path))
    assert "\n" not in str(info.value)


def test_corrupt_pytorch_model_bin(tmp_path, tiny_ckpt):
    shutil.copy(os.path.join(tiny_ckpt.path, "config.json"), tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x02garbage")
    with pytest.raises(WeightsError, match=r"cannot read weights .*pytorch_model\.bin"):
        load_gpt(str(tmp_path))


@pytest.mark.parametrize("config_text,pattern", [("{not json", "cannot read"),
                                                 ('{"n_layer": 2}', "is not a GPT-2 config")])
def test_bad_config_json(tmp_path, tiny_ckpt, config_text, pattern):
    shutil.copy(os.path.join(tiny_ckpt.path, "model.safetensors"), tmp_path)
    (tmp_path / "config.json").write_text(config_text)
    with pytest.raises(WeightsError, match=pattern):
        load_gpt(str(tmp_path))
