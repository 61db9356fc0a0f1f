"""
evaluate.py: `python train_lm.py --model phi3 --eval`: the win rate of a trained policy against the
base model.

On the held-out prompts (every 10th; toy: the games), the trained policy's response and the base's
(drawn with the same uniforms) are judged by the base in both orders (toy: by P). Prints the win
rate with a 95% CI and writes AlpacaEval JSON ({instruction, output, generator}) to <run>/eval/.
"""
import json
import math

import torch

from runs import Run, UserError
from tasks import setup
from train_lm import ALGOS, sample
from weights import CheckpointError, load_adapter


@torch.no_grad()
def evaluate(cfg, path):
    """The win rate of the run in `path` (its first adapter) against the base: the results."""
    run = Run(path, {}, [], resume=True, writer=False)
    player = ALGOS[cfg.algo].adapters[0]
    if run.latest() is None:
        raise UserError(f"--eval: no checkpoint in {path}; train first with the same --out_dir "
                        "and --algo")
    model, task, _ = setup(cfg, held_out=True)
    try:
        load_adapter(model, player, run.latest() / player)
    except CheckpointError as e:
        raise UserError(f"--eval: {e}") from None
    device = model.lm_head.weight.device
    gen = torch.Generator(device).manual_seed(cfg.seed)
    ks = torch.arange(len(task.prompts), device=device)
    ks = ks.repeat_interleave(cfg.samples)
    prefs, rows = [], []
    for k in ks.split(cfg.batch_size * cfg.samples):
        u = torch.rand(len(k), 1, cfg.max_new_tokens, generator=gen, device=device)
        ours = sample(model, task, cfg, k, player, u)
        base = sample(model, task, cfg, k, None, u)
        pref, _ = task.judge(model, ours, base, None, True)
        prefs.append(pref.cpu())
        for b, i in enumerate(k.tolist()):
            ids = [r.tokens[b][r.resp[b].bool()] for r in (ours, base)]
            texts = [task.tok.decode(x.tolist(), skip_special=True) for x in ids]
            rows.append((task.texts[i], *(t.strip() for t in texts)))
    pref = torch.cat(prefs).double()
    n = len(pref)
    m = pref.mean().item()
    half = 1.96 * pref.std().item() / math.sqrt(n) if n > 1 else 0.0
    result = dict(
        checkpoint=str(run.latest()),
        win_rate=m,
        ci95=[m - half, m + half],
        n=n,
    )
    ours = [dict(instruction=x, output=a, generator=path.name) for x, a, _ in rows]
    base = [dict(instruction=x, output=b, generator="base") for x, _, b in rows]
    files = {
        "model_outputs.json": ours,
        "reference_outputs.json": base,
        "results.json": result,
    }
    out = path / "eval"
    try:
        out.mkdir(exist_ok=True)
        for name, obj in files.items():
            (out / name).write_text(json.dumps(obj, indent=1, ensure_ascii=False))
    except OSError as e:
        raise UserError(f"cannot write {out} ({e.strerror or e}); free space or fix permissions, "
                        "then run --eval again") from None
    print(f"{path.name}: win rate vs the base {m:.3f} (95% CI {m - half:.3f}..{m + half:.3f}, "
          f"n = {n}); AlpacaEval JSON in {out}")
    return result
