"""
The reference side of bench.py: one training step of HF TRL's NashMDTrainer, timed.

What is measured
----------------
Seconds per optimizer step of `trl.experimental.nash_md.NashMDTrainer` (trl 1.13.0, the last
release that has it; 1.14.0 removed it) on CPU, on a tiny *random* Phi-3 (transformers
`Phi3ForCausalLM`) so that no weights are downloaded. One step is everything TRL does between
`on_step_begin` and `on_step_end`:

  1. tokenize the prompts (TRL prepends BOS),
  2. sample y  ~ π_θ with `model.generate` (KV cache off: TRL's default
     `gradient_checkpointing=True` sets `use_cache=False` in its generation config),
  3. sample y' ~ the per-token geometric mixture log_softmax(β·ref_logits + (1-β)·policy_logits),
     β = mixture_coef, with TRL's `GeometricMixtureWrapper`. The wrapper always forces
     `use_cache=False`, so every new token re-runs BOTH models on the whole prefix and computes
     full-vocabulary logits at every position: O(T²) per sequence,
  4. score y and y' with a reward model (a `Phi3ForSequenceClassification`, num_labels=1);
     P(y ≻ y') = sigmoid(r(y) - r(y')) (Bradley-Terry; TRL has no pairwise judge any more),
  5. log-probs of y under the policy (with grad) and under the reference (no grad),
  6. loss = beta·Σ_n sg(logp_n - logref_n)·logp_n - (P - 1/2)·Σ_n logp_n, backward (with gradient
     checkpointing), AdamW step on all policy parameters (full fine-tuning).

TRL builds its own reference: `create_reference_model(model)` deep-copies the policy (a second full
copy of the weights) unless a PEFT config is given. We let it do that (what users get).

Exactly `new_tokens` new tokens per completion: `generation_kwargs={"min_new_tokens": new_tokens}`
masks EOS until then, and pad = EOS, so neither sampler can stop early and no sampled token is
mistaken for padding by TRL's `get_reward`. This is checked on every step (`notes` says so).

Why TRL defaults: with `gradient_checkpointing=False` TRL 1.13.0 turns the KV cache on, but
`GeometricMixtureWrapper` hands ONE cache object to both the policy and the reference, so its
mixture samples are wrong (PEERS.md). The fair comparison is against what users get, which is the
default (checkpointing on, no cache). `gradient_checkpointing` is a parameter for those who want to
see the other number; `notes` warns when it is off.

Usage (needs the separate bench venv; trl is imported only inside the function):
    python3 -m venv .venv-bench && .venv-bench/bin/pip install -r requirements-bench.txt
    .venv-bench/bin/python bench_trl.py --new_tokens 32 [--json out.json]  # last line: the JSON
    from bench_trl import trl_nash_md_step; trl_nash_md_step(new_tokens=128)
    -> {"seconds_per_step": ..., "tokens_per_s": ..., "generation_seconds_per_step": ...,
        "notes": ...}
tokens_per_s = batch · new_tokens / seconds_per_step: trained response tokens per second (the
mixture's tokens are sampled too but not trained on). Timings on a shared 2-core machine are noisy:
compare medians, same machine, same run.
"""

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

PHI3_TOKENIZER_JSON = (Path(__file__).resolve().parent / ".." / "shared" / "assets"
                       / "phi3-tokenizer" / "tokenizer.json")
_WORDS = ("the cat sat on a mat and the dog ran to see what was there in his red house by an old "
          "tree while she sang songs about sun rain and wind").split()

# -------------------------------------------------------------------------------------------------
# tokenizer and prompts
# (offline: the real Phi-3 tokenizer.json when present, else a word-level one built in code)


def make_tokenizer(tokenizer_json=PHI3_TOKENIZER_JSON):
    """A PreTrainedTokenizerFast with bos/eos/pad set; pad = eos so that forced-length samples
    never contain pad."""
    from transformers import PreTrainedTokenizerFast

    if tokenizer_json is not None and Path(tokenizer_json).is_file():
        tok = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_json), bos_token="<s>",
                                      eos_token="<|endoftext|>", unk_token="<unk>",
                                      pad_token="<|endoftext|>")
        return tok, "phi3 tokenizer.json"
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["<unk>", "<s>", "</s>"]
    vocab = {w: i for i, w in enumerate(specials + sorted(set(_WORDS)))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>", pad_token="</s>")
    return tok, "code-built word-level tokenizer"


def make_prompts(tok, n, prompt_len, seed):
    """n plain-text prompts that each tokenize to exactly prompt_len ids once TRL has prepended BOS
    (no padding)."""
    import random

    rng = random.Random(seed)
    target = prompt_len - 1
    count = lambda words: len(tok(" ".join(words), add_special_tokens=False)["input_ids"])
    prompts = []
    for _ in range(n):
        words = []
        while count(words) < target:
            words.append(rng.choice(_WORDS))
        # the last word was several pieces: drop it, fill with one-piece words
        if count(words) > target:
            words.pop()
            while count(words) < target:
                words.append("a")
        if count(words) != target:
            raise ValueError(f"could not build a {prompt_len}-token prompt "
                             f"(got {count(words) + 1}); try another seed")
        prompts.append(" ".join(words))
    return prompts


# -------------------------------------------------------------------------------------------------
# models


def phi3_config(hidden, layers, heads, vocab, intermediate=None):
    """Phi-3 shape scaled down; intermediate defaults to Phi-3-mini's ratio 8192/3072 (683 at
    hidden 256)."""
    from transformers import Phi3Config

    return Phi3Config(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads,
                      intermediate_size=intermediate or round(hidden * 8 / 3),
                      max_position_embeddings=4096, pad_token_id=None, bos_token_id=None,
                      eos_token_id=None)


# -------------------------------------------------------------------------------------------------
# the benchmark


def trl_nash_md_step(hidden=256, layers=4, heads=4, vocab=32064, batch=4, prompt_len=14,
                     new_tokens=32, mixture_coef=0.5, steps=3, warmup=1, seed=0, threads=2,
                     gradient_checkpointing=True, tokenizer_json=PHI3_TOKENIZER_JSON):
    """Median seconds per NashMDTrainer optimizer step over `steps` steps after `warmup` untimed
    ones."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import Phi3ForCausalLM, Phi3ForSequenceClassification, TrainerCallback
    from trl.experimental.nash_md import NashMDConfig, NashMDTrainer

    torch.set_num_threads(threads)
    tok, tok_name = make_tokenizer(tokenizer_json)
    if len(tok) > vocab:
        raise ValueError(f"tokenizer has {len(tok)} ids but vocab={vocab}; raise vocab "
                         "(Phi-3: 32064)")
    cfg = phi3_config(hidden, layers, heads, vocab)
    torch.manual_seed(seed)
    policy = Phi3ForCausalLM(cfg)
    reward_cfg = phi3_config(hidden, layers, heads, vocab)
    reward_cfg.num_labels = 1
    reward = Phi3ForSequenceClassification(reward_cfg)
    n_params = sum(p.numel() for p in policy.parameters())

    # per-step timings; generation is timed by wrapping the trainer's own method
    # (same call, no behaviour change)
    class StepTimer(TrainerCallback):
        def __init__(self):
            self.t0, self.step_s, self.gen_s, self.resp_lens = None, [], [], []

        def on_step_begin(self, args, state, control, **kw):
            self.gen_s.append(0.0)
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.step_s.append(time.perf_counter() - self.t0)

    timer = StepTimer()
    n_steps = warmup + steps
    with tempfile.TemporaryDirectory() as out:
        args = NashMDConfig(output_dir=out, bf16=False, use_cpu=True,
                            per_device_train_batch_size=batch, max_new_tokens=new_tokens,
                            mixture_coef=mixture_coef, max_steps=n_steps,
                            generation_kwargs={"min_new_tokens": new_tokens}, report_to=[],
                            logging_steps=10**6, save_strategy="no", disable_tqdm=True, seed=seed,
                            dataloader_num_workers=0,
                            gradient_checkpointing=gradient_checkpointing)
        data = Dataset.from_dict({"prompt": make_prompts(tok, batch * n_steps, prompt_len, seed)})
        trainer = NashMDTrainer(model=policy, reward_funcs=reward, args=args, train_dataset=data,
                                processing_class=tok, callbacks=[timer])

        generate, process = trainer._generate_completions, trainer._process_completions

        def timed_generate(*a, **kw):
            t = time.perf_counter()
            result = generate(*a, **kw)
            timer.gen_s[-1] += time.perf_counter() - t
            return result

        def checked_process(model_output, mixture_output, prompts):
            model_data, mixture_data = process(model_output, mixture_output, prompts)
            ctx = prompts["input_ids"].shape[1]
            for d in (model_data, mixture_data):
                timer.resp_lens += d["attention_mask"][:, ctx:].sum(1).tolist()
            return model_data, mixture_data

        trainer._generate_completions = timed_generate
        trainer._process_completions = checked_process
        trainer.train()
        separate_ref = trainer.ref_model is not None and trainer.ref_model is not policy

    if len(timer.step_s) != n_steps:
        raise RuntimeError(f"expected {n_steps} timed steps, got {len(timer.step_s)}")
    step_s = statistics.median(timer.step_s[warmup:])
    gen_s = statistics.median(timer.gen_s[warmup:])
    exact = all(n == new_tokens for n in timer.resp_lens)
    lengths = "exactly, every sample" if exact else f"NOT always: {sorted(set(timer.resp_lens))}"
    all_steps = ", ".join(f"{s:.2f}" for s in timer.step_s)
    notes = (f"trl {trl.__version__}, transformers {transformers.__version__}, "
             f"torch {torch.__version__}, "
             f"{threads} threads, fp32 CPU; random Phi3ForCausalLM {n_params / 1e6:.1f}M params "
             f"(hidden {hidden}, {layers} layers, {heads} heads, vocab {vocab}) "
             f"+ same-shape reward model; "
             f"{tok_name}; batch {batch}, prompt {prompt_len} tokens, {new_tokens} new tokens "
             f"({lengths}), "
             f"mixture_coef {mixture_coef}; median of {steps} steps after {warmup} warm-up "
             f"(all: {all_steps} s); generation (policy + mixture) "
             f"{100 * gen_s / step_s:.0f}% of the step; reference = TRL's own "
             f"{'deep copy' if separate_ref else 'adapter-off base'}; "
             f"gradient_checkpointing={gradient_checkpointing}"
             + ("" if gradient_checkpointing else
                " (NOT TRL's default: KV cache on, and the mixture shares one cache between policy"
                " and reference, so its samples are wrong)"))
    return {"seconds_per_step": step_s, "tokens_per_s": batch * new_tokens / step_s,
            "generation_seconds_per_step": gen_s, "exact_new_tokens": exact, "notes": notes}


def main():
    p = argparse.ArgumentParser(
        description="Time one TRL NashMDTrainer step (reference for bench.py).")
    for name, default in (("hidden", 256), ("layers", 4), ("heads", 4), ("vocab", 32064),
                          ("batch", 4), ("prompt_len", 14), ("new_tokens", 32), ("steps", 3),
                          ("warmup", 1), ("seed", 0), ("threads", 2)):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--mixture_coef", type=float, default=0.5)
    p.add_argument("--no_gradient_checkpointing", action="store_true",
                   help="not TRL's default; see module docstring")
    p.add_argument("--json", help="also write the result to this file")
    a = vars(p.parse_args())
    a["gradient_checkpointing"] = not a.pop("no_gradient_checkpointing")
    out = a.pop("json")
    result = trl_nash_md_step(**a)
    if out:
        Path(out).write_text(json.dumps(result, indent=1))
    # the LAST stdout line (Trainer prints its own summary dict before it)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
