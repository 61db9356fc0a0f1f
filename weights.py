"""
weights.py: weights on disk. A Hugging Face Phi-3 checkpoint in (a folder, or the Hugging Face cache), LoRA
adapters in and out in PEFT's format. Kept apart from model.py, which only computes.

    model, folder = load_phi3("~/Phi-3-mini-4k-instruct", device="cuda", dtype=torch.bfloat16)
    save_adapter(model, "policy", "out/ckpt/policy", base_model="microsoft/Phi-3-mini-4k-instruct")
    load_adapter(model, "policy", "out/ckpt/policy")      # peft.PeftModel.from_pretrained reads it too

Everything is checked before anything large is allocated: config.json by one table of (key, type, range), then
every tensor's name, shape and dtype from the safetensors headers; values are checked as they are read. Every
problem raises CheckpointError naming the file and what to do. The model is built on the meta device and each
tensor is read, cast and moved on its own, so the weights are never held twice.
"""
import json
import re
from pathlib import Path

import torch

from model import GPT, GPTConfig


class CheckpointError(ValueError):
    """A checkpoint or adapter that cannot be used; the message names the file and the fix."""


# ----------------------------------------------------------------------------------------------------------
# the checkpoint folder

def find_checkpoint(path):
    """A folder with config.json, or the Hugging Face cache layout models--org--name/snapshots/<rev>/ (the
    revision in refs/main, else the newest snapshot), or a cache root holding one models--*Phi-3* folder."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder {path} does not exist; pass a folder with config.json and "
                              "*.safetensors (`huggingface-cli download microsoft/Phi-3-mini-4k-instruct`)")
    if (path / "config.json").is_file():
        return path
    repos = sorted(path.glob("models--*"))
    repos = [r for r in repos if "phi-3" in r.name.lower()] or repos
    if len(repos) > 1:
        raise CheckpointError(f"{path} holds several models ({[r.name for r in repos]}); pass one of them")
    repo = repos[0] if repos else path
    snaps = sorted((repo / "snapshots").glob("*"), key=lambda p: p.stat().st_mtime)
    ref = repo / "refs" / "main"
    rev = ref.read_text().strip() if ref.is_file() else ""
    if rev and not re.fullmatch(r"\w[\w.-]*", rev):        # a revision name, never a path out of the cache
        raise CheckpointError(f"{ref} holds {rev[:80]!r}, not a revision name; delete the file")
    snap = repo / "snapshots" / rev if rev and (repo / "snapshots" / rev).is_dir() else (snaps or [None])[-1]
    if snap is None or not (snap / "config.json").is_file():
        raise CheckpointError(f"{path}: no config.json (looked in the folder and in models--*/snapshots/*); "
                              "the download is incomplete or this is not a model folder")
    return snap


def model_name(folder):
    """What adapter configs record as the base model: "org/name" for the cache layout, else the folder's name
    (never this machine's absolute path)."""
    m = re.search(r"models--([^/]+?)--([^/]+)/snapshots", str(folder))
    return f"{m.group(1)}/{m.group(2)}" if m else Path(folder).resolve().name


# (config.json key, GPTConfig field, type, range), checked in this order; the last four have defaults
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
    """GPTConfig from a Phi-3 config.json, in both spellings (rope_theta / rope_scaling, and newer
    transformers' rope_parameters {rope_theta, rope_type})."""
    try:
        d = json.loads(Path(file).read_text(encoding="utf-8"))
        if not isinstance(d, dict):                             # not an assert: python -O keeps this check
            raise ValueError(f"a JSON {type(d).__name__}")
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"cannot read {file} as a JSON object ({e}); re-download config.json") from None
    if d.get("model_type") != "phi3":
        raise CheckpointError(f"{file}: model_type is {d.get('model_type')!r}; only 'phi3' is supported")
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise CheckpointError(f"{file}: rope_scaling or rope_parameters is not an object; re-download it")
    kind = rope.get("rope_type", rope.get("type")) or "default"
    if kind != "default" or rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0)) != 1.0:
        raise CheckpointError(f"{file}: rope type {kind!r} (long-context Phi-3, e.g. -128k) is not "
                              "supported; "
                              "use a 4k model such as microsoft/Phi-3-mini-4k-instruct")
    if d.get("tie_word_embeddings") or d.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{file}: tied embeddings or hidden_act != silu is not the Phi-3 layout")
    d = {**d, "rope_theta": rope.get("rope_theta", d.get("rope_theta", 10000.0))}
    for key, default in (("rms_norm_eps", 1e-5), ("num_key_value_heads", d.get("num_attention_heads")),
                         ("sliding_window", d.get("max_position_embeddings"))):
        d[key] = default if d.get(key) is None else d[key]
    fields = {}
    for key, field, typ, (lo, hi) in CONFIG_KEYS:
        v = d.get(key)
        if v is None:
            raise CheckpointError(f"{file}: key {key!r} is missing; re-download config.json")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (lo <= v <= hi) \
                or (typ is int and v != int(v)):
            kind = "an integer" if typ is int else "a number"
            raise CheckpointError(f"{file}: {key} = {v!r} must be {kind} in [{lo:g}, {hi:g}]; "
                                  "config.json is damaged")
        fields[field] = typ(v)
    c = GPTConfig(**{k: v for k, v in fields.items() if k != "sliding_window"})
    hs = c.n_embd // c.n_head
    if c.n_embd % c.n_head or c.n_head % c.n_kv_head or hs % 2:
        raise CheckpointError(f"{file}: hidden_size {c.n_embd}, {c.n_head} heads and {c.n_kv_head} key-value "
                              "heads must divide evenly into heads of even size")
    c.block_size = min(c.block_size, fields["sliding_window"])   # Phi-3-mini-4k: 2047; sequences stop there
    return c


def shard_files(folder):
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        if not (folder / "model.safetensors").is_file():
            raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json; download "
                                  "the *.safetensors files too (.bin/.pt checkpoints are not supported)")
        return [folder / "model.safetensors"]
    try:
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{index} has no valid weight_map ({e!r}); re-download it") from None
    bad = [n for n in names if not isinstance(n, str) or not re.fullmatch(r"[\w.-]+\.safetensors", n)]
    if bad:                                                   # a plain file name: nothing outside the folder
        raise CheckpointError(f"{index} lists {bad[:2]}, not file names in the folder; re-download it")
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise CheckpointError(f"{folder}: shard(s) {missing} listed in {index.name} are missing; re-run the "
                              "download to fetch them")
    return [folder / n for n in names]


# ----------------------------------------------------------------------------------------------------------
# loading

def load_phi3(path, device="cpu", dtype=torch.float32):
    """(GPT in eval mode with the checkpoint's weights, the folder it came from)."""
    from safetensors import SafetensorError, safe_open
    folder = find_checkpoint(path)
    config = read_config(folder / "config.json")
    with torch.device("meta"):
        model = GPT(config)
    expected, sd = {k: v.shape for k, v in model.state_dict().items()}, {}
    for file in shard_files(folder):
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for key in f.keys():
                    if key.endswith("rotary_emb.inv_freq"):
                        continue                              # some exports save these; we recompute them
                    t = f.get_slice(key)
                    if key not in expected or tuple(t.get_shape()) != tuple(expected[key]):
                        want = tuple(expected[key]) if key in expected else "no such weight"
                        raise CheckpointError(f"{file}: {key} has shape {tuple(t.get_shape())}, config.json "
                                              f"implies {want}; config.json and weights disagree")
                    if t.get_dtype() not in ("F16", "BF16", "F32", "F64"):
                        raise CheckpointError(f"{file}: {key} is stored as {t.get_dtype()}, not floating "
                                              "point; this is not a Phi-3 checkpoint we can train on")
                    x = f.get_tensor(key).to(device=device, dtype=dtype)
                    if not (torch.isfinite(x.amax()) and torch.isfinite(x.amin())):   # no mask of x's size
                        raise CheckpointError(f"{file}: {key} holds NaN or inf values; re-download the file")
                    sd[key] = x
        except SafetensorError as e:
            raise CheckpointError(f"{file} is truncated or corrupt ({e}); download it again") from None
        except torch.OutOfMemoryError:
            raise CheckpointError(f"out of memory loading {file.name} onto {device}: use a device with more "
                                  "memory or --dtype bfloat16") from None
    missing = sorted(set(expected) - set(sd))
    if missing:
        raise CheckpointError(f"{folder}: {len(missing)} weights missing, e.g. {missing[:3]}; the download "
                              "is incomplete or this is not a Phi-3 model")
    model.load_state_dict(sd, strict=True, assign=True)
    model.init_rope(device)
    return model.eval(), folder


# ----------------------------------------------------------------------------------------------------------
# LoRA adapters in PEFT's format: adapter_model.safetensors with keys
# base_model.model.<module>.lora_{A,B}.weight, and adapter_config.json

def save_adapter(model, name, folder, base_model=""):
    from safetensors.torch import save_file
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = {f"base_model.model.{n}.lora_{ab}.weight": getattr(m, f"lora_{ab}")[name].detach().cpu().contiguous()
          for n, m in model.named_modules() if hasattr(m, "lora_A") for ab in "AB"}
    save_file(sd, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    r, alpha = model.adapters[name]
    config = dict(peft_type="LORA", task_type="CAUSAL_LM", r=r, lora_alpha=alpha, lora_dropout=0.0,
                  bias="none", target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
                  use_rslora=False, use_dora=False, base_model_name_or_path=base_model, fan_in_fan_out=False,
                  inference_mode=True)
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))


def load_adapter(model, name, folder):
    """A PEFT LoRA folder (ours, or peft's save_pretrained) -> a new adapter `name`. Layers the file does not
    cover keep B = 0 (no change). Checks every file, shape and value before the adapter is added."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    folder = Path(folder)
    try:
        cfg = json.loads((folder / "adapter_config.json").read_text())
        sd = load_file(str(folder / "adapter_model.safetensors"))
    except (OSError, ValueError, SafetensorError) as e:
        raise CheckpointError(f"adapter {folder} is missing or unreadable ({type(e).__name__}: {e}); it "
                              "needs adapter_config.json and adapter_model.safetensors") from None
    cfg = cfg if isinstance(cfg, dict) else {}              # a JSON list or number: refused just below
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    plain = cfg.get("peft_type") == "LORA" and not (cfg.get("use_dora") or cfg.get("use_rslora")) and \
        cfg.get("bias", "none") == "none" and isinstance(r, int) and isinstance(alpha, (int, float))
    if r is None or not plain:
        raise CheckpointError(f"{folder}: only plain LoRA adapters (integer r, no DoRA/rsLoRA/bias) are "
                              "supported")
    modules = {n: m for n, m in model.named_modules() if hasattr(m, "lora_A")}
    values = {}
    for key, t in sd.items():
        m = re.fullmatch(r"base_model\.model\.(.+)\.lora_([AB])(?:\.default)?\.weight", key)
        if m is None or m.group(1) not in modules:
            raise CheckpointError(f"{folder}: {key} is not a LoRA weight of this model (another base?)")
        layer = modules[m.group(1)]
        shape = (r, layer.in_features) if m.group(2) == "A" else (layer.out_features, r)
        bad = f"shape {tuple(t.shape)}, the model's is {shape}" if tuple(t.shape) != shape else \
            "" if t.is_floating_point() and torch.isfinite(t).all() else "non-finite or non-float values"
        if bad:
            raise CheckpointError(f"{folder}: {key} has {bad}; the adapter is damaged or for another base")
        values[m.group(1), m.group(2)] = t
    if {p for p, _ in values} != {p for p, ab in values if ab == "A"} or not values:
        raise CheckpointError(f"{folder}: every layer needs lora_A and lora_B; the adapter is incomplete")
    model.add_adapter(name, r, alpha)
    with torch.no_grad():
        for (path, ab), t in values.items():
            getattr(modules[path], f"lora_{ab}")[name].copy_(t)
