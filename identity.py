"""
identity.py: what a run trained on. run.json records a fingerprint of the base's weights and of
its tokenizer; --resume and --eval refuse any other base with one line that says which differs
(a folder's name proves nothing: another model of the same shape, a new revision in the Hugging
Face cache, a tokenizer.json with its merges cut).
"""
import hashlib
import json
import os

from cli import UserError

IDENTITY = {"weights_sha": "weights", "tokenizer_sha": "tokenizer"}   # what a run trained on


def check(saved, now, what):
    """Refuse a base other than the run's: saved, now {IDENTITY key: fingerprint}."""
    wrong = [f"{name} {str(saved[k])[:8]} -> {str(now.get(k))[:8]}"
             for k, name in IDENTITY.items()
             if k in saved and saved[k] != now.get(k)]
    if wrong:
        raise UserError(f"{what}: not the base this run trained on ({'; '.join(wrong)}); pass "
                        "the run's --weights (the same files and revision)")


# what a run records of its tokenizer: the ids this encodes to in the chat format (words, digits,
# spaces, punctuation, characters outside ASCII: a file with other merges or pieces differs)
PROBE = ("Which response is better? Read the question and the two responses.\n\n 1 or 2: 3.14, "
         "x = [a_b] {ok}; naïve café, 中文, ✓ 🙂\tend")


def fingerprint(folder):
    """What a run records of its weights: a hash of each shard's first MiB (its header: every
    tensor's name, dtype, shape and place) and last MiB, and of the revision of a Hugging Face
    cache snapshot (its folder's name)."""
    h = hashlib.sha256(folder.name.encode() if folder.parent.name == "snapshots" else b"")
    for file in sorted(folder.glob("*.safetensors")):
        with open(file, "rb") as f:
            h.update(f.read(1 << 20))
            f.seek(max(f.tell(), os.fstat(f.fileno()).st_size - (1 << 20)))
            h.update(f.read())
    return h.hexdigest()


def of(model, tok):
    """identity.of(model, tok): the fingerprints of the base a run trains on, its weights' (set
    on the model by tasks.setup; None for the toy's, built from the seed) and its tokenizer's
    (the ids of PROBE, the control ids, and the file's pieces, merges and added tokens, however
    the file spells the merges)."""
    ids = [tok.chat(tok.encode(PROBE)), sorted(tok.special_ids), list(tok.stop_ids)]
    if hasattr(tok, "path"):            # its file's pieces, merges and added tokens, as data
        d = json.loads(tok.path.read_text(encoding="utf-8"))
        merges = [m if isinstance(m, str) else " ".join(m) for m in d["model"]["merges"]]
        ids += [d["model"]["vocab"], merges, d["added_tokens"]]
    return {
        "weights_sha": getattr(model, "fingerprint", None),
        "tokenizer_sha": hashlib.sha256(json.dumps(ids).encode()).hexdigest(),
    }
