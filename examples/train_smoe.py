"""Train a small Mixtral-architecture SMoE from scratch on ../shared/data: a fair test bed for uncurl.

    .venv/bin/python examples/train_smoe.py --minutes 60            # resumes if interrupted
    .venv/bin/python examples/train_smoe.py --minutes 60 --out DIR  # default: ~/.cache/uncurl/smoe-mixtral-8x

No pretrained SMoE can be downloaded here and tiny random models make every metric meaningless,
so this trains one: 4 layers, hidden 256, 8 experts, top-2, an 8k byte-level BPE vocabulary
trained on the same text. Data: the English corpus in ../shared/data/corpus (all but the last 2%
of each file, held out for evaluation and task-agnostic calibration) plus the SuperGLUE training
splits rendered with uncurl's task templates (so the model has seen the prompt formats; the
validation splits used for evaluation are never trained on).

Seeded, resumable (a checkpoint every --save-every steps and at the end of the time budget), logs
loss to train_log.jsonl, and writes a transformers folder to --out/model. Weights stay outside the
repository. The Mixtral load-balancing loss (router_aux_loss_coef) keeps experts in use.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from pathlib import Path

import torch

from uncurl.tasks import split_corpus  # the held-out tail (CORPUS_HOLDOUT) is the corpus task's data

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data"
DEFAULT_OUT = Path(os.environ.get("UNCURL_CACHE", Path.home() / ".cache" / "uncurl")) / "smoe-mixtral-8x"
TASKS = ("superglue-rte", "superglue-cb", "superglue-copa", "superglue-boolq")


def corpus_files(data: Path) -> list[Path]:
    return sorted((data / "corpus").glob("*.txt"))


def training_texts(data: Path) -> list[str]:
    from uncurl.tasks import get_task, load_examples

    texts = [split_corpus(p.read_text(errors="replace"))[0] for p in corpus_files(data)]
    for name in TASKS:
        texts += [e.text for e in load_examples(get_task(name), "calibration", data)]
    return texts


def train_tokenizer(texts: list[str], vocab: int, out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<pad>")
    fast.save_pretrained(out)
    return fast


def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for i in range(0, len(texts), 256):
        for row in tokenizer(texts[i : i + 256])["input_ids"]:
            ids += row + [eos]
    return torch.tensor(ids, dtype=torch.int32)


def build_model(vocab: int, seed: int):
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=vocab, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=1024, router_aux_loss_coef=0.02, output_router_logits=False,
        tie_word_embeddings=False, eos_token_id=0, pad_token_id=1, bos_token_id=None,
    )
    torch.manual_seed(seed)
    return MixtralForCausalLM(config)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--minutes", type=float, default=60.0, help="wall-clock budget for this run")
    ap.add_argument("--max-steps", type=int, default=1400, help="learning-rate schedule length (1400 x 4096 tokens: ~1 epoch, ~1 hour on 2 cores)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save-every", type=int, default=100)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    args.out.mkdir(parents=True, exist_ok=True)
    tok_dir, ckpt, log_path = args.out / "tokenizer", args.out / "checkpoint.pt", args.out / "train_log.jsonl"
    from transformers import PreTrainedTokenizerFast

    if (tok_dir / "tokenizer.json").is_file():
        tokenizer = PreTrainedTokenizerFast.from_pretrained(tok_dir)
    else:
        tokenizer = train_tokenizer(training_texts(args.data_dir), args.vocab, tok_dir)
    stream_path = args.out / "train_tokens.pt"
    if stream_path.is_file():
        stream = torch.load(stream_path)
    else:
        stream = token_stream(tokenizer, training_texts(args.data_dir))
        torch.save(stream, stream_path)
    n_blocks = (len(stream) - 1) // args.seq_len
    print(f"{len(stream):,} training tokens, {n_blocks:,} blocks of {args.seq_len}", flush=True)

    model = build_model(len(tokenizer), args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    step = 0
    if ckpt.is_file():
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step = state["step"]
        print(f"resumed at step {step}", flush=True)

    def lr_at(s: int) -> float:
        warm = 100
        if s < warm:
            return args.lr * (s + 1) / warm
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (s - warm) / (args.max_steps - warm)))))

    def batch_at(s: int) -> torch.Tensor:
        per_epoch = n_blocks // args.batch
        epoch, pos = divmod(s, per_epoch)
        order = torch.randperm(n_blocks, generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
        starts = order[pos * args.batch : (pos + 1) * args.batch] * args.seq_len
        return torch.stack([stream[i : i + args.seq_len + 1].long() for i in starts.tolist()])

    def save(final: bool = False) -> None:
        tmp = ckpt.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step}, tmp)
        tmp.replace(ckpt)
        model.save_pretrained(args.out / "model")
        tokenizer.save_pretrained(args.out / "model")

    model.train()
    start, tokens, log = time.time(), 0, log_path.open("a")
    while step < args.max_steps and time.time() - start < args.minutes * 60:
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        seq = batch_at(step)
        out = model(input_ids=seq[:, :-1], output_router_logits=True)
        logits = out.logits
        lm = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), seq[:, 1:].reshape(-1))
        loss = lm + model.config.router_aux_loss_coef * out.aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens += seq[:, :-1].numel()
        if step % 10 == 0:
            rec = {"step": step, "lm_loss": round(lm.item(), 4), "aux_loss": round(out.aux_loss.item(), 4),
                   "lr": lr_at(step), "tok_per_s": round(tokens / (time.time() - start), 1)}
            log.write(json.dumps(rec) + "\n")
            log.flush()
            if step % 50 == 0:
                print(rec, flush=True)
        if step % args.save_every == 0:
            save()
    save()
    print(f"stopped at step {step}; model in {args.out / 'model'}", flush=True)


if __name__ == "__main__":
    random.seed(0)
    main()
