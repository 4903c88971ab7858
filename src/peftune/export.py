"""Export a trained adapter for serving: as is, merged into its base, or as a GGUF file.

Run it with ``peftune export runs/x --format merged --out exports/x``:

- ``adapter``: the PEFT adapter as is, pointing at its base; ``peft.PeftModel.from_pretrained``
  onto that base loads it (the printed line).
- ``merged``: the adapter folded into the base weights (safetensors, tokenizer and the run's
  generation config); plain ``AutoModelForCausalLM.from_pretrained(out)`` loads it. A
  quantized base is merged into a 16-bit copy, never into its quantized weights; a ``qlora``
  or ``lora-int8`` adapter into the base it trained on, dequantized, or the full-precision
  one (``merge_base``, :mod:`peftune.merging`).
- ``gguf``: the merged model as one LLaMA-architecture GGUF file (f32, f16, bf16 or q8_0),
  with its tokenizer, for llama.cpp and for ``from_pretrained(out, gguf_file=...)``.
- ``gguf-lora``: the LoRA alone as a llama.cpp GGUF adapter (:mod:`peftune.gguf_lora`) beside
  a GGUF base, and an Ollama Modelfile with FROM base and ADAPTER.
- ``ollama``: the ``gguf`` file and a Modelfile (:mod:`peftune.ollama`).

The adapter's card says how vLLM serves it, or why it cannot (:mod:`peftune.vllm`). With
``parity`` (the CLI's default), the export is then checked against peftune's own texts
(:mod:`peftune.parity`).

Every format gets the run's decoding settings (``generation_config.json``; for GGUF also
llama.cpp's ``general.sampling.*`` keys) and a filled model card (``README.md``) whose
Python lines load it without peftune (:mod:`peftune.card`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from peft import PeftConfig
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from peftune import assembly, card, devices, gguf_lora, llamacpp, merging, models, ollama, parity
from peftune.config import Config, config_from_dict
from peftune.errors import ModelError, PeftuneError
from peftune.merging import MergeOptions
from peftune.methods import get_method
from peftune.parity import ParityOptions
from peftune.rundir import ADAPTER_SETTINGS, folder_settings

log = logging.getLogger(__name__)

FORMATS = ("adapter", "merged", "gguf", "gguf-lora", "ollama")
MERGED_DTYPES = ("auto", *devices.DTYPES)
GGUF_DTYPES = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}
LORA_DTYPES = ("f32", "f16", "bf16")


@dataclass
class Exported:
    path: Path
    """The exported folder (adapter, merged) or file (gguf)."""
    load: str
    """One line of Python that loads it."""
    lora_base: Path | None = None
    """gguf-lora: the base GGUF the adapter file (``path``) applies to."""
    parity: str | None = None
    """The parity check's line, when one ran."""
    merge_base: str | None = None
    """merged, gguf, ollama of a qlora or lora-int8 adapter: ``dequantized`` or ``original``."""


def run_config(adapter: Path, *, trust_remote_code: bool = False) -> Config:
    """The adapter's run settings; remote code only if this command allows it."""
    meta = adapter / ADAPTER_SETTINGS
    if not meta.is_file():
        raise ModelError(f"{adapter} has no {ADAPTER_SETTINGS}: export needs an adapter saved by "
                         "`peftune train`")
    models.check_adapter_dir(adapter)
    settings = folder_settings(meta)
    settings.setdefault("model", {})["trust_remote_code"] = trust_remote_code
    return config_from_dict(settings)


# ---------------------------------------------------------------- adapter

def export_adapter(adapter: Path, out: Path, *, trust_remote_code: bool = False) -> Exported:
    """Copy the adapter, with ``base_model_name_or_path`` set to the base's Hub id or
    absolute folder (transformers follows it to load base + adapter in one call), its
    generation settings and model card."""
    cfg = run_config(adapter, trust_remote_code=trust_remote_code)
    # training_args.bin is the Trainer's pickled arguments: nothing a server needs
    shutil.copytree(adapter, out, ignore=shutil.ignore_patterns("training_args.bin"),
                    dirs_exist_ok=True)
    card.name_base(out, cfg)
    tokenizer = models.load_tokenizer(cfg.model)
    tokenizer.save_pretrained(str(out))  # the card's lines load it from here
    card.write(out, cfg, tokenizer, kind="adapter", facts=card.read_facts(adapter))
    # transformers' own adapter loading (from_pretrained(out)) needs a newer peft than the
    # pinned one: name the base explicitly
    base_name = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    auto = models.resolve(cfg.model).auto_class.__name__
    return Exported(out, f'PeftModel.from_pretrained({auto}.from_pretrained("{base_name}"), '
                         f'"{out}")')


# ---------------------------------------------------------------- merged

def merged_dtype(cfg: Config, dtype: str) -> str:
    """``auto``: the precision the run was evaluated in (its ``train.precision`` resolved on
    this machine), so the merged model generates what ``evaluate`` scored; bfloat16 at least
    for a quantized base (a 16-bit copy to merge into)."""
    if dtype != "auto":
        return dtype
    chosen = devices.PRECISION_DTYPES[models.precision(cfg)]
    quantized = models.resolve(cfg.model).stored_quantized
    return "bfloat16" if chosen == "float32" and quantized else chosen


def merge_base(cfg: Config, options: MergeOptions) -> str | None:
    """``dequantized`` or ``original`` for a method that trained on a quantized base, else
    None (:func:`peftune.merging.resolve`)."""
    method = get_method(cfg.method)
    quantizes = "quantization_config" in method.load_kwargs(cfg.method_options)
    return merging.resolve(options, method=cfg.method, quantizes=quantizes)


def load_merge_base(cfg: Config, dtype: str, base_kind: str | None
                    ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The base to merge into, at ``dtype``: ``dequantized``, quantized as training loaded it
    (:func:`assembly.load_base`) and dequantized; otherwise the checkpoint loaded at ``dtype``
    (a checkpoint stored quantized is dequantized: there is no other)."""
    tokenizer = models.load_tokenizer(cfg.model)
    model = None if base_kind == "dequantized" else \
        models.resolve(cfg.model).at(getattr(torch, dtype))
    base = assembly.load_base(cfg, tokenizer, model=model)
    if getattr(base, "hf_quantizer", None) is not None:
        base = base.dequantize(dtype=getattr(torch, dtype))
    return base.to(getattr(torch, dtype)), tokenizer


def merge(adapter: Path, *, dtype: str = "auto", options: MergeOptions | None = None,
          trust_remote_code: bool = False
          ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, Config]:
    """The base at ``dtype`` (for a quantized method's adapter the one ``options`` names)
    with the adapter folded into its weights."""
    cfg = run_config(adapter, trust_remote_code=trust_remote_code)
    # refused before any model loads; Method.merge asks the same rule again
    get_method(cfg.method).check_mergeable(PeftConfig.from_pretrained(str(adapter)))
    chosen = merged_dtype(cfg, dtype)
    base_kind = merge_base(cfg, options or MergeOptions())
    base, tokenizer = load_merge_base(cfg, chosen, base_kind)
    model = models.load_adapter(base, adapter)
    try:
        merged = get_method(cfg.method).merge(model)  # the merge train and the tests use
    except (ValueError, NotImplementedError, AttributeError) as err:
        raise PeftuneError(f"cannot merge {adapter}: {err}; use --format adapter") from None
    log.info("merged %s into %s (%s%s)", adapter, cfg.model.name, chosen,
             f", {base_kind} base" if base_kind else "")
    return merged, tokenizer, cfg


def merge_facts(adapter: Path, base_kind: str | None) -> dict[str, Any]:
    """The card's facts of a merged export: the adapter's, and the merge base if chosen."""
    facts = card.read_facts(adapter)
    return {**facts, "merge_base": base_kind} if base_kind else facts


def export_merged(adapter: Path, out: Path, *, dtype: str = "auto",
                  options: MergeOptions | None = None,
                  trust_remote_code: bool = False) -> Exported:
    model, tokenizer, cfg = merge(adapter, dtype=dtype, options=options,
                                  trust_remote_code=trust_remote_code)
    model.generation_config = card.generation_config(cfg, tokenizer)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    base_kind = merge_base(cfg, options or MergeOptions())
    card.write(out, cfg, tokenizer, kind="merged", facts=merge_facts(adapter, base_kind),
               weights=str(model.dtype).removeprefix("torch."))
    auto = models.auto_class(model.config).__name__
    return Exported(out, f'{auto}.from_pretrained("{out}")', merge_base=base_kind)


# ---------------------------------------------------------------- gguf

def export_gguf(adapter: Path, out: Path, *, dtype: str = "f16", kind: str = "gguf",
                options: MergeOptions | None = None, trust_remote_code: bool = False
                ) -> Exported:
    """Merge in float32, then write ``out/<run>-<dtype>.gguf`` with ``gguf.GGUFWriter``;
    ``kind="ollama"`` adds a Modelfile."""
    model, tokenizer, cfg = merge(adapter, dtype="float32", options=options,
                                  trust_remote_code=trust_remote_code)
    out.mkdir(parents=True, exist_ok=True)
    path = write_gguf(model, tokenizer, cfg, out / f"{Path(cfg.output_dir).name}-{dtype}.gguf",
                      dtype=dtype)
    base_kind = merge_base(cfg, options or MergeOptions())
    card.write(out, cfg, tokenizer, kind=kind, facts=merge_facts(adapter, base_kind),
               gguf_file=path.name, weights=dtype)
    if kind == "ollama":
        ollama.write(out, cfg, tokenizer, model=path.name, settings=_settings(cfg, tokenizer))
    return Exported(path, f'AutoModelForCausalLM.from_pretrained("{out}", '
                          f'gguf_file="{path.name}")', merge_base=base_kind)


def write_gguf(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, cfg: Config,
               path: Path, *, dtype: str) -> Path:
    """``model`` (a LLaMA) with its tokenizer and the run's sampling keys as one GGUF file."""
    check_llama(model.config)
    pre = pre_tokenizer_name(tokenizer)
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    write_llama_metadata(writer, model.config, name=path.stem, file_type=GGUF_DTYPES[dtype][1])
    card.add_gguf_sampling(writer, cfg)
    write_tokenizer(writer, tokenizer, vocab_size=model.config.vocab_size,
                    pre=source_pre_tokenizer(cfg) or pre)
    write_llama_tensors(writer, model, qtype=GGUF_DTYPES[dtype][0])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()
    return path


# ---------------------------------------------------------------- gguf-lora

def export_gguf_lora(adapter: Path, out: Path, *, dtype: str = "f16",
                     trust_remote_code: bool = False) -> Exported:
    """The LoRA alone as ``out/<run>-lora-<dtype>.gguf`` beside a GGUF base: the base's own
    GGUF file when it is one (the embedded SmolLM2), else the base written at ``dtype``."""
    cfg = run_config(adapter, trust_remote_code=trust_remote_code)
    gguf_lora.check(adapter)
    if dtype not in LORA_DTYPES:
        raise PeftuneError(f"--dtype {dtype} does not apply to --format gguf-lora (valid: "
                           f"{', '.join(LORA_DTYPES)})")
    out.mkdir(parents=True, exist_ok=True)
    base_path = base_gguf(cfg, out, dtype=dtype)
    config = models.resolve(cfg.model).config
    check_llama(config)
    path = gguf_lora.write(adapter, out / f"{Path(cfg.output_dir).name}-lora-{dtype}.gguf",
                           config, qtype=GGUF_DTYPES[dtype][0])
    tokenizer = models.load_tokenizer(cfg.model)
    card.write(out, cfg, tokenizer, kind="gguf-lora", facts=card.read_facts(adapter),
               gguf_file=base_path.name, lora_file=path.name, weights=dtype)
    ollama.write(out, cfg, tokenizer, model=base_path.name, adapter=path.name,
                 settings=_settings(cfg, tokenizer))
    return Exported(path, f"llama-cli -m {base_path} --lora {path}", lora_base=base_path)


def _settings(cfg: Config, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    config = card.generation_config(cfg, tokenizer)
    return {key: getattr(config, key) for key in card.GENERATION_KEYS}


def base_gguf(cfg: Config, out: Path, *, dtype: str) -> Path:
    """The base as a GGUF file in ``out``: a GGUF source copied as is, else written."""
    model = models.resolve(cfg.model)
    if model.gguf_path is not None:
        target = out / model.gguf_path.name
        shutil.copyfile(model.gguf_path, target)
        return target
    tokenizer = models.load_tokenizer(cfg.model)
    base = assembly.load_base(cfg, tokenizer, model=model.at(torch.float32))
    return write_gguf(base, tokenizer, cfg, out / f"base-{dtype}.gguf", dtype=dtype)


def check_llama(config: Any) -> None:
    if config.model_type != "llama":
        raise ModelError(f"GGUF export writes the LLaMA architecture; this base is "
                         f"'{config.model_type}': export --format merged and convert it with "
                         "llama.cpp's convert_hf_to_gguf.py")
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ModelError(f"GGUF export supports plain RoPE; this base uses "
                         f"'{rope['rope_type']}' RoPE scaling: export --format merged instead")


def write_llama_metadata(writer: gguf.GGUFWriter, config: Any, *, name: str,
                         file_type: int) -> None:
    """The ``llama.*`` keys that llama.cpp and transformers' GGUF loader read."""
    head_dim = getattr(config, "head_dim", None) or \
        config.hidden_size // config.num_attention_heads
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_name(name)
    writer.add_file_type(int(file_type))
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta",
                                                                     10000.0))))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)


def permute_qk(weights: np.ndarray, n_head: int) -> np.ndarray:
    """HF stores Q/K rows as two rotary halves per head; GGUF (llama.cpp) interleaves them.
    The inverse of transformers' ``LlamaTensorProcessor._reverse_permute_weights``."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def write_llama_tensors(writer: gguf.GGUFWriter, model: PreTrainedModel, *,
                        qtype: gguf.GGMLQuantizationType) -> None:
    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # a GGUF without output.weight ties it to token_embd
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ModelError(f"GGUF export: no LLaMA GGUF name for tensor '{hf_name}'")
        data = tensor.detach().float().cpu().numpy()
        if ".attn_q." in name:
            data = permute_qk(data, config.num_attention_heads)
        elif ".attn_k." in name:
            data = permute_qk(data, config.num_key_value_heads)
        # llama.cpp keeps norms and other 1-D tensors in f32 whatever the file type
        kind = gguf.GGMLQuantizationType.F32 if data.ndim == 1 else qtype
        if kind == gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % 32:
            kind = gguf.GGMLQuantizationType.F16  # Q8_0 blocks are 32 wide (as llama.cpp does)
        writer.add_tensor(name, gguf.quants.quantize(data, kind), raw_dtype=kind)


def source_pre_tokenizer(cfg: Config) -> str | None:
    """A GGUF base names its pre-tokenizer for llama.cpp; keep that name."""
    path = models.resolve(cfg.model).gguf_path
    if path is None:
        return None
    field = gguf.GGUFReader(str(path)).get_field("tokenizer.ggml.pre")
    return field.contents() if field is not None else None


def pre_tokenizer_name(tokenizer: PreTrainedTokenizerBase) -> str:
    """The llama.cpp pre-tokenizer name of a GPT-2 style byte-level BPE tokenizer; other
    tokenizers (WordLevel, SentencePiece) are refused with the reason."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model, pre = spec["model"], spec.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or pre.get("type") != "ByteLevel" or \
            not pre.get("use_regex", True):
        kind = pre.get("type") if model.get("type") == "BPE" else model.get("type")
        raise ModelError(f"GGUF export needs a GPT-2 style byte-level BPE tokenizer (as "
                         f"SmolLM2 and LLaMA-3 have); this one is {kind}: export --format "
                         "merged and convert it with llama.cpp's convert_hf_to_gguf.py")
    return "gpt-2"


def write_tokenizer(writer: gguf.GGUFWriter, tokenizer: PreTrainedTokenizerBase, *,
                    vocab_size: int, pre: str) -> None:
    """``tokenizer.ggml.*`` keys: vocabulary, merges, token types and special ids."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    by_id = {i: tok for tok, i in tokenizer.get_vocab().items()}
    if len(by_id) > vocab_size or set(by_id) != set(range(len(by_id))):
        raise ModelError(f"GGUF export: the tokenizer's {len(by_id)} ids do not fit the "
                         f"model's {vocab_size} embeddings")
    special = set(tokenizer.all_special_ids)
    added = {i for i, tok in tokenizer.added_tokens_decoder.items() if not tok.special}
    tokens, types = [], []
    for i in range(vocab_size):  # ids past the tokenizer pad the embedding matrix
        tokens.append(by_id.get(i, f"[PAD{i}]"))
        types.append(gguf.TokenType.UNUSED if i not in by_id else gguf.TokenType.CONTROL
                     if i in special else gguf.TokenType.USER_DEFINED if i in added
                     else gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for key, token_id in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                          ("unk", tokenizer.unk_token_id), ("pad", tokenizer.pad_token_id)):
        if token_id is not None:
            getattr(writer, f"add_{key}_token_id")(token_id)
    probe = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(bool(probe) and probe[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(bool(probe) and probe[-1] == tokenizer.eos_token_id)
    if isinstance(tokenizer.chat_template, str):
        writer.add_chat_template(tokenizer.chat_template)


def export(adapter: Path, out: Path, *, fmt: str, dtype: str | None = None,
           trust_remote_code: bool = False, parity: ParityOptions | None = None,
           merge_options: MergeOptions | None = None) -> Exported:
    """Write ``fmt`` (``merge_options``: the merge base of merged, gguf and ollama); then, unless
    ``parity`` is None or off, the parity check: its line printed, its numbers in the card
    (``strict`` raises after writing)."""
    trust = {"trust_remote_code": trust_remote_code}
    if merge_options is not None and merge_options.base != "auto" and \
            fmt in ("adapter", "gguf-lora"):
        raise PeftuneError(f"--merge-base does not apply to --format {fmt}, which merges "
                           "nothing (valid with: merged, gguf, ollama)")
    if fmt == "adapter":
        done = export_adapter(adapter, out, **trust)
    elif fmt == "merged":
        done = export_merged(adapter, out, dtype=dtype or "auto", options=merge_options,
                             **trust)
    elif fmt == "gguf-lora":
        done = export_gguf_lora(adapter, out, dtype=dtype or "f16", **trust)
    else:
        done = export_gguf(adapter, out, dtype=dtype or "f16", kind=fmt,
                           options=merge_options, **trust)
    if parity is not None and parity.mode != "off":
        # merged into the original base, the weights are not the ones the adapter ran on
        exact = is_fp32(run_config(adapter), fmt=fmt, dtype=dtype) and \
            done.merge_base != "original"
        done.parity = check_parity(adapter, done, fmt=fmt, options=parity, fp32=exact)
    return done


def is_fp32(cfg: Config, *, fmt: str, dtype: str | None) -> bool:
    """Whether the run generated in fp32 and the export computes in fp32 too: then its
    greedy texts are peftune's, token for token."""
    if models.precision(cfg) != "fp32":
        return False
    if fmt == "adapter":
        return True
    if fmt == "merged":
        return merged_dtype(cfg, dtype or "auto") == "float32"
    return dtype == "f32" and not (fmt == "gguf-lora"
                                   and models.resolve(cfg.model).stored_quantized)


def check_parity(adapter: Path, done: Exported, *, fmt: str, options: ParityOptions,
                 fp32: bool) -> str:
    """Run the check, record it in the card, and return its line (``strict`` raises)."""
    folder = done.path if done.path.is_dir() else done.path.parent
    cfg = run_config(adapter)
    if done.lora_base is not None:
        result = parity.run(cfg, adapter, done.lora_base, fmt=fmt, options=options,
                            lora=done.path)
    else:
        result = parity.run(cfg, adapter, done.path, fmt=fmt, options=options)
    if result is None:
        return (f"parity: skipped ({llamacpp.PACKAGE} is not installed; it is the only loader "
                f"of --format {fmt})")
    card.add_parity(folder, dataclasses.asdict(result))
    parity.check(result, options, fp32=fp32)
    return result.line()


__all__ = ["FORMATS", "GGUF_DTYPES", "LORA_DTYPES", "MERGED_DTYPES", "Exported", "MergeOptions",
           "export", "export_adapter", "export_gguf", "export_gguf_lora", "export_merged",
           "merge", "merge_base"]
