"""The parity check every export runs: greedy texts of N validation documents through the
exported artifact's own loader against peftune's own texts for the same prompts.

Loaders: plain peft on the base for ``adapter``, plain transformers for ``merged``,
llama.cpp for ``gguf``, ``ollama`` and ``gguf-lora`` where it is installed (else
transformers' GGUF reader; a ``gguf-lora`` file has no other loader). It prints one line
(identical texts, token agreement, ROUGE-L of both against the references) and puts the
numbers in the model card; ``strict`` fails the export when an fp32 export's texts differ
or ROUGE-L drops by more than ``max_rouge_drop`` points.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from peftune.errors import PeftuneError
from peftune.options import check_fields, option

MODES = ("on", "off", "strict")


@dataclass
class ParityOptions:
    SECTION: ClassVar[str] = "parity"

    mode: str = option("on: print and record the check; strict: also fail the export when "
                       "an fp32 export's texts differ or ROUGE-L drops by more than "
                       "max_rouge_drop; off: skip it", "on", choices=MODES)
    documents: int = option("validation documents to generate", 8, within="[1, 100000]")
    max_rouge_drop: float = option("strict: the largest ROUGE-L drop (points x 100) allowed",
                                   1.0, within="[0, 100]")

    def __post_init__(self) -> None:
        check_fields(self, self.SECTION)


@dataclass
class Parity:
    client: str
    documents: int
    identical: int
    token_agreement: float
    """Share of peftune's generated token positions where the export has the same token."""
    rougeL: float  # noqa: N815 (the metric's name)
    """ROUGE-L x 100 of the export's texts against peftune's."""
    rougeL_delta: float  # noqa: N815
    """ROUGE-L x 100 against the references: export minus peftune."""

    def line(self) -> str:
        return (f"parity ({self.client}, {self.documents} validation documents): "
                f"{self.identical}/{self.documents} identical texts, token agreement "
                f"{self.token_agreement:.1%}, ROUGE-L vs references {self.rougeL_delta:+.2f}")


def compare(tokenizer: Any, reference: list[str], exported: list[str], summaries: list[str],
            *, client: str) -> Parity:
    from peftune.metrics import rouge

    agree = total = 0
    for ref, got in zip(reference, exported, strict=True):
        a, b = (tokenizer(t, add_special_tokens=False)["input_ids"] for t in (ref, got))
        agree += sum(x == y for x, y in zip(a, b, strict=False))
        total += max(len(a), len(b))
    delta = rouge(exported, summaries)["rougeL"] - rouge(reference, summaries)["rougeL"]
    return Parity(client=client, documents=len(reference),
                  identical=sum(r == g for r, g in zip(reference, exported, strict=True)),
                  token_agreement=agree / total if total else 1.0,
                  rougeL=rouge(exported, reference)["rougeL"], rougeL_delta=round(delta, 4))


def check(result: Parity, options: ParityOptions, *, fp32: bool) -> None:
    """Fail a strict export (one line naming what differs)."""
    if options.mode != "strict":
        return
    if fp32 and result.identical < result.documents:
        raise PeftuneError(f"--parity strict: an fp32 export must give peftune's texts; "
                           f"{result.documents - result.identical} of {result.documents} "
                           f"differ through {result.client}")
    if result.rougeL_delta < -options.max_rouge_drop:
        raise PeftuneError(f"--parity strict: ROUGE-L drops by {-result.rougeL_delta:.2f} "
                           f"points through {result.client} (bound "
                           f"{options.max_rouge_drop:g}: --parity-max-rouge-drop)")


def texts_of(tokenizer: Any, ids: list[list[int]]) -> list[str]:
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids]


@dataclass
class Reference:
    """peftune's own greedy texts of the first validation documents."""
    tokenizer: Any
    prompts: list[list[int]]
    summaries: list[str]
    texts: list[str]


def reference(cfg: Any, adapter: Path, options: ParityOptions) -> Reference:
    """The adapter (run config ``cfg``) through peftune's path, the one ``summarize`` and
    ``evaluate`` take."""
    from peftune import assembly, generation, models

    tokenizer = models.load_tokenizer(cfg.model)
    data = assembly.prepare(cfg, tokenizer, roles=("validation",)).splits["validation"]
    data = data.select(range(min(options.documents, len(data))))
    prompts = generation.prompts_of(data)
    model = assembly.load_trained(cfg, tokenizer, adapter)
    texts = generation.generate(model, tokenizer, prompts, cfg.eval,
                              precision=models.precision(cfg), progress=False)
    return Reference(tokenizer, prompts, list(data["summary"]), texts)


def run(cfg: Any, adapter: Path, path: Path, *, fmt: str, options: ParityOptions,
        lora: Path | None = None, ref: Reference | None = None) -> Parity | None:
    """Check the export at ``path`` (folder or GGUF file; with ``lora``, the base GGUF) of
    ``adapter`` (run config ``cfg``) against ``ref`` (computed if not given); None if the
    format's only loader, llama.cpp, is not installed. Imports stay inside: the CLI reads
    :class:`ParityOptions` without loading torch."""
    from peftune import devices, generation, llamacpp

    if lora is not None and not llamacpp.available():
        return None
    ref = ref or reference(cfg, adapter, options)
    tokenizer, prompts = ref.tokenizer, ref.prompts
    if path.is_file() and llamacpp.available():
        llm = llamacpp.load(path, lora=lora,
                            n_ctx=max(len(p) for p in prompts) + cfg.eval.max_new_tokens + 8)
        ids = llamacpp.greedy(llm, prompts, max_new_tokens=cfg.eval.max_new_tokens,
                              repetition_penalty=cfg.eval.repetition_penalty,
                              stop={tokenizer.eos_token_id, *_eos(cfg, tokenizer)})
        return compare(tokenizer, ref.texts, texts_of(tokenizer, ids), ref.summaries,
                       client="llama.cpp")
    exported, client = _transformers_model(cfg, path, fmt, tokenizer)
    texts = generation.generate(devices.place(exported), tokenizer, prompts, cfg.eval,
                              precision="fp32", progress=False)
    return compare(tokenizer, ref.texts, texts, ref.summaries, client=client)


def _eos(cfg: Any, tokenizer: Any) -> list[int]:
    from peftune import card

    eos = card.generation_config(cfg, tokenizer).eos_token_id
    return [int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None]


def _transformers_model(cfg: Any, path: Path, fmt: str, tokenizer: Any) -> tuple[Any, str]:
    from transformers import AutoModelForCausalLM

    from peftune import assembly, models

    model = models.resolve(cfg.model)
    if fmt == "adapter":
        # the checkpoint as a user loads it (not quantized; model.dtype, auto: float32)
        base = assembly.load_base(cfg, tokenizer, model=model)
        return models.load_adapter(base, path), "peft"
    if path.is_file():
        return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                    dtype="float32"), "transformers (GGUF)"
    return model.auto_class.from_pretrained(str(path), dtype="auto"), "transformers"


__all__ = ["MODES", "Parity", "ParityOptions", "Reference", "check", "compare", "reference",
           "run"]
