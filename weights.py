"""
weights.py: weights on disk. A Hugging Face checkpoint in (Phi-3 or Llama layout; a folder, or the
Hugging Face cache), LoRA adapters in and out in PEFT's format, and base + adapter merged back out
as a Hugging Face folder. Kept apart from model.py, which only computes.

    model, folder = load_model("~/Phi-3-mini-4k-instruct", device="cuda", dtype=torch.bfloat16)
    save_adapter(model, "policy", "out/ckpt/policy", base_model="microsoft/Phi-3-mini-4k-instruct")
    load_adapter(model, "policy", "out/ckpt/policy")  # peft.PeftModel.from_pretrained reads it too
    export_merged(model, "policy", folder, "out/merged")  # transformers' from_pretrained reads it

Two layouts, one GPT. Phi-3 stores q, k, v (and gate, up) fused, as GPT computes them; Llama
(SmolLM2) stores them apart and may tie the output layer to the embedding. LAYOUTS maps the names:
loading fuses the parts into GPT's layers, saving an adapter or an export splits them again.

Everything is checked before anything large is allocated: config.json by one table of (key, type,
range), then every tensor's name, shape and dtype from the safetensors headers; values are checked
as they are read. Every problem raises CheckpointError naming the file and what to do. The model
is built on the meta device and each tensor is read, cast and moved on its own (a part straight
into its rows of the fused layer), so the weights are never held twice.
"""
import json
import re
import shutil
from pathlib import Path

import torch

from model import GPT, GPTConfig, LoRALinear


class CheckpointError(ValueError):
    """A checkpoint or adapter that cannot be used; the message names the file and the fix."""


# -------------------------------------------------------------------------------------------------
# layouts: how a checkpoint's names map onto GPT's

# model_type -> {a layer of ours: the checkpoint's layers it fuses, stacked by rows in this order
# (their row counts are the layer's `parts`)}. Every other name is the same in both. A tied
# output layer is stored once, as model.embed_tokens.
LAYOUTS = {
    "phi3": {},
    "llama": {
        "qkv_proj": ("q_proj", "k_proj", "v_proj"),
        "gate_up_proj": ("gate_proj", "up_proj"),
    },
}

# options GPT does not implement: config.json key -> the one value it may hold (absent or null:
# that value), in every layout, then per layout (Phi-3's sliding window: sequences stop there)
PLAIN = dict(hidden_act="silu", attention_bias=False, mlp_bias=False)
PLAIN_IN = dict(
    phi3=dict(tie_word_embeddings=False),
    llama=dict(sliding_window=None),
)

# what an export copies from the source folder as it is, where present
COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
          "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt",
          "added_tokens.json", "chat_template.jinja")


def stored_layers(model):
    """{a layer's name in the checkpoint: (our layer's name, the rows of our weight it holds)}:
    our name, or the parts LAYOUTS names, stacked by rows. Every base weight is a layer's .weight;
    named_parameters lists a tied one once (the embedding's)."""
    fused = LAYOUTS[model.config.model_type]
    names = {}
    for name, _ in model.named_parameters():
        if "lora_" in name:
            continue
        path = name.removesuffix(".weight")
        head, dot, kind = path.rpartition(".")
        if kind not in fused:
            names[path] = (path, slice(None))
            continue
        start = 0
        for part, rows in zip(fused[kind], model.get_submodule(path).parts):
            names[head + dot + part] = (path, slice(start, start + rows))
            start += rows
    return names


# -------------------------------------------------------------------------------------------------
# the checkpoint folder

def find_checkpoint(path):
    """A folder with config.json, or the Hugging Face cache layout
    models--org--name/snapshots/<rev>/ (the revision in refs/main, else the newest snapshot), or
    a cache root holding one model (one models--* folder with a snapshot), whatever its name."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise CheckpointError(
            f"checkpoint folder {path} does not exist; pass a folder with config.json and "
            "*.safetensors (`huggingface-cli download microsoft/Phi-3-mini-4k-instruct`, or "
            "HuggingFaceTB/SmolLM2-135M-Instruct)"
        )
    if (path / "config.json").is_file():
        return path
    # the cache's models: models--org--name/ with a snapshots/ folder
    repos = sorted(r.parent for r in path.glob("models--*/snapshots"))
    if len(repos) > 1:
        raise CheckpointError(
            f"{path} holds several models ({[r.name for r in repos]}); pass one of them"
        )
    repo = repos[0] if repos else path
    # folders only ("*/"): a stray file is not a snapshot
    snaps = sorted((repo / "snapshots").glob("*/"), key=lambda p: p.stat().st_mtime)
    ref = repo / "refs" / "main"
    rev = ref.read_text().strip() if ref.is_file() else ""
    # a revision name, never a path out of the cache
    if rev and not re.fullmatch(r"\w[\w.-]*", rev):
        raise CheckpointError(f"{ref} holds {rev[:80]!r}, not a revision name; delete the file")
    snap = repo / "snapshots" / rev if rev else (snaps or [path])[-1]
    if snaps and not snap.is_dir():                 # never another snapshot in its place
        raise CheckpointError(f"{ref} names revision {rev}, which is not in {snap.parent}; "
                              "download it again, or delete refs/main to use the newest snapshot")
    if not (snap / "config.json").is_file():
        raise CheckpointError(
            f"{path}: no config.json (looked in the folder and in models--*/snapshots/*); "
            "the download is incomplete or this is not a model folder"
        )
    return snap


def model_name(folder):
    """What adapter configs record as the base model: "org/name" for the cache layout, else the
    folder's name (never this machine's absolute path)."""
    m = re.search(r"models--([^/]+?)--([^/]+)/snapshots", str(folder))
    return f"{m.group(1)}/{m.group(2)}" if m else Path(folder).resolve().name


# (config.json key, GPTConfig field, type, range), checked in this order; the last four have
# defaults
CONFIG_KEYS = [
    ("vocab_size", "vocab_size", int, (2, 1_000_000)),
    ("num_hidden_layers", "n_layer", int, (1, 1024)),
    ("num_attention_heads", "n_head", int, (1, 1024)),
    ("hidden_size", "n_embd", int, (2, 65536)),
    ("intermediate_size", "intermediate_size", int, (1, 262144)),
    ("max_position_embeddings", "block_size", int, (1, 1 << 20)),
    ("num_key_value_heads", "n_kv_head", int, (1, 1024)),
    ("rope_theta", "rope_base", float, (1.0, 1e9)),
    ("rms_norm_eps", "norm_eps", float, (1e-12, 0.1)),
    ("sliding_window", "sliding_window", int, (1, 1 << 20)),
]


def read_config(file):
    """GPTConfig from a Phi-3 or Llama config.json, in both spellings (rope_theta / rope_scaling,
    and newer transformers' rope_parameters {rope_theta, rope_type}). An option GPT does not
    implement (RoPE scaling, biases, Llama's sliding window, other head sizes) is refused by
    name."""
    try:
        d = json.loads(Path(file).read_text(encoding="utf-8"))
        if not isinstance(d, dict):                 # not an assert: python -O keeps this check
            raise ValueError(f"a JSON {type(d).__name__}")
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(
            f"cannot read {file} as a JSON object ({e}); re-download config.json"
        ) from None
    layout = d.get("model_type")
    if layout not in LAYOUTS:
        raise CheckpointError(
            f"{file}: model_type is {layout!r}; only {sorted(LAYOUTS)} are supported"
        )
    # both keys: a default rope_parameters may sit next to a rope_scaling that scales
    for key in ("rope_scaling", "rope_parameters"):
        rope = d.get(key) or {}
        if not isinstance(rope, dict):
            raise CheckpointError(f"{file}: {key} is not an object; re-download it")
        kind = rope.get("rope_type", rope.get("type")) or "default"
        partial = rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
        if kind != "default" or partial != 1.0:
            raise CheckpointError(
                f"{file}: {key} of type {kind!r} (partial_rotary_factor {partial}) is not "
                "supported: RoPE scaling is not implemented (long-context Phi-3, e.g. -128k: "
                "use a 4k model such as microsoft/Phi-3-mini-4k-instruct)"
            )
        d["rope_theta"] = rope.get("rope_theta", d.get("rope_theta"))  # rope_parameters' first
    for key, only in {**PLAIN, **PLAIN_IN[layout]}.items():
        if d.get(key) not in (None, only):
            raise CheckpointError(
                f"{file}: {key} = {d[key]!r} is not implemented (only {only!r}) for {layout}"
            )
    defaults = {
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5,
        "num_key_value_heads": d.get("num_attention_heads"),
        "sliding_window": d.get("max_position_embeddings"),
    }
    for key, default in defaults.items():
        if d.get(key) is None:
            d[key] = default
    fields = {}
    for key, field, typ, (lo, hi) in CONFIG_KEYS:
        v = d.get(key)
        if v is None:
            raise CheckpointError(f"{file}: key {key!r} is missing; re-download config.json")
        number = isinstance(v, (int, float)) and not isinstance(v, bool)
        if not number or not lo <= v <= hi or (typ is int and v != int(v)):
            kind = "an integer" if typ is int else "a number"
            raise CheckpointError(
                f"{file}: {key} = {v!r} must be {kind} in [{lo:g}, {hi:g}]; config.json is damaged"
            )
        fields[field] = typ(v)
    window = fields.pop("sliding_window")
    fields["tie_embeddings"] = d.get("tie_word_embeddings") is True
    c = GPTConfig(**fields, model_type=layout)
    hs = c.n_embd // c.n_head
    if c.n_embd % c.n_head or c.n_head % c.n_kv_head or hs % 2:
        raise CheckpointError(
            f"{file}: hidden_size {c.n_embd}, {c.n_head} heads and {c.n_kv_head} key-value "
            "heads must divide evenly into heads of even size"
        )
    if d.get("head_dim") not in (None, hs):
        raise CheckpointError(
            f"{file}: head_dim = {d['head_dim']!r} is not implemented (only hidden_size / "
            f"num_attention_heads = {hs})"
        )
    c.block_size = min(c.block_size, window)       # Phi-3-mini-4k: 2047; sequences stop there
    return c


def shard_files(folder):
    """(the safetensors files, the index's {tensor name: file name}; {} without an index)."""
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        if not (folder / "model.safetensors").is_file():
            raise CheckpointError(
                f"{folder}: no model.safetensors or model.safetensors.index.json; download "
                "the *.safetensors files too (.bin/.pt checkpoints are not supported)"
            )
        return [folder / "model.safetensors"], {}
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{index} has no valid weight_map ({e!r}); re-download it") from None
    # a plain file name: nothing outside the folder
    bad = [n for n in names
           if not isinstance(n, str) or not re.fullmatch(r"[\w.-]+\.safetensors", n)]
    if bad:
        raise CheckpointError(
            f"{index} lists {bad[:2]}, not file names in the folder; re-download it"
        )
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise CheckpointError(
            f"{folder}: shard(s) {missing} listed in {index.name} are missing; re-run the "
            "download to fetch them"
        )
    return [folder / n for n in names], weight_map


# -------------------------------------------------------------------------------------------------
# loading

def load_model(path, device="cpu", dtype=torch.float32):
    """(GPT in eval mode with the checkpoint's weights, the folder it came from), from a Phi-3 or
    Llama-layout checkpoint. Each tensor is read once, from the shard the index names."""
    from safetensors import SafetensorError, safe_open
    folder = find_checkpoint(path)
    config = read_config(folder / "config.json")
    with torch.device("meta"):
        model = GPT(config)
    names = {}                  # a tensor's name in the checkpoint -> (our weight's, its rows)
    for part, (path, rows) in stored_layers(model).items():
        names[part + ".weight"] = (path + ".weight", rows)
    sd = {}
    files, index = shard_files(folder)
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for key in f.keys():
                    if key.endswith("rotary_emb.inv_freq"):
                        continue                    # some exports save these; we recompute them
                    if key == "lm_head.weight" and config.tie_embeddings:
                        continue                    # a tied copy some exports save: unused
                    if index and index.get(key) != file.name:
                        raise CheckpointError(
                            f"{file}: holds {key}, but the index names {index.get(key)} for "
                            "it (a tensor in two shards, or a stale index); re-download the "
                            "checkpoint"
                        )
                    if key not in names:
                        raise CheckpointError(
                            f"{file}: {key}: no such weight in a {config.model_type} model; "
                            "this is another architecture"
                        )
                    ours, rows = names.pop(key)     # what is left is missing
                    weight = model.get_parameter(ours)
                    t = f.get_slice(key)
                    shape = tuple(t.get_shape())
                    want = tuple(weight[rows].shape)
                    if shape != want:
                        raise CheckpointError(
                            f"{file}: {key} has shape {shape}, config.json implies {want}; "
                            "config.json and weights disagree"
                        )
                    if t.get_dtype() not in ("F16", "BF16", "F32", "F64"):
                        raise CheckpointError(
                            f"{file}: {key} is stored as {t.get_dtype()}, not floating point; "
                            "this is not a checkpoint we can train on"
                        )
                    if ours not in sd:
                        sd[ours] = torch.empty(weight.shape, device=device, dtype=dtype)
                    x = sd[ours][rows]              # all rows, or a part's of a fused layer
                    x.copy_(f.get_tensor(key))      # cast and moved as it is copied in
                    # min and max, not isfinite(x).all(): no mask of x's size
                    if not (torch.isfinite(x.amax()) and torch.isfinite(x.amin())):
                        raise CheckpointError(
                            f"{file}: {key} holds NaN or inf values; re-download the file"
                        )
        except SafetensorError as e:
            raise CheckpointError(
                f"{file} is truncated or corrupt ({e}); download it again"
            ) from None
        except torch.OutOfMemoryError:
            raise CheckpointError(
                f"out of memory loading {file.name} onto {device}: use a device with more "
                "memory or --dtype bfloat16"
            ) from None
    missing = sorted(names)
    if missing:
        raise CheckpointError(
            f"{folder}: {len(missing)} weights missing, e.g. {missing[:3]}; the download "
            f"is incomplete or this is not a {config.model_type} model"
        )
    model.load_state_dict(sd, strict=not config.tie_embeddings, assign=True)
    if config.tie_embeddings:                   # assign set the embedding's Parameter alone
        model.lm_head.weight = model.model.embed_tokens.weight
    model.init_rope(device)
    return model.eval(), folder




def export_merged(model, adapter, source, folder):
    """Write the base with adapter merged in (W + (α/r) B A, as merge_adapter adds it; None: the
    base alone) as a Hugging Face folder in the layout of `source`, the checkpoint it was loaded
    from: model.safetensors under the checkpoint's names (q, k, v apart again for Llama, a tied
    output layer once), and config.json and the tokenizer files copied. transformers'
    from_pretrained loads it. The model is not changed."""
    from safetensors.torch import save_file
    source = find_checkpoint(source)
    if read_config(source / "config.json") != model.config:
        raise CheckpointError(
            f"{source / 'config.json'} is not this model's config; pass the folder the base "
            "was loaded from"
        )
    sd = {}
    with torch.no_grad():
        for part, (path, rows) in stored_layers(model).items():
            layer = model.get_submodule(path)
            W = layer.weight
            if adapter and isinstance(layer, LoRALinear):
                W = W + model.lora_delta(layer, adapter)
            sd[part + ".weight"] = W[rows].to("cpu", copy=True)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    for name in COPIED:
        if (source / name).is_file():
            shutil.copyfile(source / name, folder / name)


# -------------------------------------------------------------------------------------------------
# LoRA adapters in PEFT's format: adapter_model.safetensors with keys
# base_model.model.<module>.lora_{A,B}.weight, and adapter_config.json. A LoRA on a layer the
# checkpoint stores in parts is saved as one LoRA per part, sharing A, B split by rows:
# [B_q; B_k; B_v] A = [B_q A; B_k A; B_v A], exactly; loading concatenates the B's again.

def save_adapter(model, name, folder, base_model=""):
    from safetensors.torch import save_file
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = {}
    for part, (path, rows) in stored_layers(model).items():
        layer = model.get_submodule(path)
        if not isinstance(layer, LoRALinear):
            continue
        prefix = f"base_model.model.{part}.lora_"
        # copies: safetensors refuses tensors that share memory
        sd[prefix + "A.weight"] = layer.lora_A[name].detach().cpu().clone()
        sd[prefix + "B.weight"] = layer.lora_B[name][rows].detach().cpu().clone()
    save_file(sd, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    r, alpha = model.adapters[name]
    targets = [key.split(".")[-3] for key in sd]                # e.g. "q_proj"
    config = dict(
        peft_type="LORA",
        task_type="CAUSAL_LM",
        r=r,
        lora_alpha=alpha,
        lora_dropout=0.0,
        bias="none",
        target_modules=list(dict.fromkeys(targets)),
        use_rslora=False,
        use_dora=False,
        base_model_name_or_path=base_model,
        fan_in_fan_out=False,
        inference_mode=True,
    )
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))


def load_adapter(model, name, folder):
    """A PEFT LoRA folder (ours, or peft's save_pretrained) -> a new adapter `name`. Layers the
    file does not cover keep B = 0 (no change). Checks every file, shape and value before the
    adapter is added."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    folder = Path(folder)
    try:
        cfg = json.loads((folder / "adapter_config.json").read_text())
        sd = load_file(str(folder / "adapter_model.safetensors"))
    except (OSError, ValueError, SafetensorError) as e:
        raise CheckpointError(
            f"adapter {folder} is missing or unreadable ({type(e).__name__}: {e}); it "
            "needs adapter_config.json and adapter_model.safetensors"
        ) from None
    cfg = cfg if isinstance(cfg, dict) else {}      # a JSON list or number: refused just below
    r = cfg.get("r")
    alpha = cfg.get("lora_alpha")
    plain = (
        cfg.get("peft_type") == "LORA"
        and not (cfg.get("use_dora") or cfg.get("use_rslora"))
        and cfg.get("bias", "none") == "none"
        and isinstance(r, int)
        and isinstance(alpha, (int, float))
    )
    if r is None or not plain:
        raise CheckpointError(
            f"{folder}: only plain LoRA adapters (integer r, no DoRA/rsLoRA/bias) are supported"
        )
    names = stored_layers(model)
    seen = set()                # (the checkpoint's layer, "A" or "B")
    A_of = {}                   # our layer -> its lora_A, which all its parts share
    B_of = {}                   # our layer -> its lora_B: its parts' stacked by rows
    for key, t in sd.items():
        m = re.fullmatch(r"base_model\.model\.(.+)\.lora_([AB])(?:\.default)?\.weight", key)
        path, rows = names.get(m and m.group(1), ("", None))
        layer = model.get_submodule(path)           # "": the model, not a layer with LoRA
        if not isinstance(layer, LoRALinear):
            raise CheckpointError(
                f"{folder}: {key} is not a LoRA weight of this model (another base?)"
            )
        part, ab = m.groups()
        shape = (r, layer.in_features) if ab == "A" else (layer.weight[rows].shape[0], r)
        if tuple(t.shape) != shape:
            bad = f"shape {tuple(t.shape)}, the model's is {shape}"
        elif not t.is_floating_point() or not torch.isfinite(t).all():
            bad = "non-finite or non-float values"
        else:
            bad = ""
        if bad:
            raise CheckpointError(
                f"{folder}: {key} has {bad}; the adapter is damaged or for another base"
            )
        seen.add((part, ab))
        if ab == "B":
            B_of.setdefault(path, torch.zeros(layer.out_features, r))[rows] = t
        elif not torch.equal(A_of.setdefault(path, t), t):
            raise CheckpointError(
                f"{folder}: {key} differs from the lora_A of another part of our {path}, so "
                "they cannot fuse; only adapters whose parts share A (as save_adapter writes) load"
            )
    # a lora_B without its lora_A would keep A's random init (a lora_A alone changes nothing)
    if {p for p, _ in seen} != {p for p, ab in seen if ab == "A"} or not seen:
        raise CheckpointError(
            f"{folder}: every layer needs lora_A and lora_B; the adapter is incomplete"
        )
    model.add_adapter(name, r, alpha)
    with torch.no_grad():
        for path, A in A_of.items():
            model.get_submodule(path).lora_A[name].copy_(A)
        for path, B in B_of.items():
            model.get_submodule(path).lora_B[name].copy_(B)
