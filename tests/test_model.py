"""Tests of model.py: parity with transformers' Phi-3 (logits, greedy generation), the KV cache,
stop tokens and masks, sequence_logprobs, LoRA (adapters chosen per call or per row, merge, copy, a
gate that ignores the grad mode), the tiny preset's init, the geometric-mixture sampler, top-p,
row-local uniforms, non-finite logits, compiled decoding, and the real pretrained stories260K
checkpoint. CPU, float32.
Loading and saving (weights.py) are tested in test_weights.py, which reuses the fixtures below."""
import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model import (GPT, GPTConfig, KVCache, generate, left_pad, linear, prefill, sample_next,
                   sequence_logprobs)
from weights import load_model

ASSETS = Path(__file__).parents[1] / ".." / "shared" / "assets"
V = 96


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: threads only add synchronisation (and on a shared 2-core machine,
    waiting)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def hf_phi3(n_kv_head, seed=0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.Phi3Config(vocab_size=V, hidden_size=64, intermediate_size=96,
                                  num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=n_kv_head, max_position_embeddings=128,
                                  pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                  tie_word_embeddings=False, initializer_range=0.1)
    return transformers.Phi3ForCausalLM(cfg).eval()


@pytest.fixture(scope="module", params=[4, 2], ids=["mha", "gqa"])
def pair(request, tmp_path_factory):
    """(HF model, our model loaded from its saved folder, folder)."""
    hf = hf_phi3(request.param)
    folder = tmp_path_factory.mktemp(f"phi3_kv{request.param}")
    hf.save_pretrained(folder)
    return hf, load_model(folder)[0], folder


@pytest.fixture
def fresh(pair):
    """A model of its own, for tests that add adapters or change weights."""
    return load_model(pair[2])[0]


def randomize(model, name, seed=1, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.lora_parameters(name):
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def real_rows(tokens, mask):
    """Each row's real tokens (prompt + response) without padding: comparable across batch
    shapes."""
    return [t[m.bool()].tolist() for t, m in zip(tokens, mask)]


PROMPTS = [[1, 5, 9, 14, 3, 7], [1, 40], [1, 22, 23, 24]]


# -------------------------------------------------------------------------------------------------
# parity with transformers

def test_logits_match_transformers(pair):
    hf, ours, _ = pair
    x = torch.randint(3, V, (2, 20))
    torch.testing.assert_close(ours(x), hf(x).logits, atol=1e-5, rtol=0)
    toks, mask = left_pad(PROMPTS, 0)
    got = ours(toks, mask=mask)
    ref = hf(toks, attention_mask=mask).logits
    torch.testing.assert_close(got[mask.bool()], ref[mask.bool()], atol=1e-5, rtol=0)
    last, _ = prefill(ours, toks, mask, [None] * len(toks), toks.size(1))
    # the same math on fewer rows: MKL may block a 3-row matmul differently from an 18-row one
    # (measured: up to 6e-7 apart on this CPU), so equal to float32 round-off, not bit for bit
    torch.testing.assert_close(last, got[:, -1], atol=2e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1), (1, 3), (4, 1), (2, 4), (9, 1), (3, 5)])
def test_linear_is_x_w_transposed(shape, dtype):
    """model.linear (W xᵀ for a few float32 rows, one row doubled): F.linear's values and
    gradients to rounding, in any shape."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, 24, generator=g).to(dtype).requires_grad_()
    W = torch.randn(40, 24, generator=g).to(dtype).requires_grad_()
    y = linear(x, W)
    want = F.linear(x, W)
    assert y.shape == want.shape and y.is_contiguous()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(y, want, atol=tol, rtol=tol)
    dy = torch.randn(want.shape, generator=g).to(dtype)
    grads = torch.autograd.grad(y, (x, W), dy)
    for got, exp in zip(grads, torch.autograd.grad(want, (x, W), dy)):
        torch.testing.assert_close(got, exp, atol=tol * 10, rtol=tol)


def test_left_pad():
    toks, mask = left_pad([[1, 2, 3], [4]], pad_id=9, extra=2)
    assert toks.tolist() == [[1, 2, 3, 9, 9], [9, 9, 4, 9, 9]]
    assert mask.tolist() == [[1, 1, 1, 0, 0], [0, 0, 1, 0, 0]]


def test_greedy_generation_matches_transformers(pair):
    hf, ours, _ = pair
    for p in PROMPTS:
        ref = hf.generate(torch.tensor([p]), max_new_tokens=16, min_new_tokens=16,
                          do_sample=False, eos_token_id=None, pad_token_id=0)
        toks, mask, resp = generate(ours, [p], max_new_tokens=16, temperature=0)
        assert toks.tolist() == ref.tolist()
        assert resp.sum() == 16 and mask.all() and not resp[0, :len(p)].any()


def test_batched_mixed_lengths_equal_one_by_one(pair):
    _, ours, _ = pair
    toks, mask, resp = generate(ours, PROMPTS, max_new_tokens=12, temperature=0)
    Tp = max(map(len, PROMPTS))
    for b, p in enumerate(PROMPTS):
        one, _, _ = generate(ours, [p], max_new_tokens=12, temperature=0)
        pad = Tp - len(p)
        assert toks[b, pad:].tolist() == one[0].tolist()
        assert mask[b].sum() == len(p) + 12 and resp[b, Tp:].all() and not resp[b, :Tp].any()
        assert not toks[b, :pad].any() and not mask[b, :pad].any()     # left padding


def test_kv_cache_equals_full_recompute(pair):
    _, ours, _ = pair
    toks, _, _ = generate(ours, PROMPTS, max_new_tokens=10, temperature=0)
    x, mask = left_pad(PROMPTS, 0)
    for _ in range(10):    # no cache: rerun the whole sequence for every token
        nxt = ours(x, mask=mask)[:, -1].argmax(-1, keepdim=True)
        x = torch.cat([x, nxt], 1)
        mask = torch.cat([mask, torch.ones_like(nxt)], 1)
    assert torch.equal(toks, x)
    # a cache filled in two prefill chunks gives the logits of one full pass
    cache = KVCache(ours.config, 1, 20, "cpu", torch.float32)
    seq = torch.tensor([PROMPTS[0] + [11, 12, 13]])
    a = ours(seq[:, :4], cache=cache)
    b = ours(seq[:, 4:], cache=cache)
    torch.testing.assert_close(torch.cat([a, b], 1), ours(seq), atol=1e-5, rtol=0)
    # the same for a left-padded batch, cut where one row is still all padding
    toks, mask = left_pad(PROMPTS, 0)
    cache = KVCache(ours.config, 3, 20, "cpu", torch.float32)
    a = ours(toks[:, :3], cache=cache, mask=mask[:, :3])
    b = ours(toks[:, 3:], cache=cache, mask=mask[:, 3:])
    full = ours(toks, mask=mask)
    real = mask.bool()
    torch.testing.assert_close(torch.cat([a, b], 1)[real], full[real], atol=1e-5, rtol=0)


def test_sequences_longer_than_block_size_are_refused(pair):
    _, ours, _ = pair
    with pytest.raises(ValueError, match="block_size"):
        ours(torch.ones(1, ours.config.block_size + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="block_size"):
        generate(ours, [[1] * (ours.config.block_size - 4)], max_new_tokens=8)


def test_stop_tokens_and_masks(pair):
    """A row ends at its first stop token (kept in resp, pad after it); when every row has stopped,
    the returned width ends at the last column any row used."""
    _, ours, _ = pair
    N, Tp = 12, max(map(len, PROMPTS))
    free, free_mask, _ = generate(ours, PROMPTS, max_new_tokens=N, temperature=0)
    only_row0 = next(int(t) for t in free[0, Tp:] if t not in free[1, Tp:])
    for stop in [(only_row0,),                                  # row 0 stops, row 1 runs to N
                 tuple({int(t) for t in free[:, Tp + 1]})]:     # every row stops by its 2nd token
        toks, mask, resp = generate(ours, PROMPTS, max_new_tokens=N, temperature=0,
                                    stop_ids=stop, pad_id=0)
        lens = [next((j + 1 for j in range(N) if int(free[b, Tp + j]) in stop), N)
                for b in range(3)]
        width = max(lens)
        assert toks.shape == mask.shape == resp.shape == (3, Tp + width)
        for b, n in enumerate(lens):
            assert resp[b, Tp:].tolist() == [1] * n + [0] * (width - n)
            assert torch.equal(toks[b, :Tp + n], free[b, :Tp + n]) and not toks[b, Tp + n:].any()
            assert torch.equal(mask[b, Tp:], resp[b, Tp:])
            assert torch.equal(mask[b, :Tp], free_mask[b, :Tp])
            assert not resp[b, :Tp].any()
        assert lens[0] < N and (lens[1] == N if stop == (only_row0,) else width <= 2)


def test_sequence_logprobs_equals_slow_loop(pair):
    _, ours, _ = pair
    toks, mask, resp = generate(ours, PROMPTS, max_new_tokens=6, temperature=1.0,
                                generator=torch.Generator().manual_seed(0), stop_ids=(5, 6, 7))
    got = sequence_logprobs(ours, toks, mask, resp)
    for b, p in enumerate(PROMPTS):
        seq = toks[b][mask[b].bool()]                 # the row without padding
        slow = sum(ours(seq[None, :t])[0, -1].log_softmax(-1)[seq[t]].item()
                   for t in range(len(p), len(seq)))
        assert got[b].item() == pytest.approx(slow, abs=1e-4)
    got.sum().backward()                              # differentiable


def test_sequence_logprobs_with_vocab_is_the_constrained_law(pair):
    """With vocab, log π(y|x) renormalises each next-token law over those ids: the law
    generate(vocab=) samples from."""
    _, ours, _ = pair
    vocab = [3, 10, 20, 30, 41]
    toks, mask, resp = generate(ours, PROMPTS, max_new_tokens=5, temperature=1.0, vocab=vocab,
                                generator=torch.Generator().manual_seed(1))
    assert set(toks[resp.bool()].tolist()) <= set(vocab)
    got = sequence_logprobs(ours, toks, mask, resp, vocab=vocab)
    for b, p in enumerate(PROMPTS):
        seq = toks[b][mask[b].bool()]
        slow = sum(ours(seq[None, :t])[0, -1, vocab].log_softmax(-1)[vocab.index(int(seq[t]))]
                   .item() for t in range(len(p), len(seq)))
        assert got[b].item() == pytest.approx(slow, abs=1e-4)
    unconstrained = sequence_logprobs(ours, toks, mask, resp)
    assert (got > unconstrained).all()                # renormalised: strictly more likely


def test_sequence_logprobs_vocab_is_a_set_of_allowed_ids(pair):
    """The constrained law depends on the set of ids only (a repeated id is not counted twice), and
    a response token outside vocab has probability 0 under it: log π = -inf, or a ValueError, never
    a finite number."""
    _, ours, _ = pair
    toks, mask = left_pad([[1, 5, 10, 20], [1, 7, 10, 50]], 0)
    resp = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1]])
    once = sequence_logprobs(ours, toks[:1], mask[:1], resp[:1], vocab=[10, 20, 30])
    twice = sequence_logprobs(ours, toks[:1], mask[:1], resp[:1], vocab=[10, 20, 20, 30])
    torch.testing.assert_close(twice, once, atol=1e-6, rtol=0)
    try:                                              # row 1 holds 50: not allowed
        outside = sequence_logprobs(ours, toks, mask, resp, vocab=[10, 20, 30])[1].item()
    except ValueError:
        return
    assert outside == float("-inf")


# -------------------------------------------------------------------------------------------------
# LoRA

def test_lora_fresh_adapter_is_noop_and_only_adapters_train(fresh):
    x = torch.randint(3, V, (2, 10))
    base = fresh(x)
    fresh.add_adapter("policy", r=4, alpha=8)
    fresh.add_adapter("other", r=2, alpha=4)
    assert torch.equal(fresh(x, adapters="policy"), base)
    assert torch.equal(fresh(x, adapters=["other", None]), base)
    trainable = [n for n, p in fresh.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    before = {n: p.clone() for n, p in fresh.named_parameters()}
    opt = torch.optim.AdamW(fresh.lora_parameters("policy"), lr=1e-2)
    F.cross_entropy(fresh(x, adapters="policy").flatten(0, 1), x.flatten()).backward()
    opt.step()
    changed = {n for n, p in fresh.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.endswith(".policy") for n in changed)  # the base, "other" never move
    assert any(".lora_B." in n for n in changed)
    assert not torch.allclose(fresh(x, adapters="policy"), base)
    assert torch.equal(fresh(x), base)                      # adapters=None: the base = π_ref


def test_lora_adapter_argument_is_checked(fresh):
    fresh.add_adapter("a", r=2, alpha=2)
    x = torch.randint(3, V, (2, 5))
    for bad in ("nope", ["a"], ["a", None, None], ["a", "nope"]):
        with pytest.raises(ValueError, match="adapter"):
            fresh(x, adapters=bad)
    # the last two: nn.ParameterDict methods
    for bad in ("a", "not an identifier", 3, "copy", "values"):
        with pytest.raises(ValueError, match="adapter name"):
            fresh.add_adapter(bad)
    assert list(fresh.adapters) == ["a"]


def test_lora_gate_does_not_depend_on_the_grad_mode(fresh):
    """lora_gate's result is set by its arguments alone: the same call under torch.no_grad() and
    with grad enabled gives the same names, gate and stacked weights (stack=True, what generate
    builds once for every decode step; stack=False: none, each layer stacks its own), and the model
    computes the same logits from any of them."""
    fresh.add_adapter("a", r=4, alpha=8)
    fresh.add_adapter("b", r=2, alpha=6)
    randomize(fresh, "a", 1), randomize(fresh, "b", 2)
    rows = ["a", None, "b"]
    x = torch.randint(3, V, (3, 7))
    want = fresh(x, adapters=rows)
    for stack in (False, True):
        with torch.no_grad():
            off = fresh.lora_gate(rows, 3, stack=stack)
        on = fresh.lora_gate(rows, 3, stack=stack)
        assert off[0] == on[0] == ["a", "b"]
        assert torch.equal(off[1], on[1])
        assert off[1][:, 0].tolist() == [[2.0] * 4 + [0.0] * 2, [0.0] * 6, [0.0] * 4 + [3.0] * 2]
        assert off[2].keys() == on[2].keys()
        assert len(off[2]) == (len(fresh.lora_layers()) if stack else 0)
        for layer in off[2]:
            assert all(torch.equal(p, q) for p, q in zip(off[2][layer], on[2][layer]))
        for gate in (off, on):
            for grad in (False, True):
                with torch.set_grad_enabled(grad):
                    assert torch.equal(fresh(x, adapters=gate), want)
    with torch.no_grad():
        assert fresh.lora_gate(None, 3) is None and fresh.lora_gate([None] * 3, 3) is None


def test_two_adapters_in_one_batch_equal_separate_calls(fresh):
    """adapters=["a", "b", None]: each row computes what it computes alone (LANA's two players in
    one forward pass)."""
    fresh.add_adapter("a", r=4, alpha=8)
    fresh.add_adapter("b", r=2, alpha=2)
    randomize(fresh, "a", 1), randomize(fresh, "b", 2)
    toks, mask = left_pad(PROMPTS, 0)
    ya, yb, y0 = (fresh(toks, adapters=a, mask=mask) for a in ("a", "b", None))
    assert not torch.allclose(ya, yb) and not torch.allclose(ya, y0)
    assert not torch.allclose(yb, y0)
    rows = fresh(toks, adapters=["a", "b", None], mask=mask)
    want = torch.stack([ya[0], yb[1], y0[2]])
    torch.testing.assert_close(rows[mask.bool()], want[mask.bool()], atol=1e-6, rtol=0)
    resp = mask.clone()
    resp[:, :3] = 0
    lp = sequence_logprobs(fresh, toks, mask, resp, adapters=["a", "b", None])
    sep = [sequence_logprobs(fresh, toks, mask, resp, adapters=a)[b]
           for b, a in enumerate(("a", "b", None))]
    torch.testing.assert_close(lp, torch.stack(sep), atol=1e-5, rtol=0)


def test_lora_delta_folds_an_adapter_into_the_base(fresh):
    """W + lora_delta(layer, "a") in every layer is the base with "a" merged: it computes what the
    adapter run computes; an unknown adapter is refused."""
    x = torch.randint(3, V, (2, 10))
    fresh.add_adapter("a", r=4, alpha=8)
    fresh.add_adapter("b", r=2, alpha=6)
    randomize(fresh, "a", 1), randomize(fresh, "b", 2)
    ya = fresh(x, adapters="a")
    layers = fresh.lora_layers()
    want = [m.weight + 8 / 4 * m.lora_B["a"] @ m.lora_A["a"] for m in layers]
    with torch.no_grad():
        for m, w in zip(layers, want):
            delta = fresh.lora_delta(m, "a")
            torch.testing.assert_close(m.weight + delta, w, atol=1e-6, rtol=0)
            m.weight += delta
    torch.testing.assert_close(fresh(x), ya, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="nope"):
        fresh.lora_delta(layers[0], "nope")


def test_copy_adapter(fresh):
    x = torch.randint(3, V, (2, 10))
    fresh.add_adapter("a", r=4, alpha=8)
    randomize(fresh, "a", 1)
    ya = fresh(x, adapters="a")
    fresh.copy_adapter("a", "prev")                             # INPO's frozen previous iterate
    assert fresh.adapters["prev"] == fresh.adapters["a"]
    torch.testing.assert_close(fresh(x, adapters="prev"), ya, atol=1e-6, rtol=0)
    randomize(fresh, "a", 5)                                    # values copied, not shared
    torch.testing.assert_close(fresh(x, adapters="prev"), ya, atol=1e-6, rtol=0)
    fresh.copy_adapter("a", "prev")                             # onto an existing one: overwrite
    pairs = list(zip(fresh.lora_parameters("a"), fresh.lora_parameters("prev")))
    assert all(torch.equal(p, q) for p, q in pairs)
    assert all(p.data_ptr() != q.data_ptr() for p, q in pairs)


def test_an_unused_adapter_cannot_change_other_rows(fresh):
    """The logits of rows that use adapter "b" (or the base) do not depend on the values of adapter
    "a", which no row uses: a diverged (NaN) adapter must not turn every other adapter's logits
    into NaN."""
    fresh.add_adapter("a", r=4, alpha=8)
    fresh.add_adapter("b", r=2, alpha=2)
    randomize(fresh, "b", 2)
    x = torch.randint(3, V, (2, 10))
    want = fresh(x, adapters=["b", None])
    with torch.no_grad():
        for p in fresh.lora_parameters("a"):
            p.fill_(float("nan"))
    torch.testing.assert_close(fresh(x, adapters=["b", None]), want, atol=1e-6, rtol=0)


def test_shared_prompts_give_the_same_logprobs_and_gradients(fresh):
    """sequence_logprobs(shared=True) runs each distinct (prompt, adapter) once: on
    sampled rows with repeated prompts of different lengths (one of a single token), per-row
    adapters and a stop token (padding after it), its log-probs and gradients equal the full
    forward's."""
    fresh.add_adapter("a", r=4, alpha=8)
    fresh.add_adapter("b", r=2, alpha=2)
    randomize(fresh, "a", 1), randomize(fresh, "b", 2)
    prompts = [PROMPTS[0], PROMPTS[2], PROMPTS[0], PROMPTS[2], PROMPTS[0], [1, 7], [4]]
    adapters = ["a", "a", "a", "b", None, "b", "a"]
    tokens, mask, resp = generate(fresh, prompts, 6, adapters=adapters, stop_ids=(5, 9, 14),
                                  generator=torch.Generator().manual_seed(3))
    assert (mask[:, -1] == 0).any() and resp[:, -1].any()       # a row stopped, another did not
    out = []
    for shared in (False, True):
        fresh.zero_grad()
        lp = sequence_logprobs(fresh, tokens, mask, resp, adapters, shared=shared)
        (lp * torch.arange(1.0, 8.0)).sum().backward()
        grads = [p.grad.clone() for a in ("a", "b") for p in fresh.lora_parameters(a)]
        out.append((lp.detach(), grads))
    torch.testing.assert_close(out[1][0], out[0][0], atol=1e-5, rtol=0)
    for g1, g0 in zip(out[1][1], out[0][1]):
        torch.testing.assert_close(g1, g0, atol=1e-5, rtol=1e-4)


def test_gradient_checkpointing_gives_the_same_gradients(fresh):
    fresh.add_adapter("a", r=4, alpha=8)
    randomize(fresh, "a", 1)
    toks, mask, resp = generate(fresh, PROMPTS, 4, temperature=0, adapters="a")
    grads = []
    for on in (False, True):
        fresh.checkpointing = on
        fresh.zero_grad()
        sequence_logprobs(fresh, toks, mask, resp, adapters="a").sum().backward()
        grads.append([p.grad.clone() for p in fresh.lora_parameters("a")])
    assert all(torch.allclose(g, h, atol=1e-6, rtol=0) for g, h in zip(*grads))
    assert any(g.abs().sum() > 0 for g in grads[0])


def test_tiny_preset_has_a_wide_output_layer():
    """The tiny preset draws lm_head with std 0.06 (GPTConfig.head_std; every other weight with
    GPT-2's 0.02), so that the toy players can express a policy sharper than ~4:1."""
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name("tiny"))
    assert GPTConfig().head_std == 0.02 and model.config.head_std == 0.06
    assert model.lm_head.weight.std().item() == pytest.approx(0.06, rel=0.03)
    for m in (model.model.embed_tokens, model.model.layers[0].mlp.down_proj):
        assert m.weight.std().item() == pytest.approx(0.02, rel=0.03)


# -------------------------------------------------------------------------------------------------
# sampling: the geometric mixture, top-p, uniforms

def test_geometric_mixture_sampler_matches_exact_enumeration(fresh):
    """vocab = 3 ids, 2 new tokens: 9 sequences. The exact law, per token (1-β) log π + β log μ
    renormalised over vocab from full forward passes, against (1) the sampler's frequencies and
    (2) with given uniforms, the inverse-CDF draw that law makes, row by row."""
    fresh.add_adapter("policy", r=4, alpha=8)
    randomize(fresh, "policy", seed=3, scale=0.5)
    fresh.add_adapter("opp", r=4, alpha=8)
    randomize(fresh, "opp", seed=4, scale=0.5)
    prompt, vocab, beta = [1, 17, 30], [10, 20, 30], 0.3

    def mix_probs(prefix, beta):                 # exact next-token mixture over vocab, no KV cache
        x = torch.tensor([prefix])
        lp = fresh(x, adapters="policy")[0, -1].log_softmax(-1)[vocab]
        lq = fresh(x, adapters="opp")[0, -1].log_softmax(-1)[vocab]
        return ((1 - beta) * lp + beta * lq).softmax(-1).detach()

    def joint(beta):                             # (3, 3): P(y1, y2) = p(y1) p(y2 | y1)
        first = mix_probs(prompt, beta)
        return torch.stack([first[i] * mix_probs(prompt + [a], beta)
                            for i, a in enumerate(vocab)])
    exact, n = joint(beta), 4000
    tol = 4.5 * (0.25 / n) ** 0.5                # 4.5 sigma, sigma <= sqrt(1/4n)
    # the test has power: sampling the policy alone, or the opponent alone, would fail it
    assert (joint(0.0) - exact).abs().max() > 2 * tol
    assert (joint(1.0) - exact).abs().max() > 2 * tol
    kw = dict(max_new_tokens=2, temperature=1.0, adapters="policy", mix_adapter="opp",
              mix_beta=beta, vocab=vocab)
    toks, _, _ = generate(fresh, [prompt] * n, generator=torch.Generator().manual_seed(0), **kw)
    ids = torch.bucketize(toks[:, -2:].contiguous(), torch.tensor(vocab))   # (n, 2) in 0..2
    freq = torch.bincount(ids[:, 0] * 3 + ids[:, 1], minlength=9).float().view(3, 3) / n
    assert (freq - exact).abs().max() < tol
    # (2) row by row: y1 is the first id whose cumulative probability exceeds u1, then y2 | y1
    # from u2
    u = torch.rand(300, 2, generator=torch.Generator().manual_seed(1))
    toks, _, _ = generate(fresh, [prompt] * 300, uniforms=u, **kw)

    def inverse_cdf(beta):                       # (300, 2) ids, and rows within 1e-4 of a boundary
        cdf1 = mix_probs(prompt, beta).cumsum(0)
        cdf2 = {a: mix_probs(prompt + [a], beta).cumsum(0) for a in vocab}
        y1 = [vocab[int(torch.searchsorted(cdf1, u1, right=True))] for u1 in u[:, 0]]
        y2 = [vocab[int(torch.searchsorted(cdf2[a], u2, right=True))]
              for a, u2 in zip(y1, u[:, 1])]
        near = [min((cdf1 - u1).abs().min(), (cdf2[a] - u2).abs().min()) < 1e-4
                for a, u1, u2 in zip(y1, *u.T)]
        return torch.tensor([y1, y2]).T, torch.tensor(near)
    want, near = inverse_cdf(beta)
    assert near.sum() < 10 and torch.equal(toks[~near, -2:], want[~near])
    assert not torch.equal(inverse_cdf(0.0)[0], want)
    assert not torch.equal(inverse_cdf(1.0)[0], want)


def test_per_row_adapters_and_mixtures_equal_separate_calls(fresh):
    """One generate call with an adapter (and a mixture β) per row equals separate calls, one per
    setting: the batched path of LANA's two players and Nash-MD-PG's (y, y') pair samples what the
    plain path samples."""
    for name, seed in (("a", 1), ("b", 2)):
        fresh.add_adapter(name, r=4, alpha=8)
        randomize(fresh, name, seed=seed, scale=0.3)
    prompts = [[1, 5, 9, 33], [1, 7], [1, 2, 3, 4, 5, 6], [1, 90]]
    kw = dict(max_new_tokens=12, temperature=0.0)
    ga, gb, g0 = (generate(fresh, prompts, adapters=a, **kw)[0] for a in ("a", "b", None))
    adapters = ["a", "b", None, "a", "b", None, "a", "b"]
    rows = generate(fresh, prompts + prompts, adapters=adapters, **kw)[0]
    assert torch.equal(rows, torch.stack([ga[0], gb[1], g0[2], ga[3], gb[0], g0[1], ga[2], gb[3]]))
    assert not torch.equal(ga, gb)                       # the adapters really differ
    mix4, mix2 = (generate(fresh, prompts, adapters="a", mix_adapter=None, mix_beta=b, **kw)[0]
                  for b in (0.4, 0.2))
    assert not torch.equal(mix4, ga)                     # ... and so does the mixture
    rows = generate(fresh, prompts + prompts, adapters=["a"] * 8, mix_adapter=None,
                    mix_beta=[0.4, 0, 0.4, 0, 0.2, 0.4, 0.4, 0], **kw)[0]
    want = [mix4[0], ga[1], mix4[2], ga[3], mix2[0], mix4[1], mix4[2], ga[3]]
    assert torch.equal(rows, torch.stack(want))


def test_uniforms_make_each_row_independent_of_the_batch(fresh):
    """Row b's sample depends only on its prompt, its settings and its uniforms u[b]: generated
    alone, or with any other rows, it is the same (torchrun ranks that each sample a slice
    reproduce a single process)."""
    for name, seed in (("a", 1), ("b", 2)):
        fresh.add_adapter(name, r=4, alpha=8)
        randomize(fresh, name, seed=seed, scale=0.3)
    prompts = [[1, 5, 9, 33], [1, 7], [1, 2, 3, 4, 5, 6], [1, 90], [1, 61, 62]]
    adapters, betas = ["a", None, "b", "a", None], [0.0, 0.0, 0.3, 0.5, 0.0]
    u = torch.rand(5, 10, generator=torch.Generator().manual_seed(7))
    kw = dict(max_new_tokens=10, temperature=1.0, top_p=0.95, mix_adapter="b",
              stop_ids=(17, 23, 42, 51))

    def run(rows):
        t, m, r = generate(fresh, [prompts[b] for b in rows], adapters=[adapters[b] for b in rows],
                           mix_beta=[betas[b] for b in rows], uniforms=u[rows], **kw)
        return real_rows(t, m), r.sum(1).tolist()
    full_rows, full_lens = run([0, 1, 2, 3, 4])
    for rows in ([1, 3], [4, 0, 2], [2], [3]):
        part_rows, part_lens = run(rows)
        assert part_rows == [full_rows[b] for b in rows]
        assert part_lens == [full_lens[b] for b in rows]
    assert len(set(map(tuple, full_rows))) == 5


def test_top_p_and_greedy():
    logits = torch.tensor([[3.0, 2.0, 0.0, -1.0]])                  # p ≈ .70, .26, .03, .01
    p = logits.softmax(-1)[0]
    n = 1000
    u = (torch.arange(n) + 0.5) / n                 # a uniform grid: draws by inverse CDF

    def draws(top_p, lg=logits, temperature=1.0):
        ids = sample_next(lg.expand(n, -1), u, temperature, top_p)
        return torch.bincount(ids, minlength=lg.size(1))
    assert draws(1.0).tolist() == pytest.approx((n * p).tolist(), abs=1.01)
    assert draws(0.9)[2:].sum() == 0                        # the nucleus of mass 0.9: {0, 1}
    assert draws(0.9)[0] == pytest.approx(float(n * p[0] / (p[0] + p[1])), abs=1.01)
    assert draws(0.5).tolist() == [n, 0, 0, 0]                      # the nucleus of mass 0.5: {0}
    # boundary: p = 1/4 each (exact in float); the mass before the third token is 0.5 == top_p:
    # dropped
    assert sorted(draws(0.5, torch.zeros(1, 4)).tolist()) == [0, 0, n // 2, n // 2]
    c = sorted(draws(0.75, torch.zeros(1, 4)).tolist())  # mass before the 4th: 0.75, dropped
    assert c[0] == 0 and all(abs(k - n / 3) < 1.01 for k in c[1:])
    p2 = (logits / 2).softmax(-1)[0]                                # temperature 2
    assert draws(1.0, temperature=2.0).tolist() == pytest.approx((n * p2).tolist(), abs=1.01)
    greedy = sample_next(torch.tensor([[0.1, 2.0, -1.0], [5.0, 2.0, -1.0]]), torch.rand(2), 0)
    assert greedy.tolist() == [1, 0]


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None,
                    reason="torch.compile needs g++ here")
def test_compiled_decoding_samples_what_eager_samples():
    """generate(compile=True) (torch.compile of decode_step; the one compiling test, ~10 s) draws
    the tokens that eager decoding draws: left-padded prompts, per-row adapters, a mixed row and
    its twin, a stop id. Training the adapter between two calls is seen: the weights are inputs of
    the compiled graph."""
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name("tiny")).eval()                # GQA: 4 heads, 2 KV heads
    model.add_adapter("a", r=4, alpha=8)
    randomize(model, "a", seed=3, scale=0.3)
    u = torch.rand(3, 12, generator=torch.Generator().manual_seed(5))
    kw = dict(adapters=["a", None, "a"], mix_beta=[0.0, 0.0, 0.5], temperature=1.0, uniforms=u,
              stop_ids=(7,))
    prompts = [[1, 5, 9], [1, 40, 41, 42, 43, 44], [1, 22]]
    runs = []
    for step in range(2):
        eager, comp = (generate(model, prompts, 12, compile=c, **kw) for c in (False, True))
        assert all(torch.equal(e, c) for e, c in zip(eager, comp))
        runs.append(eager[0])
        with torch.no_grad():
            model.lora_parameters("a")[1].mul_(-3.0)               # a "training step" on one B
    assert not torch.equal(*runs)                                  # ... which changed the samples


def test_non_finite_logits_raise(fresh):
    """NaN/inf weights make generate raise FloatingPointError (not an IndexError, not garbage
    tokens)."""
    fresh.add_adapter("a", r=4, alpha=8)
    with torch.no_grad():
        for p in fresh.lora_parameters("a")[1::2]:                  # every B
            p.fill_(float("inf"))
    for kw in (dict(adapters="a"), dict(adapters=["a", None]), dict(mix_adapter="a", mix_beta=0.5),
               dict(adapters="a", temperature=0), dict(adapters="a", vocab=[3, 4, 5], top_p=0.9)):
        with pytest.raises(FloatingPointError):
            generate(fresh, [[1, 5], [1, 6, 7]], 4, **kw)
    generate(fresh, [[1, 5], [1, 6, 7]], 4)                         # the base is fine
    with torch.no_grad():
        fresh.lm_head.weight[7] = float("nan")
    for kw in (dict(), dict(temperature=0), dict(vocab=[3, 7, 9]), dict(stop_ids=(3,))):
        with pytest.raises(FloatingPointError):
            generate(fresh, [[1, 5], [1, 6, 7]], 9, **kw)


# -------------------------------------------------------------------------------------------------
# stories260K: a real pretrained checkpoint

def llama2c_to_phi3(bin_path, out):
    """Convert llama2.c's stories260K.bin to a Phi-3 folder (config.json + model.safetensors)."""
    from safetensors.torch import save_file
    raw = bin_path.read_bytes()
    dim, hidden, L, H, Hkv, vocab, seq = struct.unpack("<7i", raw[:28])
    w = torch.frombuffer(bytearray(raw[28:]), dtype=torch.float32)
    hd, off = dim // H, 0

    def take(*shape):
        nonlocal off
        n = torch.Size(shape).numel()
        t = w[off:off + n].view(shape)
        off += n
        return t

    def rope_perm(t, heads):   # interleaved (llama2.c) -> rotate-half (HF) rows within each head
        return t.view(heads, hd // 2, 2, dim).transpose(1, 2).reshape(heads * hd, dim)
    emb, attn_norm = take(abs(vocab), dim), take(L, dim)
    wq, wk = take(L, dim, dim), take(L, Hkv * hd, dim)
    wv, wo = take(L, Hkv * hd, dim), take(L, dim, dim)
    ffn_norm, w1 = take(L, dim), take(L, hidden, dim)
    w2, w3 = take(L, dim, hidden), take(L, hidden, dim)
    norm = take(dim)
    sd = {"model.embed_tokens.weight": emb, "model.norm.weight": norm, "lm_head.weight": emb}
    for i in range(L):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = attn_norm[i]
        sd[p + "post_attention_layernorm.weight"] = ffn_norm[i]
        qkv = [rope_perm(wq[i], H), rope_perm(wk[i], Hkv), wv[i]]
        sd[p + "self_attn.qkv_proj.weight"] = torch.cat(qkv)
        sd[p + "self_attn.o_proj.weight"] = wo[i]
        sd[p + "mlp.gate_up_proj.weight"] = torch.cat([w1[i], w3[i]])
        sd[p + "mlp.down_proj.weight"] = w2[i]
    save_file({k: v.contiguous().clone() for k, v in sd.items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(dict(
        model_type="phi3", vocab_size=abs(vocab), hidden_size=dim, intermediate_size=hidden,
        num_hidden_layers=L, num_attention_heads=H, num_key_value_heads=Hkv,
        max_position_embeddings=seq, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=False, hidden_act="silu")))


def decode_tok512(tok_path, ids):
    """llama2.c's decoder: pieces from tokenizer.bin, <0xXX> byte pieces, no leading space after
    BOS."""
    raw, vocab, off = tok_path.read_bytes(), [], 4
    while off < len(raw):
        _, n = struct.unpack("<fi", raw[off:off + 8])
        vocab.append(raw[off + 8:off + 8 + n])
        off += 8 + n
    out, prev = b"", 1
    for t in ids:
        piece = vocab[t]
        if prev == 1 and piece.startswith(b" "):
            piece = piece[1:]
        if piece.startswith(b"<0x") and piece.endswith(b">") and len(piece) == 6:
            piece = bytes([int(piece[3:5], 16)])
        out, prev = out + piece, t
    return out.decode("utf-8", errors="replace")


def test_stories260k_reproduces_published_sample(tmp_path):
    folder = ASSETS / "stories260K"
    bin_path, tok_path = folder / "stories260K.bin", folder / "tok512.bin"
    readme = ASSETS / "README.md"
    if not (bin_path.exists() and tok_path.exists() and readme.exists()):
        pytest.skip("stories260K assets not found")
    published = readme.read_text().split("verbatim, the sample its author published:\n\n```\n")[1]
    published = published.split("```")[0]
    llama2c_to_phi3(bin_path, tmp_path)
    model, _ = load_model(tmp_path)
    toks, _, resp = generate(model, [[1]], max_new_tokens=200, temperature=0, stop_ids=(1,))
    ids = toks[0][resp[0].bool()].tolist()
    text = decode_tok512(tok_path, [i for i in ids if i != 1])
    n = min(len(text), len(published.rstrip()))
    assert n > 300, "the published sample is ~330 characters; generate at least that many"
    assert text[:n] == published[:n], f"got:\n{text}\nwant:\n{published[:n]}"
