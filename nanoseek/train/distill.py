"""Distillation, the way DeepSeek-R1 made its small models (R1 §2.4), plus logit distillation.

Two steps, each only what is particular to it:

- traces: a teacher answers a task's training problems k times through the engine; completions that the
  task's rule-based reward scores correct and well-formed are kept (rejection sampling, R1 §2.3.3) and written
  as chat jsonl — the reasoning in `reasoning_content`, the answer in `content` — which `nanoseek sft`
  trains on (R1's distilled models are exactly SFT on such traces; no RL).
- logit distillation: `KDObjective` trains a student toward a teacher's full next-token distribution on the
  reply tokens of the same chat data (forward KL at temperature τ, Hinton et al. 2015), optionally mixed with
  the plain cross-entropy. Teacher and student must share a vocabulary. Runs on the shared Trainer.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.chat import split_reasoning
from nanoseek.engine.sampling import SamplingParams
from nanoseek.errors import BadInputError
from nanoseek.evaluate import completion_text, sample_seed
from nanoseek.files import write_text_atomic
from nanoseek.progress import progress_bar
from nanoseek.tasks.base import Problem, Task
from nanoseek.tasks.prompts import Template
from nanoseek.train.loop import Objective, cross_entropy
from nanoseek.train.sft import IGNORE

# What to do instead when logit-level distillation meets two tokenizers (every refusal says it).
ACROSS_VOCABULARIES = "across vocabularies use trace distillation (`nanoseek distill traces`, then `nanoseek sft`)"


def trace_record(template: Template, problem: Problem, text: str, started_in_think: bool) -> dict:
    """One kept completion as an SFT conversation: the prompt's messages, then the reply split into
    reasoning and answer (chat.split_reasoning, the same split the server streams)."""
    reasoning, content = split_reasoning(text, start_in_reasoning=started_in_think)
    # Whitespace around the tags is the teacher's; SFT writes canonical newlines around them (sft.reply_text).
    reply = {"role": "assistant", "content": content.strip()}
    if reasoning and reasoning.strip():
        reply["reasoning_content"] = reasoning.strip()
    return {"messages": [*template.messages(problem), reply], "id": problem.id, "answer": problem.answer}


def generate_traces(engine, tokenizer, task: Task, problems: Sequence[Problem], out: str | Path, *,
                    samples: int = 4, max_tokens: int = 1024, temperature: float = 0.6, top_p: float = 0.95,
                    keep: str = "correct", seed: int = 0, open_think: bool = True) -> dict[str, Any]:
    """Sample `samples` completions per problem from the teacher `engine`, keep the correct well-formed ones
    (keep="correct") or every well-formed one (keep="formatted"), drop repeats of a reply already kept for the
    same problem, and write them as chat jsonl atomically. Returns counts: problems, completions, kept,
    problems with at least one kept trace, duplicates dropped."""
    _check_sampling(keep, samples)
    template = Template("chat", open_think)
    prompts = [template.render(tokenizer, p) for p in problems]
    params = [SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=list(template.stop),
                             seed=sample_seed(seed, p.id, j)) for p in problems for j in range(samples)]
    with progress_bar("distill traces (completions)", len(params)) as advance:
        outs = engine.generate([pr.ids for pr in prompts for _ in range(samples)], params,
                               on_delta=lambda d: advance() if d.finish_reason is not None else None)
    replies = [(completion_text(tokenizer, c, template.stop), prompts[k // samples].starts_in_reasoning,
                len(c.token_ids)) for k, c in enumerate(outs)]
    return _keep_traces(task, template, problems, replies, samples, keep, out)


def _check_sampling(keep: str, samples: int) -> None:
    """Both teachers' settings, checked before any generation."""
    if keep not in ("correct", "formatted"):
        raise BadInputError(f"keep {keep!r}: correct or formatted")
    if samples < 1:
        raise BadInputError("samples must be ≥ 1")


def _keep_traces(task: Task, template: Template, problems: Sequence[Problem], replies, samples: int, keep: str,
                 out: str | Path) -> dict[str, Any]:
    """The rejection sampling both teachers share: replies[k] = (text, started_in_think, tokens) of sample
    k % samples of problem k // samples."""
    records, covered, seen, duplicates = [], set(), set(), 0
    for k, (text, started, n_tokens) in enumerate(replies):
        problem = problems[k // samples]
        r = task.reward(text, problem, started_in_think=started, num_tokens=n_tokens)
        if r.format == 1.0 and (keep == "formatted" or r.accuracy == 1.0):
            rec = trace_record(template, problem, text, started)
            key = (problem.id, json.dumps(rec["messages"][-1], sort_keys=True))
            if key in seen:   # the same reply twice (common at low temperature) would count double in SFT
                duplicates += 1
                continue
            seen.add(key)
            records.append(rec)
            covered.add(problem.id)
    write_text_atomic(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return {"problems": len(problems), "completions": len(replies), "kept": len(records),
            "problems_covered": len(covered), "duplicates": duplicates}


def post_teacher(endpoint: str, body: dict, key: str | None, model: str | None, timeout_s: float) -> dict:
    """POST `body` (plus `model`, if given) as JSON to a teacher server's `endpoint` and return the JSON reply;
    any failure (HTTP status, network, timeout, a reply that is no JSON) is one BadInputError naming the URL."""
    import urllib.error
    import urllib.request

    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    if model:
        body = {**body, "model": model}
    req = urllib.request.Request(endpoint, json.dumps(body).encode(), headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as e:
        detail = e.read()[:300].decode(errors="replace")
        raise BadInputError(f"teacher {endpoint}: HTTP {e.code}: {detail}") from None
    except (urllib.error.URLError, TimeoutError, ValueError) as e:
        raise BadInputError(f"teacher {endpoint}: {e}") from None


def generate_traces_api(url: str, key: str | None, model: str | None, task: Task, problems: Sequence[Problem],
                        out: str | Path, *, samples: int = 4, max_tokens: int = 1024, temperature: float = 0.6,
                        top_p: float = 0.95, keep: str = "correct", seed: int = 0, open_think: bool = True,
                        timeout_s: float = 600.0) -> dict[str, Any]:
    """`generate_traces` with an OpenAI-compatible endpoint as the teacher (DeepSeek's API, a nanoseek server,
    any chat API): one chat request per sample with the same messages, seed and sampling as a local teacher.
    Traces are text, so the teacher's vocabulary does not matter (the way across vocabularies). A reply's
    `reasoning_content` (DeepSeek's reasoner, a nanoseek server) becomes its think block; a model that writes
    `<think>` itself keeps its text as is. `open_think` has no say here: an API renders its own prompt."""
    _check_sampling(keep, samples)
    template = Template("chat", open_think)
    endpoint = url.rstrip("/") + "/chat/completions"
    replies = []
    with progress_bar("distill traces (completions)", len(problems) * samples) as advance:
        for p in problems:
            for j in range(samples):
                body = {"messages": template.messages(p), "max_tokens": max_tokens, "temperature": temperature,
                        "top_p": top_p, "seed": sample_seed(seed, p.id, j) % 2**31}
                reply = post_teacher(endpoint, body, key, model, timeout_s)
                msg = (reply.get("choices") or [{}])[0].get("message") or {}
                content, reasoning = msg.get("content") or "", msg.get("reasoning_content")
                text = f"<think>\n{reasoning}\n</think>\n\n{content}" if reasoning else content
                tokens = (reply.get("usage") or {}).get("completion_tokens")
                replies.append((text, False, tokens))
                advance()
    return _keep_traces(task, template, problems, replies, samples, keep, out)


def check_same_tokenizer(t, s, teacher: str, student: str, what: str) -> None:
    """One line, before any batch: logit-level distillation (KD, on-policy) compares next-token distributions
    over the same ids, so teacher `t` and student `s` (LoadedModels) need one tokenizer. Compared by size of
    the embedding table, and by the vocabularies themselves when both checkpoints carry tokenizer files."""
    tv, sv = t.model.config.vocab_size, s.model.config.vocab_size
    if tv != sv:
        # The student's token ids would index past a smaller teacher's table.
        raise BadInputError(f"--teacher {teacher} has a vocabulary of {tv:,} ids, --model {student} {sv:,}: "
                            f"{what} needs one tokenizer; {ACROSS_VOCABULARIES}")
    if t.tokenizer is not None and s.tokenizer is not None and t.tokenizer.get_vocab() != s.tokenizer.get_vocab():
        raise BadInputError(f"--teacher {teacher} and --model {student} have different tokenizers of the same size: "
                            f"{what} needs one tokenizer; {ACROSS_VOCABULARIES}")


def load_teacher(teacher: str, student_loaded, student: str, what: str, device) -> nn.Module:
    """The frozen local teacher of logit-level distillation (KD, on-policy), refused before it is moved to the
    device when its tokenizer is not the student's (`check_same_tokenizer`)."""
    from nanoseek.weights.registry import load_model

    t = load_model(teacher)
    check_same_tokenizer(t, student_loaded, teacher, student, what)
    tmodel = t.model.to(device).eval()
    for p in tmodel.parameters():
        p.requires_grad_(False)
    return tmodel


class KDObjective(Objective):
    """α·τ²·KL(p_teacher^τ ‖ p_student^τ) + (1 − α)·CE on reply tokens (labels ≠ -100). τ² keeps the
    gradient scale independent of τ (Hinton et al. §2). The teacher runs without gradients."""

    name = "distill"
    console_keys = ("kl", "ce")

    def __init__(self, teacher: nn.Module, alpha: float = 1.0, temperature: float = 1.0):
        if not 0 <= alpha <= 1 or temperature <= 0:
            raise BadInputError("distillation needs 0 ≤ alpha ≤ 1 and temperature > 0")
        self.teacher, self.alpha, self.tau = teacher.eval(), alpha, temperature

    def loss(self, model: nn.Module, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, y = batch
        logits, _ = model(x)
        with torch.no_grad():
            t_logits = self.teacher(x)
        if t_logits.shape[-1] != logits.shape[-1]:
            raise BadInputError(f"teacher vocabulary {t_logits.shape[-1]} ≠ student {logits.shape[-1]}: "
                                "logit distillation needs a shared tokenizer")
        keep = y != IGNORE
        s = F.log_softmax(logits[keep].float() / self.tau, dim=-1)
        t = F.log_softmax(t_logits[keep].float() / self.tau, dim=-1)
        kl = (t.exp() * (t - s)).sum(-1).mean() * self.tau ** 2
        ce = cross_entropy(logits, y)
        loss = self.alpha * kl + (1 - self.alpha) * ce
        return loss, {"kl": kl.detach(), "ce": ce.detach()}


def run_distill(teacher: str, student: str, data: str | Path, train, *, seq_len: int = 1024, batch_size: int = 8,
                alpha: float = 1.0, temperature: float = 1.0) -> dict[str, Any]:
    """Logit-distill `teacher` into `student` on chat jsonl `data` (replies only); writes `<out_dir>/final`."""
    from nanoseek.train import distributed as D
    from nanoseek.train.finetune import fit_and_save, load_trainable
    from nanoseek.train.loop import Trainer
    from nanoseek.train.sft import chat_batches

    env = D.init_distributed(train.train.device)
    try:
        loaded = load_trainable(student, env.device)
        tmodel = load_teacher(teacher, loaded, student, "logit distillation", env.device)
        source = chat_batches(loaded.tokenizer, data, seq_len, batch_size, env, train.train.seed)
        meta = {"teacher": str(teacher), "base_model": str(student), "data": str(Path(data).resolve())}
        objective = KDObjective(tmodel, alpha, temperature)
        return fit_and_save(Trainer(train, loaded.model, objective, source, None, env, meta), loaded, env)
    finally:
        D.shutdown()
