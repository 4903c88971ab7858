"""An Ollama ``Modelfile`` that serves an export with the run's prompt and decoding.

Ollama renders ``TEMPLATE`` with Go's ``text/template`` and tokenizes the result as
llama.cpp does (special tokens parsed, BOS per the GGUF's ``add_bos_token``). The template
is the run's own prompt with the document as ``{{ .Prompt }}``: the chat template rendered
around a placeholder (so a default system message the template adds is kept verbatim),
the instruction included, so ``ollama run NAME "document"`` sends what peftune's
``summarize`` sends. Everything outside ``{{ .Prompt }}`` is literal text; Go template
delimiters inside it are written as ``{{ "{{" }}``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from peftune import models
from peftune.config import Config
from peftune.errors import ModelError

FILE = "Modelfile"
PLACEHOLDER = "\x00document\x00"


def go_literal(text: str) -> str:
    """``text`` as literal Go template text."""
    return text.replace("{{", '{{ "{{" }}')


def template(cfg: Config, tokenizer: PreTrainedTokenizerBase) -> str:
    """The prompt peftune sends for a document, as an Ollama TEMPLATE over ``.Prompt``.
    A plain (non-chat) prompt starts with BOS; llama.cpp adds it only where the tokenizer
    does, so otherwise the template writes it."""
    fmt = models.prompt_format(cfg, tokenizer)
    before, after = fmt.text(PLACEHOLDER).split(PLACEHOLDER)
    bos = tokenizer.bos_token_id
    if not fmt.chat and bos is not None and bos != fmt.eos and \
            tokenizer("a")["input_ids"][:1] != [bos]:
        before = tokenizer.bos_token + before
    return go_literal(before) + "{{ .Prompt }}" + go_literal(after)


def parameters(settings: dict[str, Any], tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Greedy decoding with the run's penalty over the whole context, its length, and the
    end-of-sequence tokens as stops."""
    lines = ["temperature 0", "top_k 1", f"repeat_penalty {settings['repetition_penalty']:g}",
             "repeat_last_n -1", f"num_predict {settings['max_new_tokens']}"]
    eos = settings["eos_token_id"]
    for token_id in eos if isinstance(eos, list) else [eos]:
        lines.append(f"stop {json.dumps(tokenizer.convert_ids_to_tokens(int(token_id)))}")
    return [f"PARAMETER {line}" for line in lines]


def write(folder: Path, cfg: Config, tokenizer: PreTrainedTokenizerBase, *, model: str,
          settings: dict[str, Any], adapter: str | None = None) -> Path:
    """``folder/Modelfile`` with FROM ``model`` (and ADAPTER ``adapter``), both relative to
    ``folder``."""
    body = template(cfg, tokenizer)
    if '"""' in body:
        raise ModelError('the prompt template contains \'"""\', which ends a Modelfile '
                         "TEMPLATE block; export --format gguf and write the Modelfile by hand")
    lines = [f"FROM ./{model}", *([f"ADAPTER ./{adapter}"] if adapter else []),
             f'TEMPLATE """{body}"""', *parameters(settings, tokenizer)]
    path = folder / FILE
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


__all__ = ["FILE", "go_literal", "parameters", "template", "write"]
