"""Tests for model.py: parity with transformers' Phi-3, KV cache, LoRA (incl. PEFT round trip), loader errors,
the geometric-mixture sampler, and the real pretrained stories260K checkpoint. CPU, float32."""
import json
import struct
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model import (GPT, CheckpointError, GPTConfig, KVCache, config_from_hf, generate, next_token_logits,
                   sample_next, sequence_logprobs)

ASSETS = Path(__file__).parents[1] / ".." / "shared" / "assets"
V = 96


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: threads only add synchronisation (and on a shared 2-core machine, waiting)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def hf_phi3(n_kv_head, seed=0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.Phi3Config(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=n_kv_head, max_position_embeddings=128,
                                  pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
                                  initializer_range=0.1)
    return transformers.Phi3ForCausalLM(cfg).eval()


@pytest.fixture(scope="module", params=[4, 2], ids=["mha", "gqa"])
def pair(request, tmp_path_factory):
    """(HF model, our model loaded from its saved folder, folder)."""
    hf = hf_phi3(request.param)
    folder = tmp_path_factory.mktemp(f"phi3_kv{request.param}")
    hf.save_pretrained(folder)
    return hf, GPT.from_pretrained(folder), folder


def left_pad(prompts, pad=0):
    T = max(map(len, prompts))
    toks = torch.tensor([[pad] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    return toks, mask


PROMPTS = [[1, 5, 9, 14, 3, 7], [1, 40], [1, 22, 23, 24]]


# ---------------------------------------------------------------------------------------------------- parity
def test_logits_match_transformers(pair):
    hf, ours, _ = pair
    x = torch.randint(3, V, (2, 20))
    torch.testing.assert_close(ours(x), hf(x).logits, atol=1e-5, rtol=0)
    toks, mask = left_pad(PROMPTS)
    got, ref = ours(toks, attn_mask=mask), hf(toks, attention_mask=mask).logits
    torch.testing.assert_close(got[mask.bool()], ref[mask.bool()], atol=1e-5, rtol=0)


def test_sharded_checkpoint_loads_the_same(pair, tmp_path):
    hf, ours, _ = pair
    hf.save_pretrained(tmp_path, max_shard_size="50KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    x = torch.randint(3, V, (1, 12))
    assert torch.equal(GPT.from_pretrained(tmp_path)(x), ours(x))


def test_greedy_generation_matches_transformers(pair):
    hf, ours, _ = pair
    for p in PROMPTS:
        ref = hf.generate(torch.tensor([p]), max_new_tokens=16, min_new_tokens=16, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
        toks, attn, resp = generate(ours, [p], max_new_tokens=16, temperature=0)
        assert toks.tolist() == ref.tolist()
        assert resp.sum() == 16 and attn.all()


def test_batched_mixed_lengths_equal_one_by_one(pair):
    _, ours, _ = pair
    toks, attn, resp = generate(ours, PROMPTS, max_new_tokens=12, temperature=0)
    Tp = max(map(len, PROMPTS))
    for b, p in enumerate(PROMPTS):
        one, _, _ = generate(ours, [p], max_new_tokens=12, temperature=0)
        assert toks[b, Tp - len(p):].tolist() == one[0].tolist()
        assert attn[b].sum() == len(p) + 12 and resp[b, Tp:].all() and not resp[b, :Tp].any()


def test_kv_cache_equals_full_recompute(pair):
    _, ours, _ = pair
    toks, _, _ = generate(ours, PROMPTS, max_new_tokens=10, temperature=0)
    x, mask = left_pad(PROMPTS)
    for _ in range(10):    # no cache: rerun the whole sequence for every token
        nxt = ours(x, attn_mask=mask)[:, -1].argmax(-1, keepdim=True)
        x, mask = torch.cat([x, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    assert torch.equal(toks, x)
    # a cache filled in two prefill chunks gives the logits of one full pass
    cache = KVCache(ours.config, 1, 20)
    seq = torch.tensor([PROMPTS[0] + [11, 12, 13]])
    a, b = ours(seq[:, :4], cache), ours(seq[:, 4:], cache)
    torch.testing.assert_close(torch.cat([a, b], 1), ours(seq), atol=1e-5, rtol=0)


def test_stop_tokens_and_masks(pair):
    _, ours, _ = pair
    free, _, _ = generate(ours, PROMPTS, max_new_tokens=8, temperature=0)
    Tp = max(map(len, PROMPTS))
    stop = int(free[0, Tp + 2])                      # row 0 emits this as its 3rd new token
    toks, attn, resp = generate(ours, PROMPTS, max_new_tokens=8, temperature=0, stop_tokens=(stop,), pad_id=0)
    first = (free[0, Tp:] == stop).nonzero()[0].item()
    assert resp[0, Tp:].tolist() == [1] * (first + 1) + [0] * (7 - first)
    assert (toks[0, Tp + first + 1:] == 0).all() and toks.shape == (3, Tp + 8)
    assert torch.equal(attn[0, Tp:], resp[0, Tp:])


def test_sequence_logprobs_equals_slow_loop(pair):
    _, ours, _ = pair
    toks, attn, resp = generate(ours, PROMPTS, max_new_tokens=6, temperature=1.0,
                                generator=torch.Generator().manual_seed(0), stop_tokens=(5, 6, 7))
    got = sequence_logprobs(ours, toks, attn, resp)
    for b, p in enumerate(PROMPTS):
        seq = toks[b][attn[b].bool()]                 # the row without padding
        slow = 0.0
        for t in range(len(p), len(seq)):
            slow += ours(seq[None, :t])[0, -1].log_softmax(-1)[seq[t]].item()
        assert got[b].item() == pytest.approx(slow, abs=1e-4)
    got.sum().backward()                              # differentiable


# ---------------------------------------------------------------------------------------------------- LoRA
def randomize(model, name, seed=1, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.adapter_parameters(name):
            p.copy_(torch.randn(p.shape, generator=g) * scale)


@pytest.fixture
def fresh(pair):
    _, _, folder = pair
    return GPT.from_pretrained(folder)


def test_lora_fresh_adapter_is_noop_and_only_adapters_train(fresh):
    x = torch.randint(3, V, (2, 10))
    base = fresh(x)
    fresh.add_adapter("policy", r=4, alpha=8)
    fresh.set_adapter("policy")
    assert torch.equal(fresh(x), base)
    trainable = [n for n, p in fresh.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    before = {n: p.clone() for n, p in fresh.named_parameters()}
    opt = torch.optim.AdamW(fresh.adapter_parameters("policy"), lr=1e-2)
    F.cross_entropy(fresh(x).flatten(0, 1), x.flatten()).backward()
    opt.step()
    changed = {n for n, p in fresh.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)   # the base weights never move
    assert not torch.allclose(fresh(x), base)
    with fresh.adapter(None):
        assert torch.equal(fresh(x), base)                    # adapters off = the base = π_ref
    assert fresh.active_adapter == "policy"


def test_lora_merge_unmerge_and_switching(fresh):
    x = torch.randint(3, V, (2, 10))
    base = fresh(x)
    fresh.add_adapter("a", r=4, alpha=8)
    fresh.add_adapter("b", r=2, alpha=2, targets=("qkv_proj",))
    randomize(fresh, "a", 1), randomize(fresh, "b", 2)
    with fresh.adapter("a"):
        ya = fresh(x)
    with fresh.adapter("b"):
        yb = fresh(x)
    assert not torch.allclose(ya, yb) and not torch.allclose(ya, base)
    # per-row adapters: row 0 uses "b", row 1 the base
    rows = fresh(x, adapter_ids=torch.tensor([1, -1]))
    torch.testing.assert_close(rows, torch.stack([yb[0], base[1]]), atol=1e-5, rtol=0)
    W = fresh.model.layers[0].self_attn.qkv_proj.weight.clone()
    fresh.merge_adapter("a")
    torch.testing.assert_close(fresh(x), ya, atol=1e-5, rtol=0)
    with pytest.raises(RuntimeError, match="unmerge"):
        with fresh.adapter(None):
            fresh(x)
    fresh.unmerge_adapter("a")
    torch.testing.assert_close(fresh.model.layers[0].self_attn.qkv_proj.weight, W, atol=1e-6, rtol=0)
    fresh.set_adapter(None)
    torch.testing.assert_close(fresh(x), base, atol=1e-5, rtol=0)
    fresh.copy_adapter("a", "prev")
    with fresh.adapter("prev"):
        torch.testing.assert_close(fresh(x), ya, atol=1e-5, rtol=0)


def test_adapter_saved_in_peft_format_loads_in_peft(pair, tmp_path):
    peft = pytest.importorskip("peft")
    hf, _, folder = pair
    ours = GPT.from_pretrained(folder)
    ours.add_adapter("policy", r=4, alpha=16)
    randomize(ours, "policy")
    ours.save_adapter("policy", tmp_path / "ad")
    x = torch.randint(3, V, (2, 10))
    with ours.adapter("policy"):
        want = ours(x)
    hf_peft = peft.PeftModel.from_pretrained(hf_phi3(hf.config.num_key_value_heads), tmp_path / "ad").eval()
    hf_peft.load_state_dict(hf.state_dict(), strict=False)   # same base weights (the fixture's seed)
    torch.testing.assert_close(hf_peft(x).logits, want, atol=1e-5, rtol=0)
    # and back: our load_adapter reads the folder peft wrote
    hf_peft.save_pretrained(tmp_path / "from_peft")
    ours.load_adapter("peft_copy", tmp_path / "from_peft")
    with ours.adapter("peft_copy"):
        torch.testing.assert_close(ours(x), want, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------------- loader errors
def test_loader_errors(pair, tmp_path):
    hf, _, folder = pair
    with pytest.raises(CheckpointError, match="does not exist"):
        GPT.from_pretrained(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no config.json"):
        GPT.from_pretrained(tmp_path)
    sh = tmp_path / "sharded"
    hf.save_pretrained(sh, max_shard_size="50KB")
    shards = sorted(sh.glob("model-*-of-*.safetensors"))
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt.*download it again"):
        GPT.from_pretrained(sh)
    shards[1].unlink()
    with pytest.raises(CheckpointError, match="missing; re-run the download"):
        GPT.from_pretrained(sh)
    bad = tmp_path / "bad"
    hf.save_pretrained(bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 128}))
    with pytest.raises(CheckpointError, match="shape .* config.json and weights disagree"):
        GPT.from_pretrained(bad)
    long = {**cfg, "rope_parameters": None, "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 8}}
    (bad / "config.json").write_text(json.dumps(long))
    with pytest.raises(CheckpointError, match="longrope.*not supported"):
        GPT.from_pretrained(bad)


def test_hf_cache_layout(pair, tmp_path):
    _, ours, folder = pair
    repo = tmp_path / "models--microsoft--Phi-3-mini-4k-instruct"
    for rev in ("old", "abc123"):
        (repo / "snapshots" / rev).mkdir(parents=True)
        for f in folder.iterdir():
            (repo / "snapshots" / rev / f.name).symlink_to(f)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    x = torch.randint(3, V, (1, 8))
    for path in (tmp_path, repo, repo / "snapshots" / "old"):
        assert torch.equal(GPT.from_pretrained(path)(x), ours(x))


def test_config_both_spellings(tmp_path):
    old = dict(model_type="phi3", vocab_size=32064, num_hidden_layers=32, num_attention_heads=32, hidden_size=3072,
               num_key_value_heads=32, intermediate_size=8192, max_position_embeddings=4096, rope_theta=10000.0,
               rope_scaling=None, rms_norm_eps=1e-5, sliding_window=2047, torch_dtype="bfloat16",
               tie_word_embeddings=False, hidden_act="silu")
    new = {k: v for k, v in old.items() if k not in ("rope_theta", "rope_scaling", "torch_dtype")}
    new.update(dtype="bfloat16", rope_parameters=dict(rope_theta=10000.0, rope_type="default",
                                                      partial_rotary_factor=1.0))
    for i, d in enumerate([old, new]):
        (tmp_path / f"{i}.json").write_text(json.dumps(d))
        cfg = config_from_hf(tmp_path / f"{i}.json")
        assert cfg == GPTConfig(**{**GPTConfig.from_name("phi3-mini").__dict__, "block_size": 2047})


# ---------------------------------------------------------------------------------------------------- mixture
def test_geometric_mixture_sampler_matches_analytic(fresh):
    """allowed_tokens = 3 ids, 2 new tokens: 9 sequences. Exact mixture per token from full forward passes,
    (1-β) log π + β log μ renormalised over the allowed ids, vs the sampler's empirical frequencies."""
    fresh.add_adapter("policy", r=4, alpha=8)
    randomize(fresh, "policy", seed=3, scale=0.5)
    fresh.add_adapter("opp", r=4, alpha=8)
    randomize(fresh, "opp", seed=4, scale=0.5)
    prompt, allowed, beta = [1, 17, 30], torch.tensor([10, 20, 30]), 0.3

    def mix_probs(prefix, beta=beta):           # exact next-token mixture over `allowed`, no KV cache
        x = torch.tensor([prefix])
        with fresh.adapter("policy"):
            lp = fresh(x)[0, -1].log_softmax(-1)[allowed]
        with fresh.adapter("opp"):
            lq = fresh(x)[0, -1].log_softmax(-1)[allowed]
        return ((1 - beta) * lp + beta * lq).softmax(-1)
    def joint(beta):                            # (3, 3): P(y1, y2) = p(y1) p(y2 | y1)
        return torch.stack([mix_probs(prompt, beta)[i] * mix_probs(prompt + [int(a)], beta)
                            for i, a in enumerate(allowed)])
    exact, n = joint(beta), 4000
    tol = 4.5 * (0.25 / n) ** 0.5                                     # 4.5 sigma, sigma <= sqrt(1/4n)
    # the test has power: sampling the policy alone, or the opponent alone, would fail it
    assert (joint(0.0) - exact).abs().max() > 2 * tol and (joint(1.0) - exact).abs().max() > 2 * tol
    toks, _, _ = generate(fresh, [prompt] * n, max_new_tokens=2, temperature=1.0, adapter="policy",
                          mix_adapter="opp", mix_beta=beta, allowed_tokens=allowed,
                          generator=torch.Generator().manual_seed(0))
    ids = torch.bucketize(toks[:, -2:].contiguous(), allowed)          # (n, 2) in 0..2
    freq = torch.bincount(ids[:, 0] * 3 + ids[:, 1], minlength=9).float().view(3, 3) / n
    assert (freq - exact).abs().max() < tol
    # and the sampler's exact next-token logits for the first token
    with torch.no_grad(), fresh.adapter("policy"):
        lp = fresh(torch.tensor([prompt]))[:, -1]
    with torch.no_grad(), fresh.adapter("opp"):
        lq = fresh(torch.tensor([prompt]))[:, -1]
    bias = torch.full((V,), float("-inf"))
    bias[allowed] = 0
    got = next_token_logits(lp, lq, beta, bias).softmax(-1)[0, allowed]
    torch.testing.assert_close(got, mix_probs(prompt), atol=1e-6, rtol=0)


def test_top_p_and_greedy():
    logits = torch.tensor([[3.0, 2.0, 0.0, -1.0]]).log_softmax(-1)   # p ≈ .70, .26, .03, .01
    g = torch.Generator().manual_seed(0)
    assert sample_next(logits, 0.0, 1.0, g).item() == 0
    draws = torch.cat([sample_next(logits, 1.0, 0.9, g) for _ in range(300)])
    assert set(draws.tolist()) == {0, 1}                                # the nucleus of mass 0.9 is {0, 1}
    assert set(torch.cat([sample_next(logits, 1.0, 0.5, g) for _ in range(50)]).tolist()) == {0}


# ---------------------------------------------------------------------------------------------------- stories260K
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
    wq, wk, wv, wo = take(L, dim, dim), take(L, Hkv * hd, dim), take(L, Hkv * hd, dim), take(L, dim, dim)
    ffn_norm, w1, w2, w3, norm = take(L, dim), take(L, hidden, dim), take(L, dim, hidden), take(L, hidden, dim), take(dim)
    sd = {"model.embed_tokens.weight": emb, "model.norm.weight": norm, "lm_head.weight": emb}
    for i in range(L):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = attn_norm[i]
        sd[p + "post_attention_layernorm.weight"] = ffn_norm[i]
        sd[p + "self_attn.qkv_proj.weight"] = torch.cat([rope_perm(wq[i], H), rope_perm(wk[i], Hkv), wv[i]])
        sd[p + "self_attn.o_proj.weight"] = wo[i]
        sd[p + "mlp.gate_up_proj.weight"] = torch.cat([w1[i], w3[i]])
        sd[p + "mlp.down_proj.weight"] = w2[i]
    save_file({k: v.contiguous().clone() for k, v in sd.items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(dict(
        model_type="phi3", vocab_size=abs(vocab), hidden_size=dim, intermediate_size=hidden, num_hidden_layers=L,
        num_attention_heads=H, num_key_value_heads=Hkv, max_position_embeddings=seq, rms_norm_eps=1e-5,
        rope_theta=10000.0, tie_word_embeddings=False, hidden_act="silu")))


def decode_tok512(tok_path, ids):
    """llama2.c's decoder: pieces from tokenizer.bin, <0xXX> byte pieces, no leading space after BOS."""
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
    bin_path, tok_path = ASSETS / "stories260K" / "stories260K.bin", ASSETS / "stories260K" / "tok512.bin"
    readme = ASSETS / "README.md"
    if not (bin_path.exists() and tok_path.exists() and readme.exists()):
        pytest.skip("stories260K assets not found")
    published = readme.read_text().split("verbatim, the sample its author published:\n\n```\n")[1].split("```")[0]
    llama2c_to_phi3(bin_path, tmp_path)
    model = GPT.from_pretrained(tmp_path)
    toks, _, resp = generate(model, [[1]], max_new_tokens=200, temperature=0, stop_tokens=(1,))
    ids = toks[0][resp[0].bool()].tolist()
    text = decode_tok512(tok_path, [i for i in ids if i != 1])
    n = min(len(text), len(published.rstrip()))
    assert n > 300, "the published sample is ~330 characters; generate at least that many"
    assert text[:n] == published[:n], f"got:\n{text}\nwant:\n{published[:n]}"


def test_per_row_adapters_and_mixtures_equal_separate_calls(fresh):
    """One generate call with an adapter (and a mixture β) per row equals separate calls, one per setting:
    the batched path of LANA's two players and Nash-MD-PG's (y, y') pair samples what the plain path samples."""
    for name, seed in (("a", 1), ("b", 2)):
        fresh.add_adapter(name, r=4, alpha=8)
        randomize(fresh, name, seed=seed, scale=0.3)
    prompts = [[1, 5, 9, 33], [1, 7], [1, 2, 3, 4, 5, 6], [1, 90]]
    kw = dict(max_new_tokens=12, temperature=0.0)
    ga, gb, g0 = (generate(fresh, prompts, adapter=a, **kw)[0] for a in ("a", "b", None))
    rows = generate(fresh, prompts + prompts, adapter=["a", "b", None, "a", "b", None, "a", "b"], **kw)[0]
    assert torch.equal(rows, torch.stack([ga[0], gb[1], g0[2], ga[3], gb[0], g0[1], ga[2], gb[3]]))
    assert not torch.equal(ga, gb)                       # the adapters really differ
    mix4, mix2 = (generate(fresh, prompts, adapter="a", mix_adapter=None, mix_beta=b, **kw)[0] for b in (0.4, 0.2))
    rows = generate(fresh, prompts + prompts, adapter=["a"] * 8, mix_adapter=None,
                    mix_beta=[0.4, 0, 0.4, 0, 0.2, 0.4, 0.4, 0], **kw)[0]
    assert torch.equal(rows, torch.stack([mix4[0], ga[1], mix4[2], ga[3], mix2[0], mix4[1], mix4[2], ga[3]]))


def test_generate_rows_equal_the_full_batch_rows(fresh):
    """generate(rows=...) samples exactly the chosen rows of the full batch (same random numbers), so torchrun ranks
    that each generate their own slice reproduce a single process."""
    fresh.add_adapter("a", r=4, alpha=8)
    randomize(fresh, "a", seed=1, scale=0.3)
    prompts = [[1, 5, 9, 33], [1, 7], [1, 2, 3, 4, 5, 6], [1, 90]]
    kw = dict(max_new_tokens=10, temperature=1.0, adapter=["a", None, "a", None], mix_beta=[0.0, 0.0, 0.3, 0.0])
    full = generate(fresh, prompts, generator=torch.Generator().manual_seed(7), **kw)
    for rows in ([1, 3], [0, 2], [2]):
        part = generate(fresh, prompts, generator=torch.Generator().manual_seed(7), rows=rows, **kw)
        assert all(torch.equal(p, f[rows][:, -p.size(1):]) for p, f in zip(part, full))
        assert all(f[rows][:, :-p.size(1)].sum() == 0 for p, f in zip(part[1:], full[1:]))   # only padding cut
    # A slice whose rows all stop early still leaves the generator where the full batch leaves it.
    stop = (int(full[0][1, -8]),)
    g_full, g_part = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    full = generate(fresh, prompts, generator=g_full, stop_tokens=stop, **kw)
    part = generate(fresh, prompts, generator=g_part, stop_tokens=stop, rows=[1], **kw)
    assert part[2].sum() < 10 and torch.equal(part[0], full[0][[1]][:, -part[0].size(1):])
    assert torch.equal(g_full.get_state(), g_part.get_state())
