"""
model.py: Phi-3 in one file, with hand-written LoRA adapters and a KV-cached batched sampler.

    model = GPT(GPTConfig.from_name("tiny"))         # or weights.load_phi3(folder) for the real checkpoint
    model.add_adapter("policy", r=16, alpha=32)
    logits = model(idx, adapters="policy")           # (B, T, V); adapters=None is the base model
    tokens, mask, resp = generate(model, prompts, 128, adapters=["p1", "p2"], uniforms=u)
    logp = sequence_logprobs(model, tokens, mask, resp, adapters="policy")      # (B,) log π(y|x)

Which adapter runs is an argument of every call (a name, None, or one per row), like the KV cache: no module
state says "the active adapter". One base in memory therefore serves every role: adapters off is the base
model, several adapters run side by side in one batch, and a new adapter (B = 0) is an exact no-op.
Module names are the checkpoint's own (model.layers.{i}.self_attn.qkv_proj, ...): loading a Hugging Face
Phi-3 folder is an identity key map (weights.py), and adapters save in PEFT's format as they are.
Reading order: config -> layers -> LoRA -> GPT -> KV cache -> sampling -> log-probs.
Left out: dropout (nothing here trains the base), sliding-window attention (sequences stop at the window),
long-context RoPE scaling (refused by weights.py).
"""
import functools
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


# ----------------------------------------------------------------------------------------------------------
# config

@dataclass
class GPTConfig:
    """Phi-3 only; the defaults are microsoft/Phi-3-mini-4k-instruct's. `tiny` is the same architecture."""
    vocab_size: int = 32064
    n_layer: int = 32
    n_head: int = 32
    n_kv_head: int = 32        # < n_head: grouped-query attention
    n_embd: int = 3072
    intermediate_size: int = 8192
    block_size: int = 2047     # longest sequence: Phi-3-mini-4k's sliding window, which we do not implement
    rope_base: float = 10000.0
    norm_eps: float = 1e-5

    @classmethod
    def from_name(cls, name):
        presets = {"phi3-mini": {}, "tiny": dict(vocab_size=512, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                                                  intermediate_size=256, block_size=512)}
        if name not in presets:
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(presets)}")
        return cls(**presets[name])


# ----------------------------------------------------------------------------------------------------------
# layers

class RMSNorm(nn.Module):
    """y = w · x / sqrt(mean(x²) + eps), computed in float32 as Phi-3 does."""
    def __init__(self, dim, eps):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rope_tables(head_dim, length, base, device=None):
    """cos, sin (length, head_dim): angle[t, i] = t · base^(−2i/hd), repeated for the two halves; sin's
    first half negated, so that rotate-half RoPE is one roll (see apply_rope)."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)   # (hd/2,)
    angles = torch.outer(torch.arange(length, device=device).float(), inv_freq)               # (T, hd/2)
    return torch.cat((angles, angles), -1).cos(), torch.cat((-angles.sin(), angles.sin()), -1)   # (T, hd)


def apply_rope(x, cos, sin):
    """Rotate-half RoPE (HF/Phi-3): dim i pairs with i + hd/2, x·cos + [−x2, x1]·sin = x·cos + roll(x)·sin±
    with sin± = [−sin, sin] from rope_tables.  x (B, T, nh, hs); cos, sin broadcast to it."""
    return torch.addcmul(x * cos, x.roll(x.size(-1) // 2, -1), sin)


class LoRALinear(nn.Linear):
    """A bias-free linear layer carrying any number of LoRA adapters, all applied in two matmuls:

        y = x Wᵀ + ((x Aᵀ) ⊙ gate) Bᵀ,   A = [A_1; A_2; ...] (R, in),  B = [B_1 B_2 ...] (out, R),  R = Σ r_a

    lora = (names, gate): the adapters some row uses, and gate (B, 1, R) with, for each row, α/r on the r
    columns of that row's adapter and 0 elsewhere, so rows of one batch can use different adapters (two LANA
    players, or π_t and μ, in one forward pass). Adapters no row uses are not computed at all.
    A_a ~ kaiming_uniform(a=√5), B_a = 0 (PEFT's init). Adapters are float32 on any base dtype, as in PEFT."""
    def __init__(self, in_features, out_features):
        super().__init__(in_features, out_features, bias=False)
        self.lora_A, self.lora_B = nn.ParameterDict(), nn.ParameterDict()

    def forward(self, x, lora=None):
        y = F.linear(x, self.weight)
        if lora is None:
            return y
        names, gate, stacked = lora                  # stacked: every layer's A, B, made once (GPT.lora_gate)
        A, B = stacked[self] if stacked else self.stack(names)
        return y + F.linear(F.linear(x.to(A.dtype), A) * gate, B).to(x.dtype)

    def stack(self, names):
        """A (R, in), B (out, R) of these adapters, side by side."""
        return torch.cat([self.lora_A[n] for n in names]), torch.cat([self.lora_B[n] for n in names], 1)


class Attention(nn.Module):
    def __init__(self, cfg, layer):
        super().__init__()
        self.layer, self.n_head, self.n_kv_head = layer, cfg.n_head, cfg.n_kv_head
        self.hs = cfg.n_embd // cfg.n_head
        self.qkv_proj = LoRALinear(cfg.n_embd, (cfg.n_head + 2 * cfg.n_kv_head) * self.hs)    # W = [q; k; v]
        self.o_proj = LoRALinear(cfg.n_embd, cfg.n_embd)

    def forward(self, x, cos, sin, mask, cache, lora):
        B, T, C = x.shape
        H, Hkv = self.n_head, self.n_kv_head
        qkv = self.qkv_proj(x, lora).view(B, T, H + 2 * Hkv, self.hs)        # (B, T, H + 2Hkv, hs)
        qkv = apply_rope(qkv, cos, sin).transpose(1, 2)    # (B, nh, T, hs); cos, sin leave v's heads as is
        kv = qkv[:, H:] if cache is None else cache.update(self.layer, qkv[:, H:])   # (B, 2Hkv, L, hs)
        causal = mask is None and T > 1                    # a decode step (T = 1) sees every slot it is given
        y = F.scaled_dot_product_attention(qkv[:, :H], kv[:, :Hkv], kv[:, Hkv:], attn_mask=mask,
                                           is_causal=causal, enable_gqa=Hkv != H)       # (B, H, T, hs)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, C), lora)


class MLP(nn.Module):
    """SwiGLU with Phi-3's fused gate_up_proj, W = [gate; up]."""
    def __init__(self, cfg):
        super().__init__()
        self.gate_up_proj = LoRALinear(cfg.n_embd, 2 * cfg.intermediate_size)
        self.down_proj = LoRALinear(cfg.intermediate_size, cfg.n_embd)

    def forward(self, x, lora):
        g, up = self.gate_up_proj(x, lora).chunk(2, dim=-1)                   # (B, T, I) each
        return self.down_proj(F.silu(g) * up, lora)


class Block(nn.Module):
    def __init__(self, cfg, layer):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache, lora):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, lora)
        return x + self.mlp(self.post_attention_layernorm(x), lora)


# ----------------------------------------------------------------------------------------------------------
# the model

class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(config.vocab_size, config.n_embd),
            layers=nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
            norm=RMSNorm(config.n_embd, config.norm_eps)))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)      # untied embedding
        self.adapters = {}                  # name -> (r, alpha), in the order of the columns of every gate
        self.checkpointing = False          # recompute each block in backward (activation memory / n_layer)
        for m in self.modules():            # GPT-2 style init for models built from scratch (no-op on meta)
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)
        self.init_rope()

    def init_rope(self, device=None):
        """(Re)build the RoPE tables: non-persistent buffers, rebuilt after loading onto the meta device."""
        cos, sin = rope_tables(self.config.n_embd // self.config.n_head, self.config.block_size,
                               self.config.rope_base, device or self.lm_head.weight.device)
        self.register_buffer("cos", cos, persistent=False)                 # (block_size, hs)
        self.register_buffer("sin", sin, persistent=False)
        rotated = torch.arange(self.config.n_head + 2 * self.config.n_kv_head) < self.config.n_head + \
            self.config.n_kv_head                                           # q and k heads rotate, v's not
        self.register_buffer("rotated", rotated[:, None].to(cos.device), persistent=False)

    def trunk(self, idx, adapters=None, cache=None, mask=None):
        """idx (B, T) -> final-normed hidden states (B, T, C).
        mask (B, T): 1 on real tokens, 0 on left padding (None: all real). A token's RoPE position is the
        number of real tokens before it, so a left-padded prompt gets the positions of the unpadded one.
        Query t sees key s iff s ≤ t and s is real; every query sees itself, so a row of padding never
        softmaxes over nothing."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than the model's block_size "
                             f"{self.config.block_size}; shorten the prompt or the number of new tokens")
        real = torch.ones_like(idx, dtype=torch.bool) if mask is None else mask.bool()
        if cache is None:
            pos, keys, q_at = (real.cumsum(1) - 1).clamp(min=0), real, torch.arange(T, device=idx.device)
        else:
            (pos, q_at), keys = cache.advance(real, mask is not None), cache.real[:, :cache.n]   # q_at (T,)
        attn = None                                                             # None: SDPA's causal mask
        if cache is not None and T == 1:                 # decode: every real slot so far, or all of them
            attn = keys[:, None, None] if cache.padded else None
        elif mask is not None or cache is not None:
            k_at = torch.arange(keys.size(1), device=idx.device)                # (L,) slots of the keys
            attn = ((k_at <= q_at[:, None]) & (keys[:, None] | (k_at == q_at[:, None])))[:, None]  # (B,1,T,L)
        x = self.model.embed_tokens(idx)                                        # (B, T, C)
        q_and_k = self.rotated.to(x.dtype)                                      # (H + 2Hkv, 1): 1, or 0 for v
        cos = (self.cos[pos][:, :, None] * q_and_k + 1 - q_and_k).to(x.dtype)  # (B, T, H + 2Hkv, hs)
        sin = (self.sin[pos][:, :, None] * q_and_k).to(x.dtype)
        lora = adapters if isinstance(adapters, tuple) else self.lora_gate(adapters, B, x.device)
        for block in self.model.layers:
            if self.checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, cos, sin, attn, cache, lora, use_reentrant=False)
            else:
                x = block(x, cos, sin, attn, cache, lora)
        return self.model.norm(x)

    def forward(self, idx, adapters=None, cache=None, mask=None, last_only=False):
        """idx (B, T) -> logits (B, T, V), or (B, 1, V) with last_only (what a prefill needs)."""
        h = self.trunk(idx, adapters, cache, mask)
        return self.lm_head(h[:, -1:].contiguous() if last_only else h)   # a strided view: a batched matmul

    # ------------------------------------------------------------------------------------------------------
    # LoRA adapters: named, all on the four linear layers of every block

    def add_adapter(self, name, r=16, alpha=32):
        """A new adapter on qkv_proj, o_proj, gate_up_proj and down_proj of every layer; freezes the base."""
        if name in self.adapters or not str(name).isidentifier() or hasattr(nn.ParameterDict, name):
            raise ValueError(f"adapter name {name!r} exists already, or is not an identifier, or is taken")
        for n, p in self.named_parameters():
            if "lora_" not in n:
                p.requires_grad_(False)
        for m in self.lora_layers():
            A = torch.empty(r, m.in_features, device=m.weight.device)
            nn.init.kaiming_uniform_(A, a=5 ** 0.5)
            m.lora_A[name] = nn.Parameter(A)
            m.lora_B[name] = nn.Parameter(torch.zeros(m.out_features, r, device=m.weight.device))
        self.adapters[name] = (r, alpha)

    def lora_layers(self):
        return [m for m in self.modules() if isinstance(m, LoRALinear)]

    def lora_parameters(self, name):
        """The trainable A, B tensors of adapter `name`, in a fixed order."""
        return [d[name] for m in self.lora_layers() for d in (m.lora_A, m.lora_B)]

    def lora_gate(self, adapters, B, device):
        """adapters -> (used adapter names, gate (B, 1, R), stacked) for LoRALinear, or None if no row uses
        one. adapters: None (the base), a name (every row), or a list with one name or None per row. Every
        call of the model takes such an `adapters` argument, or its lora_gate (generate builds it once).
        stacked: {layer: its A, B stacked} when nothing trains (built here, once for all decode steps),
        else {}."""
        names = [adapters] * B if adapters is None or isinstance(adapters, str) else list(adapters)
        if len(names) != B or set(names) - set(self.adapters) - {None}:
            raise ValueError(f"need one adapter per row ({B}) from {list(self.adapters)}; got {names}")
        used = [a for a in self.adapters if a in names]
        if not used:
            return None
        gate, col = torch.zeros(B, 1, sum(self.adapters[a][0] for a in used)), 0
        for a in used:
            r, alpha = self.adapters[a]
            gate[[b for b, n in enumerate(names) if n == a], :, col:col + r] = alpha / r
            col += r
        stacked = {} if torch.is_grad_enabled() else {m: m.stack(used) for m in self.lora_layers()}
        return used, gate.to(device), stacked

    @torch.no_grad()
    def copy_adapter(self, src, dst):
        """dst <- src (values copied, not shared); creates dst if needed (INPO's frozen previous iterate)."""
        if dst not in self.adapters:
            self.add_adapter(dst, *self.adapters[src])
        for a, b in zip(self.lora_parameters(src), self.lora_parameters(dst)):
            b.copy_(a)

    @torch.no_grad()
    def merge_adapter(self, name):
        """W <- W + (α/r) B A in every layer, then remove the adapter: the base is now base + adapter."""
        if name not in self.adapters:
            raise ValueError(f"no adapter {name!r} to merge; adapters: {list(self.adapters)}")
        r, alpha = self.adapters.pop(name)
        for m in self.lora_layers():
            A, B = m.lora_A.pop(name), m.lora_B.pop(name)
            m.weight += (alpha / r * B @ A).to(m.weight.dtype)


# ----------------------------------------------------------------------------------------------------------
# KV cache and sampling

class KVCache:
    """Preallocated keys and values, one (B, 2 H_kv, max_len, hs) tensor per layer, written in place:
    nothing is allocated per step. Every row writes at slot n (prompts are left-padded to end together) and
    attention reads a view of the n slots written so far. `real` (B, max_len) marks the slots holding real
    tokens, `seen` (B,) counts them (the next RoPE position); `padded`: some slot is not real, else decoding
    needs no mask at all (as transformers drops an all-ones mask). The write is one index_copy_ at `slots`
    (the last advance's): a compiled step keeps it in place (a slice assignment copied the whole cache)."""
    def __init__(self, config, batch_size, max_len, device="cpu", dtype=torch.float32):
        if max_len > config.block_size:
            raise ValueError(f"{max_len} tokens is longer than the model's block_size {config.block_size}; "
                             "shorten the prompt or the number of new tokens")
        shape = (batch_size, 2 * config.n_kv_head, max_len, config.n_embd // config.n_head)
        self.kv = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]  # [k; v]
        self.real = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.seen = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.n, self.padded = 0, False

    def advance(self, real, padded):
        """Take T slots for the tokens of real (B, T) (padded: it may hold a 0): -> their RoPE positions
        (B, T) and slots (T,)."""
        T = real.size(1)
        self.real[:, self.n:self.n + T] = real
        pos = self.seen[:, None] + real.cumsum(1) - 1
        self.seen += real.sum(1)
        self.n, self.padded = self.n + T, self.padded or padded
        self.slots = torch.arange(self.n - T, self.n, device=real.device)
        return pos.clamp(min=0), self.slots

    def update(self, layer, kv):
        """Write this call's [k; v] (B, 2 H_kv, T, hs) at its slots; -> the n written (B, 2 H_kv, n, hs)."""
        return self.kv[layer].index_copy_(2, self.slots, kv)[:, :, :self.n]

    def take(self, rows):
        """The cache of these rows (a copy): prefill runs a distinct prompt once, then every row takes its."""
        self.kv, self.real, self.seen = [kv[rows] for kv in self.kv], self.real[rows], self.seen[rows]


def left_pad(seqs, pad_id, extra=0):
    """Token lists of different lengths -> tokens (B, T + extra) left-padded with pad_id, mask (B, T + extra)
    with 1 on the tokens (the `extra` columns, for tokens still to come, start as pad / 0)."""
    T = max(map(len, seqs))
    tokens = torch.full((len(seqs), T + extra), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), T + extra, dtype=torch.long)
    for b, s in enumerate(seqs):
        tokens[b, T - len(s):T], mask[b, T - len(s):T] = torch.as_tensor(s, dtype=torch.long), 1
    return tokens, mask


def sample_next(logits, u, temperature, top_p=1.0):
    """logits (B, V), u (B,) uniforms in [0, 1) -> (B,) ids. temperature 0: greedy. top_p < 1: nucleus
    sampling (the smallest set of most likely tokens whose mass reaches top_p). Inverse-CDF sampling: the
    first id whose cumulative probability exceeds u; a row's draw depends on its own u only."""
    if temperature == 0:
        return logits.max(-1).indices                                    # (2x faster than argmax on CPU)
    probs = (logits.float() / temperature).softmax(-1)                   # (B, V)
    if top_p < 1.0:
        p_sorted, idx = probs.sort(-1, descending=True)
        drop = p_sorted.cumsum(-1) - p_sorted >= top_p                   # the mass before it reaches top_p
        probs = probs.scatter(-1, idx, p_sorted.masked_fill(drop, 0.0))
    cdf = probs.cumsum(-1)                                               # (B, V)
    i = torch.searchsorted(cdf, (u * cdf[:, -1] * (1 - 2 ** -22))[:, None], right=True).squeeze(-1)
    return i.clamp(max=logits.size(-1) - 1)                              # NaN logits: caught by generate


def prefill(model, prompts, adapters, max_len, pad_id):
    """Run each distinct (prompt, adapter) once and copy its keys and values into every row that shares it
    (the two samples of a duel, the players' rows of one prompt). -> next-token logits (B, V), KVCache."""
    keys = [(tuple(p), a) for p, a in zip(prompts, adapters)]
    uniq = list(dict.fromkeys(keys))                                    # the distinct keys, in order
    where = {key: j for j, key in enumerate(uniq)}
    device, dtype = model.lm_head.weight.device, model.lm_head.weight.dtype
    x, m = (t.to(device) for t in left_pad([list(p) for p, _ in uniq], pad_id))
    cache = KVCache(model.config, len(uniq), max_len, device, dtype)
    padded = len({len(p) for p, _ in uniq}) > 1                            # else no mask is needed
    logits = model(x, [a for _, a in uniq], cache, m if padded else None, last_only=True)   # (U, 1, V)
    inv = torch.tensor([where[key] for key in keys], device=device)        # row -> its distinct key
    cache.take(inv)
    return logits[inv, -1], cache


def mix_logits(logits, twins, beta, bias):
    """Logits (B + M, V) of B rows and of the M twins of the rows `twins` -> the next-token logits (B, V)
    row b samples from, up to a constant c: (1 − β_b) log π_b + β_b log π_twin = (1 − β_b) z_b + β_b z_twin
    − c, as log π = z − log Z and sampling ignores c. bias (V,): −inf outside the allowed ids, or None."""
    lp = logits[:len(beta)].float()
    if len(twins):
        lp[twins] = torch.lerp(lp[twins], logits[len(beta):].float(), beta[twins])
    return lp if bias is None else lp + bias


def decode_step(model, nxt, lora, cache, twins, beta, bias):
    """The tokens just sampled nxt (B,) -> the next-token logits (B, V): one token per row through the cached
    model (a twin reads its row's token), then mix_logits. generate(compile=True) compiles this function."""
    x = (torch.cat((nxt, nxt[twins])) if len(twins) else nxt)[:, None]             # (B + M, 1)
    return mix_logits(model(x, lora, cache, last_only=True)[:, -1], twins, beta, bias)


@functools.cache
def compiled(fn):
    """torch.compile(fn), made once per process (a new wrapper would compile again). dynamic: the cache grows
    without recompiles; a new batch shape compiles once (5-10 s on 2 CPU cores). The weights and adapters are
    inputs of the compiled graph, read at every call: training them between calls is seen."""
    return torch.compile(fn, dynamic=True)


@torch.inference_mode()                 # no autograd bookkeeping: 6-8% faster than no_grad on CPU
def generate(model, prompts, max_new_tokens, *, adapters=None, mix_beta=0.0, mix_adapter=None,
             temperature=1.0, top_p=1.0, vocab=None, stop_ids=(), pad_id=0, uniforms=None, generator=None,
             compile=False):
    """Batched, KV-cached sampling of up to max_new_tokens after each prompt (token lists, left-padded).
      adapters       None, a name, or one per prompt: the policy each row samples from
      mix_beta       float or one per prompt: row b samples from the per-token geometric mixture
                     (1 − β_b) log π_row + β_b log π_mix_adapter (None = base). Such a row gets a twin row
                     under mix_adapter in the same forward pass, with its own KV cache.
      vocab          allowed token ids (constrained decoding); stop_ids end a row (the stop token is kept)
      uniforms       (B, max_new_tokens) in [0, 1), one per sampled token; else drawn from `generator`.
                     Passing them makes each row's sample independent of the other rows in the batch.
      compile        run each one-token step through torch.compile (`compiled`): the first call of a batch
                     shape compiles (seconds), later ones decode faster (README); eager otherwise.
    Returns tokens, mask, resp (B, T): mask is 1 on real tokens (prompt and response), resp on the response
    (including its stop token); finished rows hold pad_id. T stops at the last column any row used."""
    B, N, device = len(prompts), max_new_tokens, model.lm_head.weight.device
    if min(map(len, prompts)) == 0:
        raise ValueError("every prompt needs at least one token (e.g. BOS)")
    tokens, mask = (t.to(device) for t in left_pad(prompts, pad_id, extra=N))
    mask[:, -N:] = 1                                                     # until a row stops
    Tp = tokens.size(1) - N
    beta = torch.as_tensor(mix_beta, dtype=torch.float32, device=device).expand(B)[:, None]   # (B, 1)
    twins = (beta[:, 0] > 0).nonzero().squeeze(1)                        # (M,) rows that mix
    names = [adapters] * B if adapters is None or isinstance(adapters, str) else list(adapters)
    names += [mix_adapter] * len(twins)                                  # rows [B rows; M twins]
    rows = list(prompts) + [prompts[t] for t in twins.tolist()]
    logits, cache = prefill(model, rows, names, Tp + N, pad_id)
    lora = model.lora_gate(names, len(names), device)                    # built once for every decode step
    u = torch.rand(B, N, generator=generator, device=device) if uniforms is None else uniforms.to(device)
    bias = None if vocab is None else torch.full((model.config.vocab_size,), float("-inf"), device=device)
    if vocab is not None:
        bias[torch.as_tensor(vocab, device=device)] = 0.0                # -inf outside the allowed ids
    stop = torch.as_tensor(stop_ids, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    finite = torch.ones((), dtype=torch.bool, device=device)

    step = compiled(decode_step) if compile else decode_step
    lp, n = mix_logits(logits, twins, beta, bias), 0
    for i in range(N):
        if i % 8 == 0:                                   # NaN or all -inf (diverged weights): raised below
            finite &= lp.amax(-1).isfinite().all()
        nxt = sample_next(lp, u[:, i], temperature, top_p)                                   # (B,)
        if len(stop):                                    # finished rows hold pad_id, masked out
            nxt.masked_fill_(done, pad_id)
            mask[:, Tp + i] = ~done
            done |= torch.isin(nxt, stop)
        tokens[:, Tp + i], n = nxt, i + 1
        if len(stop) and i % 8 == 7 and bool(done.all()):                # a host sync every 8 tokens only
            break
        if i + 1 < N:
            lp = step(model, nxt, lora, cache, twins, beta, bias)
    if not bool(finite):
        raise FloatingPointError("the model produced non-finite logits while sampling: its weights diverged")
    n = int(mask[:, Tp:Tp + n].any(0).sum())                             # columns some row used
    with torch.inference_mode(False):           # copies that are normal tensors: autograd may save them
        tokens, mask, resp = tokens[:, :Tp + n].clone(), mask[:, :Tp + n].clone(), mask[:, :Tp + n].clone()
        resp[:, :Tp] = 0
    return tokens, mask, resp


# ----------------------------------------------------------------------------------------------------------
# log-probabilities: what every loss consumes

def sequence_logprobs(model, tokens, mask, resp, adapters=None, vocab=None):
    """log π(y|x) = Σ_t resp[t] · log π(tokens[t] | tokens[<t]) per row: (B,), differentiable.
    vocab: allowed ids; the next-token law is then renormalised over them (the law of constrained decoding).
    Only response positions go through lm_head (the (B, T, V) logits are never materialised), and
    log π = logit[y] − logsumexp(logits) = −cross_entropy (fused: faster, one buffer fewer in backward)."""
    h = model.trunk(tokens, adapters, mask=mask)                          # (B, T, C)
    sel = resp[:, 1:].bool()                                              # token t is predicted at t − 1
    rows = torch.arange(tokens.size(0), device=tokens.device)[:, None].expand_as(sel)[sel]     # (N,)
    target = tokens[:, 1:][sel]                                           # (N,)
    W = model.lm_head.weight
    inside = torch.ones_like(target, dtype=torch.bool)
    if vocab is not None:
        vocab = torch.as_tensor(vocab, device=W.device).unique()
        hit = target[:, None] == vocab                                    # (N, A)
        W, target, inside = W[vocab], hit.float().argmax(-1), hit.any(-1)  # ids -> positions in vocab
    logits = F.linear(h[:, :-1][sel], W).float()                          # (N, V)
    logp = -F.cross_entropy(logits, target, reduction="none")             # fused log-softmax and gather
    logp = logp.masked_fill(~inside, float("-inf"))                       # outside vocab: probability 0
    return torch.zeros(tokens.size(0), device=tokens.device).index_add(0, rows, logp)
