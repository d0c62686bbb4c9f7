"""Train the shipped reference pair: a Mamba and a GPT-2 Transformer on the same text, with the same
byte-level BPE tokenizer, at about the same parameter count.

    python train_reference_models.py                       # defaults: what reference_models/ holds
    python train_reference_models.py --steps 50 --out /tmp/ref   # a quick try

Data: the given text files (default ../shared/data/wikitext-2/*.txt when present, else the WikiText-2 train
split through `datasets`). The last --eval_fraction of the lines is held out for evaluation. Writes
OUT/mamba/ and OUT/transformer/ (config, safetensors, tokenizer, training_info.json) and OUT/MODEL_CARD.md.
Deterministic for a given --seed and --threads. Mamba trains with ssm.fast_scan_training; the saved
weights are plain MambaForCausalLM weights.
"""
from __future__ import annotations

import argparse
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent
SHARED_DATA = REPO.parent / "shared" / "data" / "wikitext-2"
SPECIAL = "<|endoftext|>"
# Prompts written for the model card (the training text itself is not committed to the repo).
CARD_PROMPTS = ["The history of the city begins in the", "In the second season , the team",
                "The species is found in"]


@dataclass
class ModelSpec:
    """Sizes of the pair; chosen for about the same parameter count (see MODEL_CARD.md)."""

    d_model: int = 192
    mamba_layers: int = 7
    mamba_state: int = 16
    gpt2_layers: int = 4
    gpt2_heads: int = 4
    n_positions: int = 256


@dataclass
class TrainResult:
    name: str
    n_params: int
    n_params_non_embedding: int
    steps: int
    tokens_seen: int
    train_seconds: float
    losses: list = field(default_factory=list)  # training loss at every step
    heldout_loss: float = float("nan")
    heldout_ppl: float = float("nan")


# --------------------------------------------------------------------------------------------------
# Data and tokenizer
# --------------------------------------------------------------------------------------------------
def load_corpus(files: list[str] | None, eval_fraction: float) -> tuple[str, str, str]:
    """(train_text, heldout_text, description). Lines of the files in the given order; the last
    `eval_fraction` of the lines is held out."""
    if files:
        paths = [Path(f) for f in files]
        lines = [line for p in paths for line in p.read_text(encoding="utf-8").splitlines()]
        desc = ", ".join(p.name for p in paths)
    elif SHARED_DATA.is_dir():
        paths = sorted(SHARED_DATA.glob("*.txt"))
        lines = [line for p in paths for line in p.read_text(encoding="utf-8").splitlines()]
        desc = f"WikiText-2 (v1) {', '.join(p.name for p in paths)} from ../shared/data"
    else:
        import datasets

        lines = [t.rstrip("\n") for t in datasets.load_dataset("Salesforce/wikitext", "wikitext-2-v1",
                                                                split="train")["text"]]
        desc = "WikiText-2 (v1) train split through datasets"
    cut = int(len(lines) * (1 - eval_fraction))
    return "\n".join(lines[:cut]) + "\n", "\n".join(lines[cut:]) + "\n", desc


def train_tokenizer(text: str, vocab_size: int):
    """Byte-level BPE (GPT-2 style pre-tokenisation) trained on `text`, as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[SPECIAL], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    chunks = [text[i:i + 100_000] for i in range(0, len(text), 100_000)]
    tok.train_from_iterator(chunks, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIAL, eos_token=SPECIAL,
                                   unk_token=SPECIAL, pad_token=SPECIAL, model_max_length=1 << 30)


def encode(tokenizer, text: str):
    import torch

    lines = text.splitlines(keepends=True)
    ids = [i for enc in tokenizer.backend_tokenizer.encode_batch(lines) for i in enc.ids]
    return torch.tensor(ids, dtype=torch.long)  # (N,)


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------
def build_model(kind: str, vocab_size: int, spec: ModelSpec, seed: int):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, MambaConfig, MambaForCausalLM

    torch.manual_seed(seed)
    ids = dict(vocab_size=vocab_size, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if kind == "mamba":
        cfg = MambaConfig(**ids, hidden_size=spec.d_model, num_hidden_layers=spec.mamba_layers,
                          state_size=spec.mamba_state, expand=2, tie_word_embeddings=True)
        return MambaForCausalLM(cfg)
    if kind == "transformer":
        cfg = GPT2Config(**ids, n_embd=spec.d_model, n_layer=spec.gpt2_layers, n_head=spec.gpt2_heads,
                         n_positions=spec.n_positions, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                         tie_word_embeddings=True)
        return GPT2LMHeadModel(cfg)
    raise ValueError(f"unknown model kind {kind!r}: mamba or transformer")


def count_params(model) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())  # tied weights counted once
    emb = model.get_input_embeddings().weight.numel()
    pos = getattr(getattr(model, "transformer", None), "wpe", None)
    return total, total - emb - (pos.weight.numel() if pos is not None else 0)


def train_model(model, train_ids, steps: int, batch_size: int, seq_len: int, lr: float, seed: int,
                progress: bool = True, name: str = "") -> TrainResult:
    """AdamW with linear warm-up and cosine decay on random windows of `train_ids` (N,). Deterministic
    for a given seed: the windows come from a seeded generator and the models have no dropout."""
    import torch
    from tqdm.auto import tqdm

    from ssm import fast_scan_training

    gen = torch.Generator().manual_seed(seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))
    warmup = max(1, min(100, steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup))))
    is_mamba = hasattr(model, "backbone")
    model.train()
    losses = []
    t0 = time.perf_counter()
    bar = tqdm(range(steps), desc=f"train {name}", disable=not progress)
    for _ in bar:
        starts = torch.randint(0, len(train_ids) - seq_len, (batch_size,), generator=gen)
        batch = torch.stack([train_ids[s:s + seq_len] for s in starts.tolist()])  # (b, L)
        with (fast_scan_training(model) if is_mamba else torch.enable_grad()):
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    total, non_emb = count_params(model)
    return TrainResult(name, total, non_emb, steps, steps * batch_size * seq_len, time.perf_counter() - t0, losses)


def heldout_nll(model, ids, seq_len: int, batch_size: int = 8) -> tuple[float, int]:
    """Mean next-token negative log-likelihood (nats) over non-overlapping windows of `ids` (N,);
    every token but the first of each window is predicted. Returns (nll, number of predicted tokens)."""
    import torch
    import torch.nn.functional as F

    n_win = len(ids) // seq_len
    windows = ids[: n_win * seq_len].view(n_win, seq_len)  # (w, L)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, n_win, batch_size):
            w = windows[i:i + batch_size]
            logits = model(input_ids=w, use_cache=False).logits[:, :-1].float()  # (b, L-1, V)
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1),
                                     reduction="sum").item()
            count += w[:, 1:].numel()
    return total / count, count


def unigram_nll(train_ids, eval_ids, vocab_size: int, seq_len: int) -> float:
    """Add-one-smoothed unigram model from the training tokens, scored on the same predicted tokens as
    `heldout_nll` (every token but the first of each window)."""
    import torch

    counts = torch.bincount(train_ids, minlength=vocab_size).double() + 1.0
    logp = counts.log() - counts.sum().log()  # (V,)
    n_win = len(eval_ids) // seq_len
    targets = eval_ids[: n_win * seq_len].view(n_win, seq_len)[:, 1:]
    return float(-logp[targets].mean())


def greedy(model, tokenizer, prompt: str, n_tokens: int = 20) -> str:
    import torch

    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        for _ in range(n_tokens):
            nxt = model(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)  # (1, 1)
            ids = torch.cat([ids, nxt], dim=1)
    return tokenizer.decode(ids[0, -n_tokens:])


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------
def save_model(model, tokenizer, folder: Path, info: dict) -> None:
    """Write to a temporary sibling folder, then swap it in (a failed run leaves the old folder intact)."""
    from utils import write_json

    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    write_json(tmp / "training_info.json", info)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def model_card(info: dict) -> str:
    m, t, u = info["results"]["mamba"], info["results"]["transformer"], info["unigram"]
    a = info["args"]
    s = info["spec"]

    def row(name, r, arch):
        return (f"| {name} | {arch} | {r['n_params'] / 1e6:.2f} M ({r['n_params_non_embedding'] / 1e6:.2f} M "
                f"non-embedding) | {r['steps']} | {r['tokens_seen'] / 1e6:.2f} M | {r['train_seconds'] / 60:.1f} min "
                f"| {r['losses'][-1]:.3f} | {r['heldout_loss']:.3f} | {r['heldout_ppl']:.1f} |")

    lines = [
        "# Reference models: a matched Mamba / Transformer pair",
        "",
        "Generated by `train_reference_models.py`; every number below is read from that run's "
        "`training_info.json`.",
        "",
        f"- Data: {info['data']}; the last {a['eval_fraction']:.0%} of the lines held out for evaluation "
        f"({info['n_train_tokens']:,} training tokens, {info['n_heldout_tokens']:,} held-out tokens).",
        f"- Tokenizer: byte-level BPE, vocabulary {info['vocab_size']}, trained on the training lines only; "
        "shared by both models.",
        f"- Training: {a['steps']} steps of {a['batch_size']} x {a['seq_len']}-token windows, AdamW (lr {a['lr']}, "
        f"betas 0.9/0.95, weight decay 0.1 on matrices), warm-up then cosine decay, gradient clipping 1.0, no "
        f"dropout, seed {a['seed']}, {a['threads']} CPU threads ({info['machine']}).",
        f"- Mamba: Mamba-1, d_model {s['d_model']}, {s['mamba_layers']} layers, d_inner {2 * s['d_model']}, "
        f"state size {s['mamba_state']}; trained with the fast scan (`ssm.fast_scan_training`).",
        f"- Transformer: GPT-2, d_model {s['d_model']}, {s['gpt2_layers']} layers, {s['gpt2_heads']} heads, "
        f"context {s['n_positions']}.",
        "",
        "| model | architecture | parameters | steps | tokens seen | time | final train loss | "
        "held-out loss (nats/token) | held-out perplexity |",
        "|---|---|---|---|---|---|---|---|---|",
        row("mamba", m, "MambaForCausalLM"),
        row("transformer", t, "GPT2LMHeadModel"),
        f"| unigram baseline | add-one-smoothed token frequencies | – | – | – | – | – | {u['loss']:.3f} | "
        f"{u['ppl']:.1f} |",
        "",
        f"Held-out perplexity relative to the unigram baseline: Mamba {m['heldout_ppl'] / u['ppl']:.3f}x "
        f"({u['ppl'] / m['heldout_ppl']:.1f} times lower), Transformer {t['heldout_ppl'] / u['ppl']:.3f}x "
        f"({u['ppl'] / t['heldout_ppl']:.1f} times lower). Held-out loss is the mean next-token cross-entropy "
        f"over non-overlapping {a['seq_len']}-token windows (the first token of each window is not scored); "
        "the unigram baseline is scored on exactly the same tokens.",
        "",
        "## Greedy continuations",
        "",
        "Prompts written for this card (the training text itself is not part of the repository); "
        "20 greedy tokens each.",
        "",
    ]
    for p, cm, ct in zip(CARD_PROMPTS, info["continuations"]["mamba"], info["continuations"]["transformer"]):
        lines += [f"- **{p}**", f"  - mamba: `{cm!r}`", f"  - transformer: `{ct!r}`"]
    lines += ["", "## Retrain", "", "```bash", info["command"], "```", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", nargs="+", default=None, help="text files (default: ../shared/data/wikitext-2/*.txt)")
    ap.add_argument("--out", default=str(REPO / "reference_models"))
    ap.add_argument("--models", nargs="+", default=["mamba", "transformer"], help="mamba, transformer")
    ap.add_argument("--vocab_size", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--seq_len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--eval_fraction", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no_progress", action="store_true")
    args = ap.parse_args(argv)

    import platform

    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    spec = ModelSpec()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_text, heldout_text, desc = load_corpus(args.data, args.eval_fraction)
    tokenizer = train_tokenizer(train_text, args.vocab_size)
    train_ids, heldout_ids = encode(tokenizer, train_text), encode(tokenizer, heldout_text)
    print(f"data: {desc}; {len(train_ids):,} training tokens, {len(heldout_ids):,} held-out tokens")
    u_loss = unigram_nll(train_ids, heldout_ids, len(tokenizer), args.seq_len)
    info = {"data": desc, "vocab_size": len(tokenizer), "n_train_tokens": len(train_ids),
            "n_heldout_tokens": len(heldout_ids), "args": vars(args), "spec": asdict(spec),
            "unigram": {"loss": u_loss, "ppl": math.exp(u_loss)},
            "machine": f"{platform.machine()}, torch {torch.__version__}",
            "command": " ".join(["python train_reference_models.py", *(argv if argv is not None else sys.argv[1:])]),
            "results": {}, "continuations": {}}
    for kind in args.models:
        model = build_model(kind, len(tokenizer), spec, args.seed)
        res = train_model(model, train_ids, args.steps, args.batch_size, args.seq_len, args.lr, args.seed,
                          not args.no_progress, kind)
        res.heldout_loss, _ = heldout_nll(model, heldout_ids, args.seq_len)
        res.heldout_ppl = math.exp(res.heldout_loss)
        info["results"][kind] = asdict(res)
        info["continuations"][kind] = [greedy(model, tokenizer, p) for p in CARD_PROMPTS]
        save_model(model, tokenizer, out / kind, {**info, "model": kind, "results": {kind: asdict(res)}})
        print(f"{kind}: {res.n_params / 1e6:.2f} M params, {res.train_seconds / 60:.1f} min, held-out loss "
              f"{res.heldout_loss:.3f} (ppl {res.heldout_ppl:.1f}); unigram ppl {math.exp(u_loss):.1f}")
    if {"mamba", "transformer"} <= set(info["results"]):
        (out / "MODEL_CARD.md").write_text(model_card(info), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
