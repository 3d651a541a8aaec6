"""Supervised fine-tuning on chat transcripts: what is particular to it, on the shared Trainer.

Data: a jsonl file of {"messages": [{"role", "content", optional "reasoning_content"}, ...]}. Every assistant
turn becomes one example, built the way inference will see it: the turns before it rendered by the model's
chat template with a generation prompt (nanoseek.chat.render_prompt — so history follows R1's convention of
dropping earlier reasoning), then the reply itself as the target — reasoning kept inside `<think>…</think>`,
then the answer, then the end-of-turn token. Only target tokens carry loss (label -100 elsewhere).

Examples are packed first-fit into rows of `seq_len` tokens (fewer padding tokens than one example per row;
attention still crosses example boundaries within a row, as in TRL's packing without position resets). The
loss is pretraining's LanguageModeling objective: cross-entropy ignores the -100 labels.

LoRA (nanoseek.train.lora) is an option: adapters on chosen linears, every other weight frozen, and the
adapters merged into the base weights before the final model is written.
"""

from __future__ import annotations

import dataclasses
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nanoseek.chat import render_prompt
from nanoseek.errors import BadInputError, NotFoundError
from nanoseek.train.lora import LoRAConfig, apply_lora, trainable_summary
from nanoseek.train.pretrain import LanguageModeling

IGNORE = -100


class SFTObjective(LanguageModeling):
    """Next-token cross-entropy on reply tokens only (labels are -100 elsewhere); no MTP term."""

    name = "sft"

    def __init__(self):
        super().__init__(mtp_weight=0.0)


@dataclass
class Example:
    ids: list[int]
    labels: list[int]


def reply_text(message: dict, prompt_opened_think: bool) -> str:
    """An assistant turn as the model should write it: `<think>\\n…\\n</think>\\n\\n` + answer when it has
    reasoning (without the opening tag when the prompt already opened the block)."""
    content = message.get("content") or ""
    reasoning = message.get("reasoning_content")
    if not reasoning:
        return content
    return ("" if prompt_opened_think else "<think>\n") + reasoning.strip("\n") + "\n</think>\n\n" + content


def build_examples(tokenizer, conversations: list[list[dict]], seq_len: int) -> list[Example]:
    """One example per assistant turn; targets are that turn's tokens plus the end-of-turn token."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise BadInputError("the tokenizer has no EOS token: SFT needs one to teach the model to stop")
    out = []
    for conv in conversations:
        for i, m in enumerate(conv):
            if m.get("role") != "assistant" or i == 0:
                continue
            # False, not None, without reasoning: a template that opens <think> itself (R1-Distill) gets it
            # closed, so the reply is trained as an answer rather than as reasoning that never ends.
            thinking = bool(m.get("reasoning_content"))
            prompt = render_prompt(tokenizer, conv[:i], thinking=thinking)
            target = tokenizer.encode(reply_text(m, prompt.starts_in_reasoning), add_special_tokens=False) + [eos]
            ids = prompt.ids + target
            if len(ids) > seq_len + 1:  # rows hold seq_len + 1 tokens (inputs and shifted labels)
                continue
            out.append(Example(ids, [IGNORE] * len(prompt.ids) + target))
    if not out:
        raise BadInputError(f"no assistant turn fits in seq_len {seq_len} (or the data has no assistant turns)")
    return out


def read_conversations(path: str | Path) -> list[list[dict]]:
    """The `messages` list of every line of a chat jsonl file; errors name the file and line."""
    from nanoseek.tasks.jsonl import read_jsonl

    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"{path}: no such file")
    convs = []
    for n, row in read_jsonl(path):
        msgs = row.get("messages")
        if not isinstance(msgs, list) or not all(isinstance(m, dict) and "role" in m for m in msgs):
            raise BadInputError(f"{path}:{n}: expected {{\"messages\": [{{\"role\", \"content\"}}, ...]}}")
        convs.append(msgs)
    if not convs:
        raise BadInputError(f"{path}: no conversations (the file is empty; a traces file from `distill traces` "
                            "is empty when no completion was kept: try more --samples or --keep formatted)")
    return convs


def pack(examples: list[Example], seq_len: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """First-fit-decreasing into rows of seq_len + 1 tokens → (x, y) [rows, seq_len], y = next-token labels
    with -100 wherever the next token is prompt or padding."""
    width = seq_len + 1
    rows: list[tuple[list[int], list[int]]] = []
    for ex in sorted(examples, key=lambda e: -len(e.ids)):
        for r in rows:
            if len(r[0]) + len(ex.ids) <= width:
                r[0].extend(ex.ids)
                r[1].extend(ex.labels)
                break
        else:
            rows.append((list(ex.ids), list(ex.labels)))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, (r_ids, r_labels) in enumerate(rows):
        ids[i, :len(r_ids)] = torch.tensor(r_ids)
        labels[i, :len(r_labels)] = torch.tensor(r_labels)
    return ids[:, :-1].contiguous(), labels[:, 1:].contiguous()


class SFTBatches:
    """The Trainer's batch source: packed rows, reshuffled each epoch by seed; each global batch of
    batch_size × world rows is sliced by rank (as PackedLoader does), so resume is exact."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, device="cpu"):
        if x.shape[0] < world_size:
            raise BadInputError(f"{x.shape[0]} packed row(s) cannot give each of {world_size} processes one: "
                                "lower --seq-len, add data, or run fewer processes")
        if x.shape[0] < batch_size * world_size:
            # Small data (a 20-conversation file packs into one row): fit the batch to it rather than fail.
            fitted = x.shape[0] // world_size
            if rank == 0:
                print(f"nanoseek: note: {x.shape[0]} packed row(s) cannot fill --batch-size {batch_size} "
                      f"× {world_size} process(es); using --batch-size {fitted}", file=sys.stderr)
            batch_size = fitted
        self.x, self.y, self.bs, self.rank, self.world = x, y, batch_size, rank, world_size
        self.seed, self.device = seed, device
        self.steps_per_epoch = x.shape[0] // (batch_size * world_size)
        self.epoch, self.step = 0, 0

    def _order(self) -> list[int]:
        order = list(range(self.x.shape[0]))
        random.Random(f"{self.seed}/{self.epoch}").shuffle(order)
        return order

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.step >= self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        g = self.bs * self.world
        start = self.step * g + self.rank * self.bs
        idx = torch.tensor(self._order()[start:start + self.bs])
        self.step += 1
        return self.x[idx].to(self.device), self.y[idx].to(self.device)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.step = state["epoch"], state["step"]


def chat_batches(tokenizer, data: str | Path, seq_len: int, batch_size: int, env, seed: int) -> SFTBatches:
    """Chat jsonl → packed reply-only examples → this rank's batch source (SFT and logit distillation)."""
    examples = build_examples(tokenizer, read_conversations(data), seq_len)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    x, y = pack(examples, seq_len, pad)
    return SFTBatches(x, y, batch_size, rank=env.rank, world_size=env.world_size, seed=seed, device=env.device)


def run_sft(model: str, data: str | Path, train, *, seq_len: int = 1024, batch_size: int = 8,
            lora: LoRAConfig | None = None) -> dict[str, Any]:
    """Fine-tune `model` on chat jsonl `data` with the shared Trainer; writes `<out_dir>/final` (HF format).

    With `lora`, the loaded model is frozen and wrapped with LoRA adapters before training (checkpoints hold
    adapters and frozen base, and resume onto a freshly wrapped base), and the adapters are merged into the
    base weights before `final` is written, so it is an ordinary model."""
    from nanoseek.train import distributed as D
    from nanoseek.train.finetune import fit_and_save, load_trainable
    from nanoseek.train.loop import Trainer

    env = D.init_distributed(train.train.device)
    try:
        loaded = load_trainable(model, env.device)
        if lora is not None:
            lora.validate()
            wrapped = apply_lora(loaded.model, lora.r, lora.alpha, lora.targets, lora.dropout, seed=lora.seed)
            if env.is_main:
                trainable, total = trainable_summary(loaded.model)
                print(f"nanoseek: LoRA r={lora.r} alpha={lora.alpha:g} on {len(wrapped)} linears: "
                      f"{trainable:,} of {total:,} parameters trainable ({100 * trainable / total:.2f}%)",
                      file=sys.stderr)
        source = chat_batches(loaded.tokenizer, data, seq_len, batch_size, env, train.train.seed)
        meta = {"base_model": str(model), "data": str(Path(data).resolve()), "rows": source.x.shape[0]}
        if lora is not None:
            meta["lora"] = dataclasses.asdict(lora)
        return fit_and_save(Trainer(train, loaded.model, SFTObjective(), source, None, env, meta), loaded, env)
    finally:
        D.shutdown()
