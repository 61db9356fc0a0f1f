"""
memory.py: `python train_lm.py --model phi3 --dry_run` (or smollm2): the memory of one training
step, from the config alone: the config.json of the weights train_lm.py would load, or where
there are none, Phi-3-mini's preset (model.PRESETS; SmolLM2 has none: its config.json is needed).
No weights are read.

memory() is the model of a step's bytes; bench_scale.py measures real steps against it (the CPU's
peak RSS within ±15%, CUDA's max_memory_allocated). dry_run() prints it as set, with
--grad_checkpoint, and with one slot per micro-batch.
"""
from dataclasses import replace

from model import GPTConfig
from cli import UserError
from tasks import find_weights
from train_lm import ALGOS
from weights import read_config


def memory(c, cfg, dtype_bytes=2):
    """Bytes of one step (GB = 1e9). S = batch·samples slots, T = prompt + new tokens, N = new
    tokens, R = the rank of all of the algorithm's adapters together (they run in one LoRA matmul),
    M = micro_batches; r, g, n: the rows per slot sampled, scored with a graph and without one
    (ALGOS[algo].rows).
      base          every weight once, in the compute dtype (the reference, the judge and every
                    player share it)
      adapters      float32 A, B of each adapter; its gradient (4 bytes) and AdamW's m, v (8) if
                    trained
      kv_cache      one generate call: rows · T · n_layer · 2 (k, v) · n_kv_head · head_dim,
                    rows = S·r/M
      scoring       the log-probs taken without a graph (π_t, μ, an opponent), before the graph is
                    built: float32 logits at the response positions and cross_entropy's
                    log-softmax, S·n/M rows
      activations   what autograd keeps per token and layer (q, k, v, attention out, gate_up, silu,
                    and the float32 LoRA inputs and bottlenecks) and cross_entropy's log-softmax,
                    then in backward two more logits-sized buffers (its gradient and the logits'),
                    for S·g/M rows. With --grad_checkpoint: each block's input, plus one block's
                    activations while it is recomputed. The CPU and CUDA attention kernels both keep
                    only the output and its logsumexp (no T x T matrix): the same estimate on both.
                    The words game runs each distinct prompt once: then a row keeps its N + 1
                    tokens and its copy of the prompt's keys and values, and each prompt its own
                    activations (an upper bound: the prompts are counted at max_prompt_tokens).
                    With --grad_checkpoint every row runs whole (model.sequence_logprobs).
    The phases follow each other: total = base + adapters + max(kv_cache, scoring, activations)."""
    C, I, L, V = c.n_embd, c.intermediate_size, c.n_layer, c.vocab_size
    kv = c.n_kv_head * (C // c.n_head)
    algo = ALGOS[cfg.algo]
    sampled, graph, free = algo.rows
    S = cfg.batch_size * cfg.samples / cfg.micro_batches
    N = cfg.max_new_tokens
    T = cfg.max_prompt_tokens + N
    R = cfg.lora_rank * len(algo.adapters)
    lora = L * cfg.lora_rank * (6 * C + 2 * kv + 3 * I)                # A, B of the 4 linear layers
    per_tok = (3 * C + 3 * kv + 3 * I) * dtype_bytes + (5 * C + I + 4 * R) * 4
    kept = T * (L * C * dtype_bytes + per_tok) if cfg.grad_checkpoint else T * L * per_tok
    prompts = 0
    if cfg.task == "words" and not cfg.grad_checkpoint:   # shared prompts (not when checkpointed)
        P = cfg.max_prompt_tokens
        kept = (N + 1) * L * per_tok + P * L * 2 * kv * dtype_bytes
        prompts = graph * cfg.batch_size * P * L * per_tok
    embeddings = (1 if c.tie_embeddings else 2) * V * C       # tied: lm_head is embed_tokens
    weights = embeddings + C + L * (C * (2 * C + 2 * kv) + 3 * C * I + 2 * C)
    d = dict(
        base=dtype_bytes * weights,
        adapters=4 * lora * len(algo.adapters) + 12 * lora * len(algo.judges),
        kv_cache=int(sampled * S * T * L * 2 * kv * dtype_bytes),
        scoring=int(free * S * 2 * N * V * 4),
        activations=int(graph * S * (kept + 3 * N * V * 4) + prompts),
    )
    d["total"] = d["base"] + d["adapters"] + max(d["kv_cache"], d["scoring"], d["activations"])
    return d


def dry_run(cfg):
    """The memory of a step as set, with --grad_checkpoint, and with it and one slot per
    micro-batch."""
    if cfg.model == "tiny":
        c = GPTConfig.from_name("tiny")
    else:
        try:
            c = read_config(find_weights(cfg) / "config.json")
        except UserError:                   # none found: the error says how to get them
            if cfg.model != "phi3":
                raise
            c = GPTConfig.from_name("phi3-mini")
    dtype_bytes = 4 if cfg.dtype == "float32" else 2
    M = cfg.batch_size * cfg.samples
    cols = {
        "as set": cfg,
        "--grad_checkpoint": replace(cfg, grad_checkpoint=True),
        f"+ --micro_batches {M}": replace(cfg, grad_checkpoint=True, micro_batches=M),
    }
    d = {name: memory(c, sub, dtype_bytes) for name, sub in cols.items()}
    print(f"{cfg.algo} on {cfg.model}: batch {cfg.batch_size} x {cfg.samples} samples, "
          f"{cfg.max_prompt_tokens} + {cfg.max_new_tokens} tokens, LoRA r = {cfg.lora_rank}, "
          f"{8 * dtype_bytes}-bit weights (GB = 1e9)")
    print(f"  {'':<12}" + "".join(f"{name:>20}" for name in cols))
    for key in d["as set"]:
        print(f"  {key:<12}" + "".join(f"{d[name][key] / 1e9:17.3f} GB" for name in cols))
    return d["as set"]
