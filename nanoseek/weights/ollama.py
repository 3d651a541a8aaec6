"""Ollama Modelfiles for our GGUF exports: FROM, a TEMPLATE in Ollama's Go-template syntax that renders a
conversation as the tokenizer's Jinja chat template does, the stop tokens, and sampling parameters.

Go templates cannot run Jinja, so each chat-template family we produce has its Go twin here:
- `r1`: nanoseek's own (`tokenizer train`, DeepSeek-R1 style). Ollama passes an assistant turn's reasoning
  separately (`.Thinking`), so `.Content` is already the text after </think>, which is all our template keeps.
  `.Think` (Ollama's think switch) opens the reply with "<think>\\n", like our `thinking` flag.
- `chatml`: <|im_start|>role ... <|im_end|> (SmolLM2, Qwen2), with the default system prompt the Jinja
  template inserts when the conversation has none.
Both cover conversations with at most one system message, first. The BOS token is not in the Go template:
llama.cpp adds it itself (`tokenizer.ggml.add_bos_token`). For any other chat template the Modelfile has no
TEMPLATE, and Ollama picks one from the chat template stored in the GGUF.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from nanoseek.files import write_text_atomic
from nanoseek.weights.registry import FALLBACK_SAMPLING

R1_GO = (
    '{{- if .System }}{{ .System }}{{ end }}'
    '{{- range .Messages }}'
    '{{- if eq .Role "user" }}<｜User｜>{{ .Content }}'
    '{{- else if eq .Role "assistant" }}<｜Assistant｜>{{ .Content }}<｜end▁of▁sentence｜>'
    '{{- end }}'
    '{{- end }}<｜Assistant｜>{{ if .Think }}<think>\n{{ end }}'
)


def _chatml_go(default_system: str | None) -> str:
    if default_system is None:
        head = "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
    else:
        head = "<|im_start|>system\n{{ if .System }}{{ .System }}{{ else }}" + default_system + "{{ end }}<|im_end|>\n"
    return (head + '{{ range .Messages }}{{ if ne .Role "system" }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n'
            '{{ end }}{{ end }}<|im_start|>assistant\n')


@dataclass(frozen=True)
class ChatFamily:
    name: str
    template: str | None  # Go template, or None: let Ollama use the GGUF's own chat template
    stops: tuple[str, ...]
    parameters: tuple[tuple[str, float], ...]


def chat_family(tokenizer) -> ChatFamily:
    """Which Go template matches the tokenizer's chat template (decided by what the Jinja one renders)."""
    from nanoseek.train.tokenizer import CHAT_TEMPLATE

    jinja = getattr(tokenizer, "chat_template", None) or ""
    if jinja == CHAT_TEMPLATE:
        # DeepSeek's recommended sampling for R1-style reasoning models: what `nanoseek chat` uses for ours
        r1 = FALLBACK_SAMPLING
        return ChatFamily("r1", R1_GO, ("<｜end▁of▁sentence｜>", "<｜User｜>"),
                          (("temperature", r1.temperature), ("top_p", r1.top_p)))
    if "<|im_start|>" in jinja:
        plain = tokenizer.apply_chat_template([{"role": "user", "content": "X"}], tokenize=False,
                                              add_generation_prompt=True)
        default = None
        prefix = "<|im_start|>system\n"
        if plain.startswith(prefix) and "<|im_end|>\n" in plain:
            default = plain[len(prefix):plain.index("<|im_end|>\n")]
        return ChatFamily("chatml", _chatml_go(default), ("<|im_end|>", "<|im_start|>"),
                          (("temperature", 0.7), ("top_p", 0.9)))
    return ChatFamily("unknown", None, tuple(t for t in (getattr(tokenizer, "eos_token", None),) if t), ())


def modelfile_text(gguf_name: str, tokenizer, context: int | None = None) -> str:
    fam = chat_family(tokenizer)
    lines = [f"# written by nanoseek (chat template family: {fam.name})", f"FROM ./{gguf_name}", ""]
    if fam.template is not None:
        # Go templates take the text verbatim between triple quotes; ours never contain three quotes
        lines += [f'TEMPLATE """{fam.template}"""', ""]
    lines += [f"PARAMETER stop {json.dumps(s, ensure_ascii=False)}" for s in fam.stops]
    lines += [f"PARAMETER {k} {v:g}" for k, v in fam.parameters]
    if context:
        lines.append(f"PARAMETER num_ctx {context}")
    return "\n".join(lines) + "\n"


def write_modelfile(gguf_path: str | os.PathLike, tokenizer, context: int | None = None) -> Path:
    """`Modelfile` beside the GGUF (written atomically), for `ollama create NAME -f Modelfile`."""
    gguf_path = Path(gguf_path)
    return write_text_atomic(gguf_path.with_name("Modelfile"), modelfile_text(gguf_path.name, tokenizer, context))
