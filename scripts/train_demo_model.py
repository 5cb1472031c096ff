#!/usr/bin/env python
"""Train the small demo model shipped in demo/model (issue 8).

The demo model lets `textgen serve` work out of the box, offline, with a model that was actually
trained (so its greedy output looks like Python rather than random tokens). Everything it needs is
already on every machine:

* data: the Python standard library's top-level ``*.py`` sources
  (``sysconfig.get_paths()["stdlib"]``), sorted by name; every 20th file is held out for validation;
* tokenizer: a byte-level BPE trained here with the ``tokenizers`` library on the training files,
  saved as a ``PreTrainedTokenizerFast`` with ``<unk> <s> </s> <pad>`` and a chat template.
  Runs of whitespace are pre-tokenized as pieces of their own (not glued to the next word as in
  GPT-2), so a prompt that ends in a space, such as ``"def "``, is tokenized exactly as the same
  text is inside the training data, and the model continues it with a name, not with a comment;
* model: a ``transformers.LlamaForCausalLM`` (a few million parameters, GQA, tied embeddings)
  trained with AdamW on the CPU (2 threads), stored in float32.

The run is reproducible: the file list is sorted, the tokenizer training is deterministic, and the
weight init and the data order come from ``--seed`` (torch.manual_seed and a seeded
torch.Generator). The loss numbers are only comparable between runs on the same Python version
(the stdlib differs between versions); TRAINING.md records which one was used.

Usage::

    python scripts/train_demo_model.py --out demo/model [--steps N] [--seed 0]

At the end the validation loss of the trained model and of the same architecture with its initial
(random, same seed) weights are printed and written to ``<out>/TRAINING.md`` together with the
data description, hyperparameters, steps and training time.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import platform
import sys
import sysconfig
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]

# Same turn format as the tiny test models (textgen.testing.tiny_models), plus OpenAI-style content parts
# (a list of {"type": "text", "text": ...}) so multi-part user messages render as their text.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "<s>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}"
    "{% elif m['content'] is not none %}"
    "{% for part in m['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% endif %}"
    "</s>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)

SAMPLE_PROMPTS = ["def ", "import ", "class ", "    for "]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="demo/model", help="output folder (default: demo/model)")
    p.add_argument("--steps", type=int, default=700, help="optimizer steps (default: 700)")
    p.add_argument("--seed", type=int, default=0, help="seed for init and data order (default: 0)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="final lr as a fraction of peak")
    p.add_argument("--warmup", type=int, default=40, help="linear warmup steps")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--intermediate-size", type=int, default=688)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--val-every", type=int, default=20, help="hold out every N-th file (default: 20)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--eval-every", type=int, default=100, help="quick val-loss probe every N steps")
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------------- data

def stdlib_files() -> list[str]:
    return sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))


def read(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def train_tokenizer(train_files: list[str], vocab_size: int):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    # Whitespace runs are isolated pieces, then the usual byte-to-unicode mapping (no GPT-2 regex).
    # With GPT-2's regex "def foo" becomes "def" + " foo", while a prompt "def " ends in a lone " "
    # that the model only ever saw before comments ("x  # ..."): greedy output was "#\n#\n...".
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\s+"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # train_from_iterator over the sorted texts: same input order on every run.
    tok.train_from_iterator((read(f) for f in train_files), trainer, length=len(train_files))
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return tok


def token_stream(tok, files: list[str]) -> torch.Tensor:
    """<s> file </s> <s> file </s> ... as one long 1-D tensor of ids."""
    eos = tok.token_to_id("</s>")
    ids: list[int] = []
    for enc in tok.encode_batch([read(f) for f in files]):  # the post-processor adds <s>
        ids.extend(enc.ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def chunks(stream: torch.Tensor, seq_len: int, offset: int = 0) -> torch.Tensor:
    n = (stream.numel() - offset) // seq_len
    return stream[offset: offset + n * seq_len].view(n, seq_len)


def batches(stream: torch.Tensor, seq_len: int, batch_size: int, gen: torch.Generator):
    """Endless deterministic batches: each epoch starts the chunk grid at a random offset and
    visits the chunks in a random order (both drawn from `gen`)."""
    epoch = 0
    while True:
        offset = int(torch.randint(0, seq_len, (1,), generator=gen))
        data = chunks(stream, seq_len, offset)
        order = torch.randperm(data.shape[0], generator=gen)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            yield epoch, data[order[i: i + batch_size]]
        epoch += 1


# -------------------------------------------------------------------------------------------- model

@torch.inference_mode()
def eval_loss(model, val: torch.Tensor, batch_size: int = 32) -> float:
    """Token-weighted mean next-token cross-entropy over all validation chunks."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, val.shape[0], batch_size):
        x = val[i: i + batch_size]
        logits = model(input_ids=x).logits[:, :-1].float()
        tgt = x[:, 1:]
        total += torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="sum"
        ).item()
        count += tgt.numel()
    model.train(was_training)
    return total / count


@torch.inference_mode()
def greedy(model, hf_tok, prompt: str, max_new_tokens: int = 48) -> str:
    enc = hf_tok(prompt, return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
    return hf_tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def lr_at(step: int, args: argparse.Namespace) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    cos = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * cos)


def portable_tokenizer_config(out: Path) -> None:
    """transformers 5 writes tokenizer_class "TokenizersBackend", a name transformers 4.x does not
    know; "PreTrainedTokenizerFast" loads the same tokenizer.json in both (in 5 it is an alias)."""
    path = out / "tokenizer_config.json"
    cfg = json.loads(path.read_text(encoding="utf-8"))
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def fmt_time(s: float) -> str:
    return f"{int(s // 60)} min {s % 60:04.1f} s"


# --------------------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import tokenizers
    import transformers
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    # ---- data + tokenizer
    files = stdlib_files()
    if not files:
        raise SystemExit(f"no *.py files under {sysconfig.get_paths()['stdlib']}")
    val_files = [f for i, f in enumerate(files) if i % args.val_every == 0]
    train_files = [f for i, f in enumerate(files) if i % args.val_every != 0]
    t0 = time.time()
    tok = train_tokenizer(train_files, args.vocab_size)
    t_tok = time.time() - t0
    train_stream = token_stream(tok, train_files)
    val_stream = token_stream(tok, val_files)
    val = chunks(val_stream, args.seq_len)
    train_bytes = sum(os.path.getsize(f) for f in train_files)
    val_bytes = sum(os.path.getsize(f) for f in val_files)
    print(f"python {platform.python_version()}  stdlib {sysconfig.get_paths()['stdlib']}", flush=True)
    print(f"files: {len(train_files)} train ({train_bytes/1e6:.2f} MB, {train_stream.numel():,} tokens), "
          f"{len(val_files)} val ({val_bytes/1e6:.2f} MB, {val_stream.numel():,} tokens, "
          f"{val.shape[0]} chunks of {args.seq_len})", flush=True)
    print(f"tokenizer: byte-level BPE, vocab {tok.get_vocab_size()}, trained in {t_tok:.1f} s", flush=True)

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>", chat_template=CHAT_TEMPLATE, model_max_length=1024,
    )
    bos, eos, pad = (tok.token_to_id(t) for t in ("<s>", "</s>", "<pad>"))

    # ---- model
    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=1024,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        hidden_act="silu",
        initializer_range=0.02,
        tie_word_embeddings=True,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config).float()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: LlamaForCausalLM, {n_params:,} parameters "
          f"(hidden {args.hidden_size}, {args.layers} layers, {args.heads} heads, {args.kv_heads} kv heads, "
          f"intermediate {args.intermediate_size})", flush=True)

    t0 = time.time()
    random_val_loss = eval_loss(model, val)
    print(f"validation loss with random (seed {args.seed}) weights: {random_val_loss:.4f} "
          f"({time.time() - t0:.1f} s)", flush=True)

    # ---- train
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
    )
    gen = torch.Generator().manual_seed(args.seed)
    data = batches(train_stream, args.seq_len, args.batch_size, gen)
    probe = val[: min(32, val.shape[0])]
    model.train()
    t_train0, cpu_train0 = time.time(), time.process_time()
    ema = None
    epoch = 0
    history: list[tuple[int, float, float]] = []
    for step in range(args.steps):
        lr = lr_at(step, args)
        for g in opt.param_groups:
            g["lr"] = lr
        epoch, x = next(data)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        done = step + 1
        if done % args.log_every == 0 or done == args.steps or step == 0:
            el = time.time() - t_train0
            tps = done * args.batch_size * args.seq_len / el
            eta = el / done * (args.steps - done)
            print(f"step {done:5d}/{args.steps}  loss {loss.item():.4f}  ema {ema:.4f}  lr {lr:.2e}  "
                  f"epoch {epoch}  {tps:,.0f} tok/s  elapsed {fmt_time(el)}  eta {fmt_time(eta)}", flush=True)
        if args.eval_every and done % args.eval_every == 0 and done != args.steps:
            pl = eval_loss(model, probe)
            history.append((done, ema, pl))
            print(f"  probe val loss ({probe.shape[0]} chunks) at step {done}: {pl:.4f}", flush=True)
    t_train = time.time() - t_train0
    cpu_train = time.process_time() - cpu_train0
    load = os.getloadavg()[1] if hasattr(os, "getloadavg") else float("nan")
    tokens_seen = args.steps * args.batch_size * args.seq_len

    # ---- evaluate
    model.eval()
    t0 = time.time()
    val_loss = eval_loss(model, val)
    print(f"validation loss, trained: {val_loss:.4f}  random init: {random_val_loss:.4f}  "
          f"({time.time() - t0:.1f} s)", flush=True)

    # ---- save
    model.generation_config = GenerationConfig(bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)
    model.save_pretrained(str(out), safe_serialization=True)
    hf_tok.save_pretrained(str(out))
    portable_tokenizer_config(out)
    size = (out / "model.safetensors").stat().st_size

    samples = {p: greedy(model, hf_tok, p) for p in SAMPLE_PROMPTS}
    for p, s in samples.items():
        print(f"--- greedy after {p!r}:\n{p}{s}", flush=True)
    total = time.time() - t_start

    write_report(
        out, args=args, n_params=n_params, size=size, config=config,
        n_train=len(train_files), n_val=len(val_files), train_bytes=train_bytes, val_bytes=val_bytes,
        train_tokens=train_stream.numel(), val_tokens=val_stream.numel(), val_chunks=val.shape[0],
        vocab=tok.get_vocab_size(), t_tok=t_tok, t_train=t_train, cpu_train=cpu_train, load=load,
        total=total, tokens_seen=tokens_seen,
        epochs=tokens_seen / train_stream.numel(), val_loss=val_loss, random_val_loss=random_val_loss,
        history=history, samples=samples,
        versions={"torch": torch.__version__, "transformers": transformers.__version__,
                  "tokenizers": tokenizers.__version__},
    )
    print(f"model.safetensors: {size/1e6:.2f} MB; training {fmt_time(t_train)}; total {fmt_time(total)}")
    print(f"wrote {out}/TRAINING.md")
    return 0


def write_report(out: Path, *, args, n_params, size, config, n_train, n_val, train_bytes, val_bytes,
                 train_tokens, val_tokens, val_chunks, vocab, t_tok, t_train, cpu_train, load, total,
                 tokens_seen, epochs,
                 val_loss, random_val_loss, history, samples, versions) -> None:
    cpu = platform.processor() or platform.machine()
    hist = "\n".join(f"| {s} | {e:.4f} | {p:.4f} |" for s, e, p in history)
    sample_md = "\n\n".join(f"Prompt `{p!r}`:\n\n```python\n{p}{s}\n```" for p, s in samples.items())
    cfg = {k: getattr(config, k) for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "max_position_embeddings", "tie_word_embeddings", "rms_norm_eps")}
    text = f"""# textgen demo model

A small Llama-architecture causal LM trained on the Python standard library's sources, so that
`textgen serve` works out of the box and offline with a model whose greedy output looks like Python.
It is a demo and test fixture, not a useful assistant: it has never seen chat data.

Reproduce ({fmt_time(total)} of wall time here with {args.threads} torch threads; the time depends
on how busy the machine's cores were, see the load average below):

```
python scripts/train_demo_model.py --out {args.out} --steps {args.steps} --seed {args.seed}
```

## Results

| metric | value |
|---|---|
| validation loss, trained model | {val_loss:.4f} |
| validation loss, random weights (same architecture, seed {args.seed} init) | {random_val_loss:.4f} |
| validation perplexity, trained / random | {math.exp(val_loss):.1f} / {math.exp(random_val_loss):.1f} |
| ln(vocab size) (uniform guess) | {math.log(vocab):.4f} |
| training time (optimizer steps only) | {t_train:.1f} s ({fmt_time(t_train)}) |
| training CPU time (process time, all threads) | {cpu_train:.1f} s |
| machine load average at the end (5 min; > {args.threads} means the CPU was shared and wall time inflated) | {load:.2f} |
| total script time (tokenizer, data, evals, saving, samples) | {total:.1f} s |
| optimizer steps | {args.steps} |
| tokens seen | {tokens_seen:,} ({epochs:.2f} epochs) |
| parameters | {n_params:,} |
| model.safetensors | {size:,} bytes ({size / 1e6:.2f} MB, float32) |

Losses are mean next-token cross-entropy (nats) over all {val_chunks} validation chunks of
{args.seq_len} tokens.

## Data

* Source: the top-level `*.py` files of the Python {platform.python_version()} standard library
  (`sysconfig.get_paths()["stdlib"]`), sorted by file name, read as UTF-8.
* Split: every {args.val_every}th file (index 0, {args.val_every}, {2 * args.val_every}, ...) is validation.
* Train: {n_train} files, {train_bytes:,} bytes, {train_tokens:,} tokens.
* Validation: {n_val} files, {val_bytes:,} bytes, {val_tokens:,} tokens.
* Each file is encoded as `<s> text </s>` and the files are concatenated. Every epoch the stream is
  cut into {args.seq_len}-token chunks starting at a random offset and the chunks are visited in a
  random order (a `torch.Generator` seeded with `--seed`).

The stdlib differs between Python versions, so loss numbers are comparable only for the same version.

## Tokenizer

Byte-level BPE (`tokenizers`), vocab {vocab}, trained on the training files only. Pre-tokenizer:
runs of whitespace are split off as pieces of their own (`Split(\\s+, isolated)`), then
`ByteLevel(use_regex=False)`; so `"def foo"` is `def` + ` ` + `foo` and a prompt ending in a space is
tokenized as in the training text. BPE merges never cross whitespace. Special tokens
`<unk>`=0, `<s>`=1 (BOS, added by a `TemplateProcessing` post-processor), `</s>`=2 (EOS), `<pad>`=3.
Saved as a `PreTrainedTokenizerFast` with a chat template (`chat_template.jinja`):
`<s>{{{{role}}}}\\n{{{{content}}}}</s>\\n` per message, and `<s>assistant\\n` for `add_generation_prompt`.

## Model and hyperparameters

* `LlamaForCausalLM`: `{json.dumps(cfg)}`, rope_theta 10000, SiLU MLP, RMSNorm.
* Init: `torch.manual_seed({args.seed})` then `LlamaForCausalLM(config)` (transformers' default init).
* Optimizer: AdamW, peak lr {args.lr}, betas (0.9, 0.95), eps 1e-8, weight decay {args.weight_decay}
  (matrices only; norms excluded), gradient clipping {args.grad_clip}.
* Schedule: linear warmup {args.warmup} steps, cosine decay to {args.min_lr_ratio} x peak at step {args.steps}.
* Batch: {args.batch_size} sequences x {args.seq_len} tokens = {args.batch_size * args.seq_len:,} tokens per step.
* float32 training and storage; `torch.set_num_threads({args.threads})`, `torch.use_deterministic_algorithms(True)`.
* Environment: {cpu}, Python {platform.python_version()}, torch {versions['torch']},
  transformers {versions['transformers']}, tokenizers {versions['tokenizers']}.

Quick validation probes during training (first 32 validation chunks):

| step | train loss (EMA) | probe val loss |
|---|---|---|
{hist}

## Greedy samples (48 new tokens, `do_sample=False`)

{sample_md}
"""
    (out / "TRAINING.md").write_text(text, encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
