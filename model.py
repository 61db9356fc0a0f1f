"""nano_nash model: Phi-3 in one file, with hand-written multi-adapter LoRA, a KV-cached batched sampler
(including the geometric-mixture sampler of Nash-MD) and the one log-prob helper every loss uses.

Reading order: config -> layers -> LoRA -> GPT (forward, loading, adapters) -> KV cache -> generate ->
sequence_logprobs. Module names are the checkpoint's own (model.layers.{i}.self_attn.qkv_proj, ...), so loading
a Hugging Face Phi-3 folder is an identity key map plus shape checks, and adapters save in PEFT's format as is.
"""
import json
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


# ---------------------------------------------------------------------------------------------------- config
@dataclass
class GPTConfig:
    """Phi-3 only. `tiny` is the same architecture, small enough to train on a CPU in minutes."""
    vocab_size: int = 32064
    n_layer: int = 32
    n_head: int = 32
    n_kv_head: int = 32        # < n_head means grouped-query attention (GQA)
    n_embd: int = 3072
    intermediate_size: int = 8192
    block_size: int = 4096     # longest sequence (size of the RoPE tables)
    rope_base: float = 10000.0
    norm_eps: float = 1e-5

    @classmethod
    def from_name(cls, name: str) -> "GPTConfig":
        presets = {
            "phi3-mini": dict(),  # the defaults are microsoft/Phi-3-mini-4k-instruct's values
            "tiny": dict(vocab_size=512, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, intermediate_size=256,
                         block_size=512),
        }
        if name not in presets:
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(presets)}")
        return cls(**presets[name])


class CheckpointError(ValueError):
    """A checkpoint folder or adapter folder that cannot be loaded; the message says which file and what to do."""


# ---------------------------------------------------------------------------------------------------- layers
class RMSNorm(nn.Module):
    """y = w · x / sqrt(mean(x²) + eps), computed in float32 as Phi-3 does, then cast back."""
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return self.weight * F.rms_norm(x.float(), (x.size(-1),), eps=self.eps).to(x.dtype)


def rope_tables(head_dim, length, base, device=None):
    """cos, sin of shape (length, head_dim): angle[t, i] = t · base^(-2i/hd), repeated for both halves."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)  # (hd/2,)
    angles = torch.outer(torch.arange(length, device=device).float(), inv_freq)            # (T, hd/2)
    angles = torch.cat((angles, angles), dim=-1)                                            # (T, hd)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate-half RoPE (HF/Phi-3 convention): pairs are (x[i], x[i + hd/2]), not interleaved neighbours.
    x: (B, T, nh, hs); cos, sin: (B, T, 1, hs)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class LoRALinear(nn.Linear):
    """A bias-free linear layer that can carry several named LoRA adapters; at most one is active.

        y = x Wᵀ + (α/r) · dropout(x) Aᵀ Bᵀ        A: (r, in), B: (out, r)

    A ~ kaiming_uniform(a=√5) and B = 0 (PEFT's init), so a new adapter is an exact no-op. Keeps the name
    `weight`, so checkpoint keys are unchanged. Adapters are float32 even on a bf16 base (as PEFT does), so the
    optimizer sees full-precision parameters. `active` / `merged` / `row_masks` are set by GPT's methods."""
    def __init__(self, in_features, out_features):
        super().__init__(in_features, out_features, bias=False)
        self.lora_A, self.lora_B = nn.ParameterDict(), nn.ParameterDict()
        self.scale, self.dropout = {}, {}     # per adapter: α/r and dropout probability
        self.active = None                    # name of the adapter in use, None = the base weights
        self.merged = None                    # name of the adapter folded into `weight`, if any
        self.row_masks = None                 # {name: (B, 1, 1) 0/1} for per-row adapters (see GPT.forward)
        self.row_lora = None                  # the same as (A_cat, B_cat, gate): all adapters in two matmuls

    def delta(self, x, name):
        A, B = self.lora_A[name], self.lora_B[name]
        p = self.dropout[name]
        h = F.dropout(x, p, self.training) if p > 0 else x
        return (F.linear(F.linear(h.to(A.dtype), A), B) * self.scale[name]).to(x.dtype)  # (..., out)

    def forward(self, x):
        y = F.linear(x, self.weight)
        if self.row_masks is not None:        # per-row adapters: each row gets its own Δ (others times 0)
            if self.row_lora is not None:     # Σ_n gate_n · (x A_nᵀ) B_nᵀ, gate_n = scale_n · [row uses n]
                A, B, gate = self.row_lora    # (R, in), (out, R), (B, 1, R); R = Σ_n r_n
                return y + F.linear(F.linear(x.to(A.dtype), A) * gate, B).to(x.dtype)
            for name, m in self.row_masks.items():     # LoRA dropout on: one adapter at a time
                if name in self.lora_A:
                    y = y + m * self.delta(x, name)
        elif self.active != self.merged:
            if self.merged is not None:
                raise RuntimeError(f"adapter {self.merged!r} is merged into the weights: unmerge_adapter() first")
            if self.active in self.lora_A:    # targets may leave some layers without this adapter
                y = y + self.delta(x, self.active)
        return y


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx, self.n_head, self.n_kv_head = layer_idx, cfg.n_head, cfg.n_kv_head
        self.head_dim = cfg.n_embd // cfg.n_head
        self.qkv_proj = LoRALinear(cfg.n_embd, (cfg.n_head + 2 * cfg.n_kv_head) * self.head_dim)  # W = [q; k; v]
        self.o_proj = LoRALinear(cfg.n_embd, cfg.n_embd)

    def forward(self, x, cos, sin, mask, kv_cache):
        B, T, C = x.shape
        H, Hkv, hs = self.n_head, self.n_kv_head, self.head_dim
        qkv = self.qkv_proj(x).view(B, T, H + 2 * Hkv, hs)                 # (B, T, H + 2Hkv, hs)
        qk, v = qkv.split([H + Hkv, Hkv], dim=2)
        q, k = apply_rope(qk, cos, sin).split([H, Hkv], dim=2)             # rotate q and k in one call
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, nh, T, hs)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)                   # (B, Hkv, T_past + T, hs)
        # mask None only for plain causal training without padding; SDPA's is_causal is top-left aligned,
        # which is right there (Tq == Tk). Every other case gets an explicit (B, 1, Tq, Tk) bool mask.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=Hkv != H)            # (B, H, T, hs)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate) * up), with Phi-3's fused gate_up_proj W = [gate; up]."""
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.gate_up_proj = LoRALinear(cfg.n_embd, 2 * cfg.intermediate_size)
        self.down_proj = LoRALinear(cfg.intermediate_size, cfg.n_embd)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)                   # (B, T, I) each
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, kv_cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


# ---------------------------------------------------------------------------------------------------- model
# Checkpoint key -> our key. Our modules carry the checkpoint's names, so the table is the identity; it is kept
# as a table so that a reader sees every tensor that loading touches ({} = layer index).
PHI3_KEYS = {
    "model.embed_tokens.weight":                       "model.embed_tokens.weight",
    "model.layers.{}.input_layernorm.weight":          "model.layers.{}.input_layernorm.weight",
    "model.layers.{}.self_attn.qkv_proj.weight":       "model.layers.{}.self_attn.qkv_proj.weight",
    "model.layers.{}.self_attn.o_proj.weight":         "model.layers.{}.self_attn.o_proj.weight",
    "model.layers.{}.post_attention_layernorm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "model.layers.{}.mlp.gate_up_proj.weight":         "model.layers.{}.mlp.gate_up_proj.weight",
    "model.layers.{}.mlp.down_proj.weight":            "model.layers.{}.mlp.down_proj.weight",
    "model.norm.weight":                               "model.norm.weight",
    "lm_head.weight":                                  "lm_head.weight",
}


def convert_key(hf_key):
    """Map one checkpoint key to ours through PHI3_KEYS; None for keys we do not use."""
    generic = re.sub(r"\.(\d+)\.", ".{}.", hf_key, count=1)
    if generic not in PHI3_KEYS:
        return None
    layer = re.findall(r"\.(\d+)\.", hf_key)[:1]
    return PHI3_KEYS[generic].format(*layer)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(config.vocab_size, config.n_embd),
            layers=nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
            norm=RMSNorm(config.n_embd, config.norm_eps)))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)  # untied from embed_tokens
        self.adapters = {}            # name -> dict(r, alpha, dropout, targets): what add_adapter was given
        self.active_adapter = None
        self.name_or_path = None      # set by from_pretrained; written into adapter_config.json
        for m in self.modules():      # GPT-2 style init for models trained from scratch (no-op on meta)
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)
        self.init_rope()

    def init_rope(self, device=None):
        """(Re)build the RoPE tables. Non-persistent buffers: from_pretrained builds the model on the meta device,
        where these would stay meta tensors, so it calls this again once the weights are real."""
        device = device or self.lm_head.weight.device
        cos, sin = rope_tables(self.config.n_embd // self.config.n_head, self.config.block_size,
                               self.config.rope_base, device)
        self.register_buffer("cos", cos, persistent=False)  # (block_size, hs), float32 until the first forward
        self.register_buffer("sin", sin, persistent=False)

    def trunk(self, idx, kv_cache=None, attn_mask=None, adapter_ids=None):
        """Everything but lm_head: idx (B, T) -> final-normed hidden states (B, T, C).

        attn_mask (B, T_total), 1 = real token, 0 = padding (T_total = tokens in the cache so far + T).
        RoPE position of a token = number of real tokens before it (cumsum(mask) - 1), so a left-padded
        prompt gets the same positions as the unpadded one. Query t sees key s iff s <= t and s is real;
        every query also sees itself, so rows of pure padding never give an all-masked softmax (NaN)."""
        B, T = idx.shape
        p = 0 if kv_cache is None else kv_cache.pos                     # slots already filled
        assert p + T <= self.config.block_size, f"sequence of {p + T} > block_size {self.config.block_size}"
        new = None if attn_mask is None else attn_mask[:, -T:].bool()   # (B, T) mask of the new tokens
        if kv_cache is None:
            pos = torch.arange(T, device=idx.device)[None] if new is None else (new.cumsum(1) - 1).clamp(min=0)
            keys = new                                                  # (B, T) or None
        else:
            pos = kv_cache.seen[:, None] + (torch.arange(T, device=idx.device) if new is None
                                            else (new.cumsum(1) - 1).clamp(min=0))
            kv_cache.mask[:, p:p + T] = True if new is None else new
            kv_cache.seen += T if new is None else new.sum(1)
            keys = kv_cache.mask[:, :p + T]                             # (B, L) view, L = p + T
        if keys is None:
            mask = None                                                 # plain causal: SDPA's is_causal
        elif T == 1:
            mask = keys[:, None, None, :]                               # (B, 1, 1, L) decode: all real keys
        else:
            q_at = p + torch.arange(T, device=idx.device)[:, None]      # (T, 1) absolute query slots
            k_at = torch.arange(p + T, device=idx.device)[None, :]      # (1, L)
            mask = (k_at <= q_at) & (keys[:, None, :] | (k_at == q_at))  # (B, T, L)
            mask = mask[:, None]                                        # (B, 1, T, L)
        x = self.model.embed_tokens(idx)                                # (B, T, C)
        cos = self.cos[pos].to(x.dtype)[:, :, None, :]                  # (B or 1, T, 1, hs)
        sin = self.sin[pos].to(x.dtype)[:, :, None, :]
        with self.per_row_adapters(adapter_ids, x.dtype):
            for block in self.model.layers:
                x = block(x, cos, sin, mask, kv_cache)
        if kv_cache is not None:
            kv_cache.pos += T
        return self.model.norm(x)

    def forward(self, idx, kv_cache=None, attn_mask=None, last_only=False, adapter_ids=None):
        """idx (B, T) -> logits (B, T, V), or (B, 1, V) with last_only (prefill only needs the last position)."""
        h = self.trunk(idx, kv_cache, attn_mask, adapter_ids)
        h = h[:, -1:] if last_only else h
        if h.device.type == "cpu" and h.shape[0] * h.shape[1] <= 16:
            # decode on CPU: (W hᵀ)ᵀ = h Wᵀ, but MKL's sgemm runs the wide lm_head ~2x faster with M = vocab
            # rows than with M = B rows (measured; this matmul is most of a tiny model's decode step)
            W = self.lm_head.weight
            return (W @ h.reshape(-1, h.shape[-1]).T).T.contiguous().view(*h.shape[:2], -1)   # (B, T, V)
        return self.lm_head(h)

    # ------------------------------------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype=torch.float32) -> "GPT":
        """Load a Hugging Face Phi-3 checkpoint: a folder with config.json + *.safetensors, a HF cache folder
        models--microsoft--Phi-3-*/ (newest snapshot), or the cache root holding one. The model is built on the
        meta device and each tensor is read, cast and moved on its own, so the weights are never held twice."""
        folder = resolve_checkpoint(path)
        config = config_from_hf(folder / "config.json")
        with torch.device("meta"):
            model = cls(config)
        expected = {k: v.shape for k, v in model.state_dict().items()}
        sd = {}
        for file in checkpoint_files(folder):
            sd.update(read_safetensors(file, device, dtype, expected))
        missing = sorted(set(expected) - set(sd))
        if missing:
            raise CheckpointError(f"{folder}: {len(missing)} weights missing from the checkpoint, e.g. "
                                  f"{missing[:3]}; the download is incomplete or this is not a Phi-3 model")
        model.load_state_dict(sd, strict=True, assign=True)
        model.init_rope(device)
        model.name_or_path = str(path)
        return model.eval()

    # ------------------------------------------------------------------------------------------------ LoRA
    def lora_modules(self):
        return [(n, m) for n, m in self.named_modules() if isinstance(m, LoRALinear)]

    def add_adapter(self, name, r=16, alpha=32, dropout=0.0,
                    targets=("qkv_proj", "o_proj", "gate_up_proj", "down_proj")):
        """New adapter `name` on every LoRALinear whose name (or full path) is in `targets`. Freezes the base:
        afterwards only adapter parameters have requires_grad. Does not activate it (see set_adapter)."""
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} exists already; use another name or copy_adapter")
        if not name.isidentifier() or hasattr(nn.ParameterDict, name):   # it becomes a ParameterDict key
            raise ValueError(f"adapter name {name!r} must be an identifier and not a ParameterDict method name")
        chosen = [(n, m) for n, m in self.lora_modules() if n in targets or n.rsplit(".", 1)[-1] in targets]
        if not chosen:
            raise ValueError(f"no layer matches targets {targets}; choose from qkv_proj, o_proj, gate_up_proj, "
                             "down_proj")
        for p in self.parameters():
            p.requires_grad_(False)
        for _, m in chosen:
            A = torch.empty(r, m.in_features, device=m.weight.device)
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            m.lora_A[name] = nn.Parameter(A)
            m.lora_B[name] = nn.Parameter(torch.zeros(m.out_features, r, device=m.weight.device))
            m.scale[name], m.dropout[name] = alpha / r, dropout
        for p in self.adapter_parameters():
            p.requires_grad_(True)
        self.adapters[name] = dict(r=r, alpha=alpha, dropout=dropout, targets=tuple(targets))

    @property
    def adapter_names(self):
        return list(self.adapters)

    def set_adapter(self, name):
        """Make `name` the active adapter; None = all adapters off = the base model = π_ref."""
        if name is not None and name not in self.adapters:
            raise ValueError(f"no adapter {name!r}; adapters: {self.adapter_names}")
        for _, m in self.lora_modules():
            m.active = name
        self.active_adapter = name

    @contextmanager
    def adapter(self, name):
        """with model.adapter("ref" or None): ... temporarily switches adapter, then restores the previous one."""
        prev = self.active_adapter
        if name != prev:
            self.set_adapter(name)
        try:
            yield self
        finally:
            if name != prev:
                self.set_adapter(prev)

    @contextmanager
    def per_row_adapters(self, adapter_ids, dtype):
        """adapter_ids (B,): row b uses adapter_names[adapter_ids[b]], -1 = base. Cost: every used adapter's Δ on
        every row (LoRA is cheap next to the base matmul), masked per row: the adapters' A and B are stacked so
        that all of them cost two matmuls per layer, x [A_1; A_2]ᵀ · gate · [B_1 B_2]ᵀ (gate: (B, 1, R), each
        row's own scale on its adapter's r columns, 0 elsewhere). No-op when adapter_ids is None."""
        if adapter_ids is None:
            yield
            return
        present = set(adapter_ids.tolist())     # adapters no row uses cost nothing (one host sync per call)
        masks = {n: (adapter_ids == i).to(dtype)[:, None, None] for i, n in enumerate(self.adapter_names)
                 if i in present}
        mods = [m for _, m in self.lora_modules()]
        if any(m.merged for m in mods):
            raise RuntimeError("per-row adapters need unmerged weights: unmerge_adapter() first")
        for m in mods:
            m.row_masks = masks
            names = [n for n in masks if n in m.lora_A]
            if names and not (m.training and any(m.dropout[n] > 0 for n in names)):
                A = [m.lora_A[n] for n in names]
                gate = torch.cat([(masks[n] * m.scale[n]).to(a.dtype).expand(-1, -1, a.shape[0])
                                  for n, a in zip(names, A)], -1)                       # (B, 1, R)
                m.row_lora = (torch.cat(A), torch.cat([m.lora_B[n] for n in names], 1), gate)
        try:
            yield
        finally:
            for m in mods:
                m.row_masks = m.row_lora = None

    def adapter_parameters(self, name=None) -> list:
        """The trainable A, B tensors of adapter `name` (all adapters when None), in a fixed order."""
        return [d[k] for _, m in self.lora_modules() for d in (m.lora_A, m.lora_B) for k in d
                if name is None or k == name]

    def copy_adapter(self, src, dst):
        """dst <- src (values copied, not shared); creates dst if needed, e.g. INPO's previous iterate."""
        if dst not in self.adapters:
            self.add_adapter(dst, **self.adapters[src])
        with torch.no_grad():
            for _, m in self.lora_modules():
                if src in m.lora_A:
                    m.lora_A[dst].copy_(m.lora_A[src])
                    m.lora_B[dst].copy_(m.lora_B[src])

    @torch.no_grad()
    def merge_adapter(self, name):
        """W <- W + (α/r) B A for every layer with `name`, and make it active: forward then skips the LoRA
        matmuls. Any other adapter (or none) raises until unmerge_adapter (W - ΔW equals W up to rounding)."""
        self.set_adapter(name)
        for _, m in self.lora_modules():
            if m.merged is not None:
                raise RuntimeError(f"adapter {m.merged!r} is merged already; unmerge it first")
            if name in m.lora_A:
                m.weight += (m.scale[name] * m.lora_B[name] @ m.lora_A[name]).to(m.weight.dtype)
            m.merged = name

    @torch.no_grad()
    def unmerge_adapter(self, name):
        for _, m in self.lora_modules():
            if m.merged != name:
                raise RuntimeError(f"adapter {name!r} is not merged (merged: {m.merged!r})")
            if name in m.lora_A:
                m.weight -= (m.scale[name] * m.lora_B[name] @ m.lora_A[name]).to(m.weight.dtype)
            m.merged = None

    def save_adapter(self, name, folder):
        """PEFT format: adapter_model.safetensors (keys base_model.model.<module>.lora_A.weight) and
        adapter_config.json, so peft.PeftModel.from_pretrained(hf_phi3, folder) loads it."""
        from safetensors.torch import save_file
        cfg = self.adapters[name]
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        sd, modules = {}, set()
        for n, m in self.lora_modules():
            if name in m.lora_A:
                sd[f"base_model.model.{n}.lora_A.weight"] = m.lora_A[name].detach().contiguous().cpu()
                sd[f"base_model.model.{n}.lora_B.weight"] = m.lora_B[name].detach().contiguous().cpu()
                modules.add(n.rsplit(".", 1)[-1])
        save_file(sd, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
        config = dict(peft_type="LORA", task_type="CAUSAL_LM", r=cfg["r"], lora_alpha=cfg["alpha"],
                      lora_dropout=cfg["dropout"], target_modules=sorted(modules), bias="none",
                      base_model_name_or_path=self.name_or_path, fan_in_fan_out=False, use_rslora=False,
                      use_dora=False, init_lora_weights=True, inference_mode=True, modules_to_save=None)
        (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))

    def load_adapter(self, name, folder):
        """Read a PEFT LoRA folder (ours or peft's save_pretrained) into a new adapter `name`."""
        from safetensors.torch import load_file
        folder = Path(folder)
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            if not (folder / f).is_file():
                raise CheckpointError(f"{folder / f} not found; an adapter folder needs adapter_config.json and "
                                      "adapter_model.safetensors (as written by save_adapter or peft)")
        cfg = json.loads((folder / "adapter_config.json").read_text())
        if cfg.get("peft_type") != "LORA" or cfg.get("use_dora") or cfg.get("bias", "none") != "none":
            raise CheckpointError(f"{folder}: only plain LoRA adapters (no DoRA, bias='none') are supported")
        sd = load_file(str(folder / "adapter_model.safetensors"))
        paths = sorted({re.sub(r"^base_model\.model\.|\.lora_[AB]\.weight$", "", k) for k in sd})
        r, alpha = cfg["r"], cfg["lora_alpha"]
        self.add_adapter(name, r, alpha, cfg.get("lora_dropout", 0.0), targets=tuple(paths))
        if cfg.get("use_rslora"):
            for _, m in self.lora_modules():     # rsLoRA scales by α/√r instead of α/r
                if name in m.scale:
                    m.scale[name] = alpha / math.sqrt(r)
        modules = dict(self.lora_modules())
        with torch.no_grad():
            for p in paths:
                for ab in ("A", "B"):
                    dst, src = getattr(modules[p], f"lora_{ab}")[name], sd[f"base_model.model.{p}.lora_{ab}.weight"]
                    if dst.shape != src.shape:
                        raise CheckpointError(f"{folder}: {p}.lora_{ab} has shape {tuple(src.shape)}, the model "
                                              f"needs {tuple(dst.shape)}; the adapter was made for another base")
                    dst.copy_(src)


# ---------------------------------------------------------------------------------------------------- checkpoint files
def resolve_checkpoint(path) -> Path:
    """A folder with config.json, or HF's cache layout models--org--name/snapshots/<rev>/ (refs/main, else the
    newest snapshot), or a cache root that holds exactly one models--*Phi-3* folder."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder {path} does not exist; pass a folder with config.json and "
                              "*.safetensors (e.g. from `huggingface-cli download microsoft/Phi-3-mini-4k-instruct`)")
    if (path / "config.json").is_file():
        return path
    repos = sorted(path.glob("models--*"))
    if len(repos) > 1:
        repos = [r for r in repos if "phi-3" in r.name.lower()] or repos
    if len(repos) > 1:
        raise CheckpointError(f"{path} holds several models ({[r.name for r in repos]}); pass one of them")
    if repos:
        path = repos[0]
    if (path / "snapshots").is_dir():
        ref = path / "refs" / "main"
        snap = path / "snapshots" / ref.read_text().strip() if ref.is_file() else None
        if snap is None or not snap.is_dir():
            snaps = sorted((path / "snapshots").iterdir(), key=lambda p: p.stat().st_mtime)
            snap = snaps[-1] if snaps else None
        if snap is not None and (snap / "config.json").is_file():
            return snap
    raise CheckpointError(f"{path}: no config.json found (looked in the folder, its models--*/snapshots/*); "
                          "the download is incomplete or this is not a model folder")


def config_from_hf(file: Path) -> GPTConfig:
    """GPTConfig from a HF Phi-3 config.json, in both spellings: the original checkpoint's rope_theta /
    rope_scaling / torch_dtype, and newer transformers' rope_parameters {rope_theta, rope_type, ...} / dtype."""
    try:
        d = json.loads(Path(file).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {file}: {e}; re-download config.json") from e
    if d.get("model_type") != "phi3":
        raise CheckpointError(f"{file}: model_type is {d.get('model_type')!r}; only Phi-3 ('phi3') is supported")
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type")) or "default"
    if rope_type != "default":   # "longrope"/"su"/"yarn": the 128k-context models rescale frequencies per dim
        raise CheckpointError(f"{file}: rope type {rope_type!r} (long-context Phi-3, e.g. -128k) is not supported; "
                              "use a 4k model such as microsoft/Phi-3-mini-4k-instruct")
    if rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0)) != 1.0:
        raise CheckpointError(f"{file}: partial_rotary_factor != 1 is not supported (Phi-3 rotates whole heads)")
    if d.get("tie_word_embeddings") or d.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{file}: tied embeddings or hidden_act != silu: not a Phi-3 layout we support")
    block = d.get("max_position_embeddings", 4096)
    # Phi-3-mini-4k has sliding_window 2047: attention beyond 2047 tokens would differ from the reference, so
    # we cap block_size there instead of implementing the window (nano_nash sequences are far shorter).
    block = min(block, d.get("sliding_window") or block)
    return GPTConfig(vocab_size=d["vocab_size"], n_layer=d["num_hidden_layers"], n_head=d["num_attention_heads"],
                     n_kv_head=d.get("num_key_value_heads") or d["num_attention_heads"], n_embd=d["hidden_size"],
                     intermediate_size=d["intermediate_size"], block_size=block,
                     rope_base=float(rope.get("rope_theta", d.get("rope_theta", 10000.0))),
                     norm_eps=d.get("rms_norm_eps", 1e-5))


def checkpoint_files(folder: Path) -> list:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        names = ["model.safetensors"]
    else:
        raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json; download the "
                              "*.safetensors files too (.bin/.pt checkpoints are not supported)")
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise CheckpointError(f"{folder}: shard(s) {missing} listed in model.safetensors.index.json are missing; "
                              "re-run the download to fetch them")
    return [folder / n for n in names]


def read_safetensors(file: Path, device, dtype, expected: dict) -> dict:
    """Read one shard tensor by tensor (cast and moved one at a time), checking keys and shapes."""
    from safetensors import safe_open
    out = {}
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for hf_key in f.keys():
                key = convert_key(hf_key)
                if key is None:
                    if hf_key.endswith("rotary_emb.inv_freq"):
                        continue    # some exports save the RoPE frequencies; we recompute them
                    raise CheckpointError(f"{file}: unexpected weight {hf_key!r}; this is not a Phi-3 checkpoint")
                if key not in expected:
                    raise CheckpointError(f"{file}: weight {hf_key!r} does not exist in a model with this "
                                          "config.json (more layers?); config.json and weights disagree")
                t = f.get_slice(hf_key)
                if tuple(t.get_shape()) != tuple(expected[key]):
                    raise CheckpointError(f"{file}: {hf_key} has shape {tuple(t.get_shape())} but config.json "
                                          f"implies {tuple(expected[key])}; config.json and weights disagree")
                # On CPU in the file's dtype this stays a lazy memory-mapped view (safetensors' zero copy): peak
                # memory is one copy of the weights, but do not overwrite the file while the model is alive.
                out[key] = f.get_tensor(hf_key).to(device=device, dtype=dtype)
    except CheckpointError:
        raise
    except Exception as e:          # safetensors raises its own error types on truncated or corrupt files
        raise CheckpointError(f"{file} is truncated or corrupt ({type(e).__name__}: {e}); delete it and "
                              "download it again") from e
    return out


# ---------------------------------------------------------------------------------------------------- KV cache
class KVCache:
    """Preallocated keys and values, written in place: k, v of shape (L, B, H_kv, S_max, hs).

    Passed explicitly to forward, never stored on modules. All rows share one write slot `pos` (prompts are
    left-padded, so they end at the same slot); `mask` (B, S_max) marks which filled slots hold real tokens and
    `seen` (B,) counts real tokens per row, which is the RoPE position of the next token."""
    def __init__(self, config: GPTConfig, batch_size, max_len, device="cpu", dtype=torch.float32):
        hs = config.n_embd // config.n_head
        shape = (config.n_layer, batch_size, config.n_kv_head, max_len, hs)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.mask = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.seen = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.pos = 0

    def update(self, layer, k, v):
        """Write k, v (B, H_kv, T, hs) at slots pos..pos+T-1; return views of everything so far (no copies)."""
        end = self.pos + k.size(2)
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


# ---------------------------------------------------------------------------------------------------- sampling
def sample_next(logits, temperature, top_p, generator, rows=None, n_draw=None):
    """logits (B, V) -> (B,) token ids. temperature 0 = greedy; top_p < 1 keeps the smallest set of tokens
    whose probability reaches top_p (nucleus sampling). With `rows`, one uniform is drawn for each of n_draw
    rows and rows[b] is row b's: a row's sample does not depend on which other rows are computed here."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = (logits.float() / temperature).softmax(-1)                 # (B, V)
    if top_p < 1.0:
        p_sorted, idx = probs.sort(-1, descending=True)
        drop = p_sorted.cumsum(-1) - p_sorted > top_p                  # mass before this token already >= top_p
        probs = probs.scatter(-1, idx, p_sorted.masked_fill(drop, 0.0))
    # Inverse-CDF sampling: the first y with cdf(y) > u · total. 10x faster than torch.multinomial on CPU
    # (measured on 4 x 32064); `right=True` and u < 1 never pick a zero-probability token.
    cdf = probs.cumsum(-1)                                             # (B, V)
    u = torch.rand(probs.size(0) if rows is None else n_draw, 1, generator=generator, device=probs.device)
    u = u if rows is None else u[rows]                                 # (B, 1)
    return torch.searchsorted(cdf, u * cdf[:, -1:] * (1 - 2**-22), right=True).squeeze(-1)


def next_token_logits(lp, lq, mix_beta, allowed_bias):
    """The sampler's next-token logits (up to a constant per row), before temperature.
        mixture:   (1-β) log π(y) + β log μ(y)    π = policy (lp), μ = mix adapter (lq); β = 0: just lp
        allowed:   -inf outside allowed_tokens (the constrained softmax renormalises over the allowed ids)."""
    if lq is not None:                     # mix_beta: a float, or (B, 1) for one β per row
        lp = (1 - mix_beta) * lp.float().log_softmax(-1) + mix_beta * lq.float().log_softmax(-1)
    return lp if allowed_bias is None else lp + allowed_bias


@torch.no_grad()
def generate(model, prompts, *, max_new_tokens, temperature=1.0, top_p=1.0, stop_tokens=(), pad_id=0,
             generator=None, adapter=..., mix_adapter=None, mix_beta=0.0, allowed_tokens=None, rows=None):
    """Batched KV-cached sampling. prompts: list of token lists (different lengths: left-padded).
    adapter: adapter to sample from (... = the active one; None = base), or a list with one per prompt.
    With mix_beta > 0 tokens come from the geometric mixture π^(1-β) μ^β of `adapter` and `mix_adapter`
    (None = base); mix_beta may also be a list with one β per prompt (0 = that row samples π alone).
    Every row, and the μ copy of every mixed row, runs in ONE forward pass per token with its own KV-cache row
    (per-row adapters, GPT.per_row_adapters): on a small model the weights are read once for all of them.
    Returns tokens, attn_mask, resp_mask, all (B, Tp + max_new_tokens): attn_mask is 0 on left padding and after
    a row stopped; resp_mask is 1 on generated tokens including the stop token. Finished rows hold pad_id.
    rows: sample only these rows of `prompts` (and of per-row adapter / mix_beta lists), with the random numbers
    that the whole batch would use: data-parallel ranks each generate their own slice of a global batch and get
    exactly the rows one process would (train_lm.py under torchrun)."""
    n_draw = len(prompts)
    if rows is not None:
        rows = torch.as_tensor(rows, dtype=torch.long)
        pick = lambda xs: [xs[i] for i in rows.tolist()] if isinstance(xs, (list, tuple)) else xs  # noqa: E731
        prompts, adapter, mix_beta = pick(prompts), pick(adapter), pick(mix_beta)
    B, Tp, N = len(prompts), max(len(p) for p in prompts), max_new_tokens
    device, dtype = model.lm_head.weight.device, model.lm_head.weight.dtype
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (e.g. BOS)")
    tokens = torch.full((B, Tp + N), pad_id, dtype=torch.long, device=device)
    attn = torch.zeros(B, Tp + N, dtype=torch.bool, device=device)
    for b, p in enumerate(prompts):
        tokens[b, Tp - len(p):Tp] = torch.tensor(p, dtype=torch.long)
        attn[b, Tp - len(p):Tp] = True
    resp = torch.zeros_like(attn)
    policy = model.active_adapter if adapter is ... else adapter
    names = list(policy) if isinstance(policy, (list, tuple)) else [policy] * B     # adapter of each row
    betas = [float(b) for b in mix_beta] if isinstance(mix_beta, (list, tuple)) else [float(mix_beta)] * B
    if len(names) != B or len(betas) != B:
        raise ValueError(f"adapter and mix_beta lists need one entry per prompt ({B}), got {len(names)}, {len(betas)}")
    mixed = [b for b in range(B) if betas[b] > 0]          # rows whose μ copy runs as an extra row b' = B + j
    names += [mix_adapter] * len(mixed)
    mix_rows = torch.tensor(mixed, dtype=torch.long, device=device)
    beta = betas[mixed[0]] if mixed and len({betas[b] for b in mixed}) == 1 else \
        torch.tensor([betas[b] for b in mixed], device=device)[:, None]               # scalar, or (M, 1)
    cache = KVCache(model.config, len(names), Tp + N, device, dtype)
    stop = torch.tensor(list(stop_tokens), dtype=torch.long, device=device)
    allowed_bias = None
    if allowed_tokens is not None:         # built once, added to every step's logits
        allowed_bias = torch.full((model.config.vocab_size,), float("-inf"), device=device)
        allowed_bias[torch.as_tensor(allowed_tokens, device=device)] = 0.0
    done = torch.zeros(B, dtype=torch.bool, device=device)

    def step(x, mask):                     # (B, T) -> next-token logits (B, V)
        if mixed:                          # the μ rows see the same tokens as the rows they mix with
            x = torch.cat((x, x[mix_rows]))
            mask = None if mask is None else torch.cat((mask, mask[mix_rows]))
        logits = model(x, cache, mask, last_only=True)[:, -1]         # (B + M, V)
        lp = logits[:B]
        if not mixed:
            return next_token_logits(lp, None, 0.0, allowed_bias)
        if len(mixed) == B:
            return next_token_logits(lp, logits[B:], beta, allowed_bias)
        out = next_token_logits(lp.float(), None, 0.0, allowed_bias)
        out[mix_rows] = next_token_logits(lp[mix_rows], logits[B:], beta, allowed_bias)
        return out

    one = names[0] if len(set(names)) == 1 else ...                   # one adapter for every row: no masks
    ids = None if one is not ... else torch.tensor(
        [-1 if n is None else model.adapter_names.index(n) for n in names], device=device)
    was_training = model.training
    model.eval()                           # no LoRA dropout while sampling
    try:
        with model.adapter(None if one is ... else one), model.per_row_adapters(ids, dtype):
            logits = step(tokens[:, :Tp], attn[:, :Tp])                # prefill
            for i in range(N):
                nxt = sample_next(logits, temperature, top_p, generator, rows, n_draw)    # (B,)
                nxt = nxt.masked_fill(done, pad_id)
                tokens[:, Tp + i] = nxt
                attn[:, Tp + i] = resp[:, Tp + i] = ~done
                if len(stop):
                    done = done | torch.isin(nxt, stop)
                    if bool(done.all()):   # the only host sync per step
                        for _ in range(N - 1 - i) if temperature else ():   # the draws of the steps not taken:
                            torch.rand(n_draw, 1, generator=generator, device=device)   # `generator` ends
                        break                                         # in the same state however rows stop
                if i + 1 < N:
                    logits = step(nxt[:, None], None)                  # decode one token, mask from the cache
    finally:
        model.train(was_training)
    return tokens, attn.long(), resp.long()


# ---------------------------------------------------------------------------------------------------- log-probs
def sequence_logprobs(model, tokens, attn_mask, resp_mask, adapter_ids=None):
    """log π(y|x) = Σ_t resp_mask[t] · log π(tokens[t] | tokens[<t]), per row: (B,). Differentiable.

    Only response positions go through lm_head, and log π = logit[y] - logsumexp(logits), so neither the
    full (B, T, V) logits nor a log_softmax of them is ever materialised."""
    h = model.trunk(tokens, attn_mask=attn_mask, adapter_ids=adapter_ids)  # (B, T, C)
    sel = resp_mask[:, 1:].bool()                                          # token t is predicted at t-1
    rows = torch.arange(tokens.size(0), device=tokens.device)[:, None].expand_as(sel)[sel]  # (N,)
    logits = model.lm_head(h[:, :-1][sel]).float()                         # (N, V)
    target = tokens[:, 1:][sel]                                            # (N,)
    logp = logits.gather(-1, target[:, None]).squeeze(-1) - logits.logsumexp(-1)  # (N,)
    return torch.zeros(tokens.size(0), device=tokens.device).index_add(0, rows, logp)
