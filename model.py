"""
model.py: Phi-3 in one file, with hand-written LoRA adapters and a KV-cached batched sampler.
Llama (SmolLM2) is the same network with q, k, v and gate, up stored apart and the output layer
tied to the embedding: weights.py fuses them at load, and GPTConfig.tie_embeddings ties.

    model = GPT(GPTConfig.from_name("tiny"))    # or weights.load_model(folder): the real one
    model.add_adapter("policy", r=16, alpha=32)
    logits = model(idx, adapters="policy")      # (B, T, V); adapters=None is the base model
    tokens, mask, resp = generate(model, prompts, 128, adapters=["p1", "p2"], uniforms=u)
    logp = sequence_logprobs(model, tokens, mask, resp, adapters="policy")  # (B,) log π(y|x)

Which adapter runs is an argument of every call (a name, None, or one per row), like the KV cache:
no module state says "the active adapter". One base in memory therefore serves every role: adapters
off is the base model, several adapters run side by side in one batch, and a new adapter (B = 0) is
an exact no-op. Module names are the checkpoint's own (model.layers.{i}.self_attn.qkv_proj, ...):
loading a Hugging Face Phi-3 folder is an identity key map (weights.py), and adapters save in
PEFT's format as they are (Llama's: split by the rows of each fused layer's `parts`).
Reading order: config -> layers -> LoRA -> GPT -> KV cache -> sampling -> log-probs.
Left out: dropout (nothing here trains the base), sliding-window attention (sequences stop at the
window), long-context RoPE scaling (refused by weights.py).
"""
import functools
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


# -------------------------------------------------------------------------------------------------
# config

@dataclass
class GPTConfig:
    """Phi-3's architecture; the defaults are microsoft/Phi-3-mini-4k-instruct's. `tiny` is the
    same architecture, and so is a Llama checkpoint (model_type "llama", tied embeddings)."""
    vocab_size: int = 32064
    n_layer: int = 32
    n_head: int = 32
    n_kv_head: int = 32        # < n_head: grouped-query attention
    n_embd: int = 3072
    intermediate_size: int = 8192
    block_size: int = 2047     # longest sequence: Phi-3-mini-4k's sliding window (not implemented)
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    head_std: float = 0.02     # init std of lm_head, for models built from scratch
    tie_embeddings: bool = False    # lm_head shares embed_tokens' weight (Llama's option)
    model_type: str = "phi3"   # config.json's: the tensor names weights.py reads and writes

    @classmethod
    def from_name(cls, name):
        return cls(**PRESETS[name])


PRESETS = {
    "phi3-mini": {},
    "tiny": dict(
        vocab_size=512,
        n_layer=2,
        n_head=4,
        n_kv_head=2,
        n_embd=64,
        intermediate_size=256,
        block_size=512,
        # After the final RMSNorm |h| = √C, so with GPT-2's std 0.02 every logit is within ±1.3
        # and the LoRA players could not express a policy sharper than ~4:1; a wider output layer
        # fixes that.
        head_std=0.06,
    ),
}


# -------------------------------------------------------------------------------------------------
# layers

class RMSNorm(nn.Module):
    """y = w · x / sqrt(mean(x²) + eps), computed in float32 as Phi-3 does."""
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        mean_square = xf.pow(2).mean(-1, keepdim=True)
        normed = xf * torch.rsqrt(mean_square + self.eps)
        return self.weight * normed.to(x.dtype)


def rope_tables(head_dim, length, base, device):
    """cos, sin (length, head_dim): angle[t, i] = t · base^(−2i/hd), repeated for the two halves;
    sin's first half negated, so that rotate-half RoPE is one roll (see apply_rope)."""
    dims = torch.arange(0, head_dim, 2, device=device).float()
    inv_freq = 1.0 / base ** (dims / head_dim)                          # (hd/2,)
    t = torch.arange(length, device=device).float()
    angles = torch.outer(t, inv_freq)                                   # (T, hd/2)
    cos = torch.cat((angles, angles), -1).cos()                         # (T, hd)
    sin = torch.cat((-angles.sin(), angles.sin()), -1)
    return cos, sin


def apply_rope(x, cos, sin):
    """Rotate-half RoPE (HF/Phi-3): dim i pairs with i + hd/2, x·cos + [−x2, x1]·sin =
    x·cos + roll(x)·sin± with sin± = [−sin, sin] from rope_tables.
    x (B, T, nh, hs); cos, sin broadcast to it."""
    half = x.size(-1) // 2
    return torch.addcmul(x * cos, x.roll(half, -1), sin)


def linear(x, W):
    """x Wᵀ. A few float32 rows (a decode step) go as (W xᵀ)ᵀ: on the CPU, MKL reads W at about
    half the memory bandwidth for x Wᵀ, and at full speed for W xᵀ, except with a single column
    (a matrix-vector product, as slow): a single row goes twice. The same values up to rounding;
    a float32 decode step of SmolLM2 takes 1.8-2.5x less time (README, Speed)."""
    rows = x.reshape(-1, x.size(-1))                                    # (R, in)
    if x.dtype != torch.float32 or len(rows) > 8:
        return F.linear(x, W)
    cols = rows.repeat(2, 1) if len(rows) == 1 else rows
    y = W @ cols.T                                                      # (out, R or 2)
    y = y[:, :len(rows)].T.contiguous()                                 # (R, out)
    return y.view(*x.shape[:-1], -1)


class LoRALinear(nn.Linear):
    """A bias-free linear layer carrying any number of LoRA adapters, all applied in two matmuls:

        y = x Wᵀ + ((x Aᵀ) ⊙ gate) Bᵀ,   A = [A_1; A_2; ...] (R, in),  B = [B_1 B_2 ...] (out, R)

    with R = Σ r_a. lora = (names, gate, stacked), made by GPT.lora_gate: names are the adapters
    some row uses; gate (B, 1, R) holds, for each row, α/r on the r columns of that row's adapter
    and 0 elsewhere, so rows of one batch can use different adapters (two LANA players, or π_t and
    μ, in one forward pass). Adapters no row uses are not computed at all. stacked: every layer's
    A, B, stacked once for all decode steps, or {} (then each call stacks its own).
    A_a ~ kaiming_uniform(a=√5), B_a = 0 (PEFT's init). Adapters are float32 on any base dtype, as
    in PEFT. parts: the rows of each layer this one fuses ([q, k, v], [gate, up]), for the
    checkpoints that store them apart (weights.py)."""
    def __init__(self, in_features, out_features, parts=None):
        super().__init__(in_features, out_features, bias=False)
        self.parts = parts or [out_features]
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()

    def forward(self, x, lora):
        y = linear(x, self.weight)
        if lora is None:
            return y
        names, gate, stacked = lora
        A, B = stacked[self] if stacked else self.stack(names)
        low_rank = F.linear(x.to(A.dtype), A) * gate                    # (B, T, R)
        return y + F.linear(low_rank, B).to(x.dtype)

    def stack(self, names):
        """A (R, in), B (out, R) of these adapters, side by side."""
        return (torch.cat([self.lora_A[n] for n in names]),
                torch.cat([self.lora_B[n] for n in names], 1))


class Attention(nn.Module):
    def __init__(self, cfg, layer):
        super().__init__()
        self.layer = layer                                              # its slot in a KVCache
        self.n_head = cfg.n_head
        self.n_kv_head = cfg.n_kv_head
        self.hs = cfg.n_embd // cfg.n_head
        kv_size = cfg.n_kv_head * self.hs
        parts = [cfg.n_embd, kv_size, kv_size]                         # q's n_head · hs = n_embd
        self.qkv_proj = LoRALinear(cfg.n_embd, sum(parts), parts)       # W = [q; k; v]
        self.o_proj = LoRALinear(cfg.n_embd, cfg.n_embd)

    def forward(self, x, cos, sin, mask, cache, lora):
        B, T, C = x.shape
        H, Hkv = self.n_head, self.n_kv_head
        qkv = self.qkv_proj(x, lora).view(B, T, -1, self.hs)            # (B, T, H + 2Hkv, hs)
        qkv = apply_rope(qkv, cos, sin).transpose(1, 2)     # (B, H + 2Hkv, T, hs); v not rotated
        q, kv = qkv.split([H, 2 * Hkv], 1)
        if cache is not None:
            kv = cache.update(self.layer, kv)                           # (B, 2Hkv, L, hs)
        k, v = kv.chunk(2, 1)                                           # (B, Hkv, L, hs) each
        causal = mask is None and T > 1         # a decode step (T = 1) sees every slot it is given
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           enable_gqa=Hkv != H)         # (B, H, T, hs)
        y = y.transpose(1, 2).reshape(B, T, C)                          # (B, T, C)
        return self.o_proj(y, lora)


class MLP(nn.Module):
    """SwiGLU with Phi-3's fused gate_up_proj, W = [gate; up]."""
    def __init__(self, cfg):
        super().__init__()
        parts = [cfg.intermediate_size, cfg.intermediate_size]
        self.gate_up_proj = LoRALinear(cfg.n_embd, sum(parts), parts)   # W = [gate; up]
        self.down_proj = LoRALinear(cfg.intermediate_size, cfg.n_embd)

    def forward(self, x, lora):
        gate, up = self.gate_up_proj(x, lora).chunk(2, -1)              # (B, T, I) each
        return self.down_proj(F.silu(gate) * up, lora)


class Block(nn.Module):
    def __init__(self, cfg, layer):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache, lora):
        h = self.input_layernorm(x)
        x = x + self.self_attn(h, cos, sin, mask, cache, lora)
        h = self.post_attention_layernorm(x)
        return x + self.mlp(h, lora)


def check_length(T, config):
    """A sequence of T tokens fits the model (its RoPE tables), else one clear error."""
    if T > config.block_size:
        raise ValueError(f"a sequence of {T} tokens is longer than the model's block_size "
                         f"{config.block_size}; shorten the prompt or the number of new tokens")


def per_row(adapters, B):
    """None or a name (for every row), or one per row -> a list of B names (None: the base)."""
    if adapters is None or isinstance(adapters, str):
        return [adapters] * B
    return list(adapters)


# -------------------------------------------------------------------------------------------------
# the model

class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        C = config.n_embd
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(config.vocab_size, C),
            layers=nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
            norm=RMSNorm(C, config.norm_eps),
        ))
        self.lm_head = nn.Linear(C, config.vocab_size, bias=False)
        if config.tie_embeddings:                   # one Parameter, in both modules
            self.lm_head.weight = self.model.embed_tokens.weight
        self.adapters = {}          # name -> (r, alpha), in the order of every gate's columns
        self.checkpointing = False  # recompute each block in backward: activations / n_layer
        # GPT-2's init (std 0.02) for models built from scratch, a no-op on the meta device;
        # then lm_head's own std (config.head_std), drawn again as nanoGPT redraws its c_proj
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
        nn.init.normal_(self.lm_head.weight, std=config.head_std)
        self.init_rope(self.lm_head.weight.device)

    def init_rope(self, device):
        """(Re)build the RoPE tables: non-persistent buffers, rebuilt after loading onto the meta
        device. rotated (H + 2Hkv, 1): 1.0 on the q and k heads (they rotate), 0.0 on v's."""
        c = self.config
        cos, sin = rope_tables(c.n_embd // c.n_head, c.block_size, c.rope_base, device)
        heads = torch.arange(c.n_head + 2 * c.n_kv_head, device=device)
        rotated = heads < c.n_head + c.n_kv_head
        self.register_buffer("cos", cos, persistent=False)             # (block_size, hs)
        self.register_buffer("sin", sin, persistent=False)
        self.register_buffer("rotated", rotated[:, None].float(), persistent=False)

    def trunk(self, idx, adapters=None, cache=None, mask=None):
        """idx (B, T) -> final-normed hidden states (B, T, C).
        adapters: a name, None or one per row, or a lora_gate made by the caller (generate).
        mask (B, T): 1 on real tokens, 0 on left padding (None: all real). A token's RoPE position
        is the number of real tokens before it, so a left-padded prompt gets the positions of the
        unpadded one. Query t sees key s iff s ≤ t and s is real; every query sees itself, so a row
        of padding never softmaxes over nothing."""
        B, T = idx.shape
        check_length(T, self.config)
        real = torch.ones_like(idx, dtype=torch.bool) if mask is None else mask.bool()
        if cache is None:
            pos = (real.cumsum(1) - 1).clamp(min=0)
            q_at = torch.arange(T, device=idx.device)
            keys = real
        else:
            pos, q_at = cache.advance(real, mask is not None)
            keys = cache.real[:, :cache.n]
        attn = None         # SDPA's causal mask; a decode step with no padding: every slot so far
        if mask is not None or cache is not None and (T > 1 or cache.padded):
            k_at = torch.arange(keys.size(1), device=idx.device)        # (L,) slots of the keys
            q_col = q_at[:, None]                                       # (T, 1) of the queries
            causal = k_at <= q_col
            visible = keys[:, None] | (k_at == q_col)
            attn = (causal & visible)[:, None]                          # (B, 1, T, L)
        x = self.model.embed_tokens(idx)                                # (B, T, C)
        q_and_k = self.rotated                          # (H + 2Hkv, 1): 1 on q, k heads, 0 on v's
        cos = self.cos[pos][:, :, None] * q_and_k + 1 - q_and_k        # (B, T, H + 2Hkv, hs)
        # v's heads: cos 1, sin 0, so that apply_rope leaves them as they are
        sin = self.sin[pos][:, :, None] * q_and_k
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        lora = adapters if isinstance(adapters, tuple) else self.lora_gate(adapters, B)
        for block in self.model.layers:
            if self.checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, cos, sin, attn, cache, lora, use_reentrant=False)
            else:
                x = block(x, cos, sin, attn, cache, lora)
        return self.model.norm(x)

    def forward(self, idx, adapters=None, cache=None, mask=None):
        """idx (B, T) -> logits (B, T, V)."""
        return linear(self.trunk(idx, adapters, cache, mask), self.lm_head.weight)

    # ---------------------------------------------------------------------------------------------
    # LoRA adapters: named, all on the four linear layers of every block

    def add_adapter(self, name, r=16, alpha=32):
        """A new adapter on qkv_proj, o_proj, gate_up_proj and down_proj of every layer; freezes
        the base."""
        valid = str(name).isidentifier() and not hasattr(nn.ParameterDict, name)
        if name in self.adapters or not valid:
            raise ValueError(f"adapter name {name!r} exists already, or is not an identifier, "
                             "or is taken")
        for n, p in self.named_parameters():
            if "lora_" not in n:
                p.requires_grad_(False)
        for m in self.lora_layers():
            device = m.weight.device
            A = torch.empty(r, m.in_features, device=device)
            nn.init.kaiming_uniform_(A, a=5 ** 0.5)
            B = torch.zeros(m.out_features, r, device=device)
            m.lora_A[name] = nn.Parameter(A)
            m.lora_B[name] = nn.Parameter(B)
        self.adapters[name] = (r, alpha)

    def lora_layers(self):
        return [m for m in self.modules() if isinstance(m, LoRALinear)]

    def lora_parameters(self, name):
        """The trainable A, B tensors of adapter `name`, in a fixed order."""
        return [d[name] for m in self.lora_layers() for d in (m.lora_A, m.lora_B)]

    def lora_gate(self, adapters, B, stack=False):
        """adapters -> (used adapter names, gate (B, 1, R), stacked) for LoRALinear, or None if
        no row uses one. adapters: None (the base), a name (every row), or a list with one name or
        None per row. Every call of the model takes such an `adapters` argument, or its lora_gate.
        stack: also stack every layer's A and B now, into stacked {layer: (A, B)}, so that the
        decode steps of generate reuse them; else stacked = {} and each layer stacks its own in
        every call (with gradient checkpointing, nothing then outlives a block)."""
        names = per_row(adapters, B)
        unknown = set(names) - set(self.adapters) - {None}
        if len(names) != B or unknown:
            raise ValueError(f"need one adapter per row ({B}) from {list(self.adapters)}; "
                             f"got {names}")
        used = [a for a in self.adapters if a in names]
        if not used:
            return None
        R = sum(self.adapters[a][0] for a in used)
        gate = torch.zeros(B, 1, R)
        col = 0
        for a in used:
            r, alpha = self.adapters[a]
            rows = [b for b, n in enumerate(names) if n == a]
            gate[rows, :, col:col + r] = alpha / r
            col += r
        stacked = {}
        if stack:
            stacked = {m: m.stack(used) for m in self.lora_layers()}
        return used, gate.to(self.lm_head.weight.device), stacked

    @torch.no_grad()
    def copy_adapter(self, src, dst):
        """dst <- src (values copied, not shared); creates dst if needed (INPO's frozen previous
        iterate)."""
        if dst not in self.adapters:
            self.add_adapter(dst, *self.adapters[src])
        for a, b in zip(self.lora_parameters(src), self.lora_parameters(dst)):
            b.copy_(a)

    def lora_delta(self, layer, name):
        """(α/r) B A of adapter `name` in this layer, in the layer's dtype: what merging adds to
        its W (weights.export_merged: the base with the adapter folded in)."""
        if name not in self.adapters:
            raise ValueError(f"no adapter {name!r} to merge; adapters: {list(self.adapters)}")
        r, alpha = self.adapters[name]
        delta = alpha / r * layer.lora_B[name] @ layer.lora_A[name]
        return delta.to(layer.weight.dtype)


# -------------------------------------------------------------------------------------------------
# KV cache and sampling

class KVCache:
    """Preallocated keys and values, one (B, 2 H_kv, max_len, hs) tensor per layer, written in
    place: nothing is allocated per step. Every row writes at slot n (prompts are left-padded to
    end together) and attention reads a view of the n slots written so far. `real` (B, max_len)
    marks the slots holding real tokens, `seen` (B,) counts them (the next RoPE position);
    `padded`: some slot is not real, else decoding needs no mask at all (as transformers drops an
    all-ones mask). The write is one index_copy_ at `slots` (the last advance's): a compiled step
    keeps it in place (a slice assignment copied the whole cache)."""
    def __init__(self, config, batch_size, max_len, device, dtype):
        check_length(max_len, config)
        shape = (batch_size, 2 * config.n_kv_head, max_len, config.n_embd // config.n_head)
        self.kv = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.real = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.seen = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.n = 0
        self.padded = False

    def advance(self, real, padded):
        """Take T slots for the tokens of real (B, T) (padded: it may hold a 0): -> their RoPE
        positions (B, T) and slots (T,)."""
        start = self.n
        self.n += real.size(1)
        self.real[:, start:self.n] = real
        pos = self.seen[:, None] + real.cumsum(1) - 1
        self.seen += real.sum(1)
        self.padded = self.padded or padded
        self.slots = torch.arange(start, self.n, device=real.device)
        return pos.clamp(min=0), self.slots

    def update(self, layer, kv):
        """Write this call's [k; v] (B, 2 H_kv, T, hs) at its slots; -> the n written
        (B, 2 H_kv, n, hs)."""
        written = self.kv[layer].index_copy_(2, self.slots, kv)
        return written[:, :, :self.n]

    def take(self, rows):
        """The cache of these rows (a copy): prefill runs a distinct prompt once, then every row
        takes its."""
        self.kv = [kv[rows] for kv in self.kv]
        self.real = self.real[rows]
        self.seen = self.seen[rows]


def left_pad(seqs, pad_id, extra=0):
    """Token lists of different lengths -> tokens (B, T + extra) left-padded with pad_id, mask
    (B, T + extra) with 1 on the tokens (the `extra` columns, for tokens still to come, start as
    pad / 0)."""
    B, T = len(seqs), max(map(len, seqs))
    tokens = torch.full((B, T + extra), pad_id, dtype=torch.long)
    mask = torch.zeros_like(tokens)
    for b, s in enumerate(seqs):
        start = T - len(s)
        tokens[b, start:T] = torch.tensor(s)
        mask[b, start:T] = 1
    return tokens, mask


def sample_next(logits, u, temperature, top_p=1.0):
    """logits (B, V), u (B,) uniforms in [0, 1) -> (B,) ids. temperature 0: greedy. top_p < 1:
    nucleus sampling (the smallest set of most likely tokens whose mass reaches top_p). Inverse-CDF
    sampling: the first id whose cumulative probability exceeds u; a row's draw depends on its own
    u only."""
    if temperature == 0:
        return logits.max(-1).indices                   # (2x faster than argmax on CPU)
    probs = (logits / temperature).softmax(-1)                          # (B, V)
    if top_p < 1.0:
        p_sorted, idx = probs.sort(-1, descending=True)
        drop = p_sorted.cumsum(-1) - p_sorted >= top_p  # the mass before it reaches top_p
        p_sorted = p_sorted.masked_fill(drop, 0.0)
        probs = probs.scatter(-1, idx, p_sorted)
    cdf = probs.cumsum(-1)                                              # (B, V)
    target = u * cdf[:, -1] * (1 - 2 ** -22)                            # in [0, total mass)
    i = torch.searchsorted(cdf, target[:, None], right=True).squeeze(-1)
    return i.clamp(max=logits.size(-1) - 1)             # NaN logits: caught by generate


def prefill(model, tokens, mask, adapters, max_len):
    """Left-padded prompts tokens, mask (B, T): run each distinct (prompt, adapter) once and copy
    its keys and values into every row that shares it (the samples of one prompt, the players'
    rows of one prompt). -> next-token logits (B, V), KVCache."""
    prompts = [tuple(t[m.bool()].tolist()) for t, m in zip(tokens, mask)]      # unpadded
    keys = list(zip(prompts, adapters))
    uniq = list(dict.fromkeys(keys))                    # the distinct keys, in order
    rows = [keys.index(key) for key in uniq]            # a row of each
    x, m = tokens[rows], mask[rows]
    W = model.lm_head.weight
    cache = KVCache(model.config, len(uniq), max_len, W.device, W.dtype)
    names = [a for _, a in uniq]
    h = model.trunk(x, names, cache, None if m.all() else m)          # (U, T, C)
    logits = linear(h[:, -1], W)                    # (U, V): the last position only
    inv = torch.tensor([uniq.index(key) for key in keys], device=W.device)  # row -> its key
    cache.take(inv)
    return logits[inv], cache


def mix_logits(logits, twins, beta, bias):
    """Logits (B + M, V) of B rows and of the M twins of the rows `twins` -> the next-token logits
    (B, V) row b samples from, up to a constant c: (1 − β_b) log π_b + β_b log π_twin =
    (1 − β_b) z_b + β_b z_twin − c, as log π = z − log Z and sampling ignores c.
    bias (V,): −inf outside the allowed ids, or None."""
    B = len(beta)
    lp = logits[:B].float()
    if len(twins):
        lp[twins] = torch.lerp(lp[twins], logits[B:].float(), beta[twins])
    return lp if bias is None else lp + bias


def decode_step(model, nxt, lora, cache, twins, beta, bias):
    """The tokens just sampled nxt (B,) -> the next-token logits (B, V): one token per row through
    the cached model (a twin reads its row's token), then mix_logits.
    generate(compile=True) compiles this function."""
    x = torch.cat((nxt, nxt[twins])) if len(twins) else nxt             # (B + M,)
    logits = model(x[:, None], lora, cache)                             # (B + M, 1, V)
    return mix_logits(logits[:, -1], twins, beta, bias)


@functools.cache
def compiled(fn):
    """torch.compile(fn), made once per process (a new wrapper would compile again). dynamic: the
    cache grows without recompiles; a new batch shape compiles once (5-10 s on 2 CPU cores). The
    weights and adapters are inputs of the compiled graph, read at every call: training them
    between calls is seen."""
    return torch.compile(fn, dynamic=True)


def generate(model, prompts, max_new_tokens, *, adapters=None, mix_beta=0.0, mix_adapter=None,
             temperature=1.0, top_p=1.0, vocab=None, stop_ids=(), pad_id=0, uniforms=None,
             generator=None, compile=False):
    """Batched, KV-cached sampling of up to max_new_tokens after each prompt (token lists,
    left-padded).
      adapters       None, a name, or one per prompt: the policy each row samples from
      mix_beta       float or one per prompt: row b samples from the per-token geometric mixture
                     (1 − β_b) log π_row + β_b log π_mix_adapter (None = base). Such a row gets a
                     twin row under mix_adapter in the same forward pass, with its own KV cache.
      vocab          allowed token ids (constrained decoding); stop_ids end a row (the stop token
                     is kept)
      uniforms       (B, max_new_tokens) in [0, 1), one per sampled token; else drawn from
                     `generator`. Passing them makes each row's sample independent of the other
                     rows in the batch.
      compile        run each one-token step through torch.compile (`compiled`): the first call
                     of a batch shape compiles (seconds), later ones decode faster (README);
                     eager otherwise.
    Returns tokens, mask, resp (B, T): mask is 1 on real tokens (prompt and response), resp on the
    response (including its stop token); finished rows hold pad_id. T stops at the last column any
    row used: normal tensors (made before inference mode, only written in it), autograd may save
    them."""
    if min(map(len, prompts)) == 0:
        raise ValueError("every prompt needs at least one token (e.g. BOS)")
    B, N = len(prompts), max_new_tokens
    device = model.lm_head.weight.device
    tokens, mask = left_pad(prompts, pad_id, extra=N)
    tokens, mask = tokens.to(device), mask.to(device)
    Tp = tokens.size(1) - N
    with torch.inference_mode():            # no autograd bookkeeping: ~10% faster than no_grad
        beta = torch.as_tensor(mix_beta, dtype=torch.float32, device=device)
        beta = beta.expand(B)[:, None]                                  # (B, 1)
        twins = (beta[:, 0] > 0).nonzero().squeeze(1)                  # (M,) rows that mix
        names = per_row(adapters, B) + [mix_adapter] * len(twins)      # rows [B rows; M twins]
        rows = torch.cat([torch.arange(B, device=device), twins])
        logits, cache = prefill(model, tokens[rows, :Tp], mask[rows, :Tp], names, Tp + N)
        lora = model.lora_gate(names, len(names), stack=True)          # once for every step
        if uniforms is None:
            uniforms = torch.rand(B, N, generator=generator, device=device)
        u = uniforms.to(device)
        bias = None
        if vocab is not None:
            bias = torch.full((model.config.vocab_size,), float("-inf"), device=device)
            bias[torch.as_tensor(vocab, device=device)] = 0.0           # 0 on the allowed ids
        stop = torch.as_tensor(stop_ids, dtype=torch.long, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        finite = torch.tensor(True, device=device)

        step = compiled(decode_step) if compile else decode_step
        lp = mix_logits(logits, twins, beta, bias)
        for i in range(N):
            if i % 8 == 0:                      # NaN or all -inf (diverged weights): raised below
                finite &= lp.amax(-1).isfinite().all()
            nxt = sample_next(lp, u[:, i], temperature, top_p)         # (B,)
            nxt.masked_fill_(done, pad_id)      # finished rows hold pad_id, masked out
            mask[:, Tp + i] = ~done
            done |= torch.isin(nxt, stop)
            tokens[:, Tp + i] = nxt
            if len(stop) and i % 8 == 7 and bool(done.all()):  # a host sync every 8 tokens only
                break
            if i + 1 < N:
                lp = step(model, nxt, lora, cache, twins, beta, bias)
    if not finite:
        raise FloatingPointError("the model produced non-finite logits while sampling: its "
                                 "weights diverged")
    width = Tp + int(mask[:, Tp:].any(0).sum())          # up to the last column some row used
    tokens = tokens[:, :width]
    mask = mask[:, :width]
    resp = mask.clone()
    resp[:, :Tp] = 0
    return tokens, mask, resp


# -------------------------------------------------------------------------------------------------
# log-probabilities: what every loss consumes

def sequence_logprobs(model, tokens, mask, resp, adapters=None, vocab=None, shared=False):
    """log π(y|x) = Σ_t resp[t] · log π(tokens[t] | tokens[<t]) per row: (B,), differentiable.
    vocab: allowed ids; the next-token law is then renormalised over them (the law of constrained
    decoding). shared: the rows' prompts end together before the responses (generate's layout),
    and each distinct (prompt, adapter) runs once, its keys and values shared by its rows,
    gradients included: many answers to one long prompt cost one prompt. Only response
    positions go through lm_head
    (the (B, T, V) logits are never materialised), and log π = logit[y] − logsumexp(logits) =
    −cross_entropy (fused: faster, one buffer fewer in backward)."""
    first = 0                   # (checkpointing: a recomputed block would write the cache twice)
    if shared and not model.checkpointing:
        answers_at = int(resp.any(0).int().argmax())                # the first response column
        first = max(answers_at - 1, 0)                                  # the prompts' last
    if first:                   # prefill each distinct prompt (minus its last token), then the rest
        names = per_row(adapters, len(tokens))
        _, cache = prefill(model, tokens[:, :first], mask[:, :first], names, tokens.size(1))
        h = model.trunk(tokens[:, first:], adapters, cache, mask[:, first:])   # (B, T − first, C)
    else:
        h = model.trunk(tokens, adapters, mask=mask)                    # (B, T, C)
    sel = resp[:, first + 1:].bool()                                    # t is predicted at t − 1
    rows = sel.nonzero()[:, 0]                                          # (N,)
    target = tokens[:, first + 1:][sel]                                 # (N,)
    W = model.lm_head.weight
    if vocab is not None:
        vocab = torch.as_tensor(vocab, device=W.device).unique()
        hit = target[:, None] == vocab                                  # (N, A)
        W = W[vocab]
        target = hit.float().argmax(-1)                                 # ids -> positions in vocab
    logits = F.linear(h[:, :-1][sel], W).float()                        # (N, V)
    logp = -F.cross_entropy(logits, target, reduction="none")           # fused log-softmax, gather
    if vocab is not None:
        outside = ~hit.any(-1)                                          # y not allowed: π(y) = 0
        logp = logp.masked_fill(outside, float("-inf"))
    out = torch.zeros(len(tokens), device=tokens.device)
    return out.index_add(0, rows, logp)
