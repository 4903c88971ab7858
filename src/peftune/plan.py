"""Will a run fit, and how long will it take: ``peftune plan --config FILE``.

Loads no weights: the model's ``config.json``, the tokenizer and (unless ``plan.use_data``
is off) the tokenized training data. Parameters are counted on an empty (meta-device) model
wrapped as training wraps it (:func:`peftune.assembly.wrap`), so the trainable count is peft's
own, and the weights' format is the one loading resolves (:func:`peftune.assembly.resolve_base`).

Memory of one device (data parallel: every device holds all of it for its micro-batch):

- weights: parameters x bytes of ``model.dtype``. A k-bit base: its decoder's linear layers
  at 0.5 B (NF4) + absmax (fp32 per 64 weights; double quantization: 8-bit per 64 and fp32
  per 256 x 64) or 1 B (LLM.int8) + an fp32 scale per row; what stays unquantized
  (embeddings, norms, LM head) in fp32, as ``prepare_model_for_kbit_training`` leaves it.
- autocast copies: fp32 linear weights trained under bf16/fp16 autocast; each forward keeps
  a 2-byte copy of every one for the backward pass.
- adapter: trainable parameters x 16 B (fp32 weight, fp32 gradient, AdamW's two fp32
  moments; peft keeps adapter weights in fp32, so there is no separate master copy).
- activations, per decoder layer and token, with ``h`` the hidden and ``i`` the
  intermediate size (LLaMA-style decoder, LoRA on q,v, SDPA attention that keeps no
  seq x seq matrix)::

      bf16/fp16 autocast:  20 h +  6 i +  568 bytes   (fp32 or 16-bit weights alike)
      fp32:                28 h + 12 i + 1112 bytes

  i.e. about 10 h + 3 i values of 2 bytes, or 7 h + 3 i values of 4 bytes. The constants
  were measured on a CPU by summing the distinct storages that autograd saves
  (``torch.autograd.graph.saved_tensors_hooks``), differencing 2- and 3-layer models and
  64- and 192-token sequences so that weights and per-sequence tensors cancel
  (``python benchmarks/plan_check.py --calibrate`` repeats it). With gradient checkpointing
  a layer keeps only its input (``h`` x the residual stream's bytes) and the layer being
  recomputed holds its full activations once.
- backward: while the backward pass frees saved activations it holds their gradients, and
  the allocator keeps some freed memory: half the activations (``BACKWARD_SHARE``, fitted to
  peak memory measured on a CPU, ``benchmarks/plan_check.py``).
- logits: peftune computes the LM head only at summary positions (``train.summary_loss``,
  LLaMA-family decoders); elsewhere at every position. Summary tokens x vocabulary x 4 B,
  three times: the fp32 logits, the log-softmax kept for the backward pass, its gradient.
- runtime: the framework itself (CUDA context and allocator slack on a GPU; Python, torch,
  transformers and the tokenized data in a CPU process's resident memory).

The fit is judged at the longest training example (length grouping puts the longest rows
in one micro-batch, so that batch sets the peak); p50 and p90 show the typical step. With
``train.micro_batch_size: auto`` a micro-batch of rows longer than the typical one trains in
parts that stay within the token budget (:meth:`Plan.rows_at`), so one outlier document no
longer multiplies the peak by the micro-batch.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from peftune import assembly, devices, models
from peftune.config import Config, parse_memory

log = logging.getLogger(__name__)

GIB = 2**30
ACTIVATIONS = {"half": (20, 6, 568), "fp32": (28, 12, 1112)}
"""Saved bytes per token and decoder layer: (per hidden unit, per intermediate unit, fixed)."""
BACKWARD_SHARE = 0.5
"""Gradients of the activations that the backward pass holds while it frees the saved ones,
and freed memory the allocator keeps, as a share of the saved activations (measured:
benchmarks/plan_check.py)."""
LOGIT_COPIES = 3
ADAPTER_BYTES = 16
RUNTIME = {"cpu": 0.55 * GIB, "cuda": 1.0 * GIB}
TOKENS_PER_MICRO_BATCH = {"cpu": 1536, "cuda": 8192}
"""``train.micro_batch_size: auto`` puts about this many tokens (rows at the p90 length) in a
micro-batch. On a 2-core CPU, training throughput stops growing near a thousand tokens per
forward pass and falls beyond two thousand, while activation memory grows with every row
(BENCHMARKS.md, "Long documents"). A GPU needs more rows to fill its cores; its figure is a
reasoned one (no GPU was measured) and is capped by what fits the device."""
AUTO_HEADROOM = 0.9
"""``auto`` (micro-batch and gradient checkpointing) counts on this share of the device only:
the plan's GPU constants are unmeasured, and an allocator fragments."""
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Shape:
    """What the arithmetic needs from a transformers config."""

    model_type: str
    hidden: int
    intermediate: int
    layers: int
    vocab: int
    is_encoder_decoder: bool = False

    @classmethod
    def of(cls, config: Any) -> Shape:
        hidden = getattr(config, "hidden_size", None) or config.d_model
        layers = getattr(config, "num_hidden_layers", None) or (
            config.num_layers + getattr(config, "num_decoder_layers", 0))
        intermediate = getattr(config, "intermediate_size", None) or \
            getattr(config, "d_ff", None) or 4 * hidden
        return cls(model_type=config.model_type, hidden=int(hidden),
                   intermediate=int(intermediate), layers=int(layers),
                   vocab=int(config.vocab_size),
                   is_encoder_decoder=bool(config.is_encoder_decoder))


@dataclass(frozen=True)
class Params:
    total: int
    trainable: int
    linear: int
    """Base parameters in linear layers other than the LM head (what k-bit loading
    quantizes)."""
    prompt_learning: bool = False


@dataclass(frozen=True)
class Lengths:
    """Tokens per training example (prompt + summary) and per summary."""

    p50: int
    p90: int
    max: int
    summary_p50: int
    summary_p90: int
    summary_max: int
    examples: int
    mean: float
    measured: bool


@dataclass(frozen=True)
class Memory:
    weights: float
    autocast_copies: float
    adapter: float
    activations: float
    backward: float
    logits: float
    runtime: float

    @property
    def total(self) -> float:
        return sum(dataclasses.astuple(self))


@dataclass
class Plan:
    cfg: Config
    shape: Shape
    params: Params
    lengths: Lengths
    weight_format: str
    precision: str
    device_kind: str
    device_memory: int
    micro_batch: int
    token_budget: int | None = None
    """With ``train.micro_batch_size: auto``, the padded tokens one forward pass may hold: a
    micro-batch whose rows exceed it trains in parts (:meth:`rows_at`)."""
    memory: dict[str, dict[bool, Memory]] = field(default_factory=dict)
    """By length percentile (``p50``, ``p90``, ``max``), then by gradient checkpointing."""

    def rows_at(self, tokens: int) -> int:
        """Rows of ``tokens`` tokens that one forward pass holds: the micro-batch, or under
        the token budget as many as fit it (at least one). The micro-batch follows the
        typical (p90) row; a step whose longest row is longer trains in smaller parts, on the
        same examples (``train.PeftuneTrainer.training_step``)."""
        if self.token_budget is None:
            return self.micro_batch
        return max(1, min(self.micro_batch, self.token_budget // max(tokens, 1)))

    def fits(self, checkpointing: bool, share: float = 1.0) -> bool:
        return self.memory["max"][checkpointing].total <= self.device_memory * share

    def largest_micro_batch(self, checkpointing: bool, share: float = 1.0) -> int:
        """The most rows of the longest length that fit ``share`` of the device."""
        one = estimate(self, micro_batch=1, tokens=self.lengths.max,
                       summary=self.lengths.summary_max, checkpointing=checkpointing)
        fixed = one.weights + one.autocast_copies + one.adapter + one.runtime
        per_example = one.activations + one.backward + one.logits
        return max(0, int((self.device_memory * share - fixed) // per_example))

    def auto_micro_batch(self) -> int:
        """The micro-batch ``train.micro_batch_size: auto`` trains with: the largest divisor
        of the batch whose rows at the p90 length stay within the device's token budget
        (:data:`TOKENS_PER_MICRO_BATCH`) and whose longest rows fit the device without
        gradient checkpointing; at least 1. The optimizer sees the same batches whatever
        the choice (:class:`peftune.data.LengthGroupedSampler`)."""
        batch = self.cfg.train.batch_size
        budget = TOKENS_PER_MICRO_BATCH[self.device_kind]
        fits = self.largest_micro_batch(False, AUTO_HEADROOM)
        sizes = [m for m in range(1, batch + 1) if batch % m == 0
                 and m * max(self.lengths.p90, 1) <= budget and m <= fits]
        return max(sizes, default=1)

    def needs_checkpointing(self) -> bool:
        """Whether ``train.gradient_checkpointing: auto`` turns checkpointing on."""
        return not self.fits(False, AUTO_HEADROOM)


def count_parameters(cfg: Config, model_config: Any) -> Params:
    """Base and trainable parameters of ``cfg.method`` on an empty (meta) model, wrapped as
    training wraps it (:func:`assembly.wrap`). The meta device, not accelerate's
    ``init_empty_weights``: under the latter, tied input and output embeddings stay two
    tensors and are counted twice."""
    with torch.device("meta"), torch.random.fork_rng(devices=[]):  # wrap seeds
        base = models.auto_class(model_config).from_config(model_config)
        params = _base_counts(base)
        model = assembly.wrap(base, cfg)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return replace(params, trainable=trainable,
                   prompt_learning=bool(model.active_peft_config.is_prompt_learning))


def _base_counts(model: torch.nn.Module) -> Params:
    head = model.get_output_embeddings()
    linear = sum(m.weight.numel() for m in model.modules()
                 if isinstance(m, torch.nn.Linear) and m is not head)
    total = sum(p.numel() for p in model.parameters())
    return Params(total=total, trainable=0, linear=linear)


def measure_lengths(ds: Any) -> Lengths:
    """Token-length percentiles of a tokenized split (prompt + summary, and summary), read
    from Arrow a batch at a time (no Python lists of a whole corpus's token ids)."""
    import numpy as np
    import pyarrow.compute as pc

    totals, summaries = [], []
    for batch in ds.select_columns(["input_ids", "prompt_len"]).with_format("arrow").iter(
            batch_size=10_000):
        n = pc.list_value_length(batch["input_ids"]).to_numpy()
        totals.append(n)
        summaries.append(n - batch["prompt_len"].to_numpy())
    total, summary = np.concatenate(totals), np.concatenate(summaries)

    def pct(values: Any, q: int) -> int:
        return int(np.percentile(values, q, method="inverted_cdf"))

    return Lengths(p50=pct(total, 50), p90=pct(total, 90), max=int(total.max()),
                   summary_p50=pct(summary, 50), summary_p90=pct(summary, 90),
                   summary_max=int(summary.max()), examples=len(total),
                   mean=float(total.mean()), measured=True)


def assumed_lengths(cfg: Config, examples: int = 0) -> Lengths:
    """Without data: every document at ``max_source_tokens``, every summary at
    ``eval.max_new_tokens`` (the template's own tokens are left out)."""
    summary = cfg.eval.max_new_tokens
    total = cfg.data.max_source_tokens + summary
    return Lengths(p50=total, p90=total, max=total, summary_p50=summary,
                   summary_p90=summary, summary_max=summary, examples=examples,
                   mean=float(total), measured=False)


def weight_bytes(params: Params, fmt: str) -> float:
    per_linear = {"nf4": 0.5 + 4 / 64, "nf4-dq": 0.5 + 1 / 64 + 4 / (64 * 256),
                  "int8": 1.0}.get(fmt)
    if per_linear is None:
        return params.total * DTYPE_BYTES[fmt]
    # the unquantized rest is fp32 after prepare_model_for_kbit_training
    return params.linear * per_linear + (params.total - params.linear) * 4


def activation_bytes(shape: Shape, *, precision: str, tokens: int, residual_bytes: int,
                     checkpointing: bool) -> float:
    """Bytes autograd keeps for ``tokens`` tokens through the decoder (formula above)."""
    a, b, c = ACTIVATIONS["fp32" if precision == "fp32" else "half"]
    per_layer = (a * shape.hidden + b * shape.intermediate + c) * tokens
    if not checkpointing:
        return shape.layers * per_layer
    return shape.layers * shape.hidden * residual_bytes * tokens + per_layer


def estimate(plan: Plan, *, micro_batch: int, tokens: int, summary: int,
             checkpointing: bool) -> Memory:
    """Peak memory of one device for micro-batches of ``micro_batch`` rows of ``tokens``
    tokens, ``summary`` of them summary tokens."""
    shape, params, fmt = plan.shape, plan.params, plan.weight_format
    quantized = fmt.startswith(("nf4", "int8"))
    half_autocast = plan.precision in ("bf16", "fp16")
    autocast = params.linear * 2 if fmt == "float32" and half_autocast else 0
    residual = 4 if quantized or fmt == "float32" else 2
    summary_only = (plan.cfg.train.summary_loss and shape.model_type in models.SUMMARY_LOSS_TYPES
                    and not params.prompt_learning)
    logit_tokens = summary if summary_only else tokens
    activations = activation_bytes(shape, precision=plan.precision,
                                   tokens=micro_batch * tokens, residual_bytes=residual,
                                   checkpointing=checkpointing)
    return Memory(
        weights=weight_bytes(params, fmt),
        autocast_copies=autocast,
        adapter=params.trainable * ADAPTER_BYTES,
        activations=activations,
        backward=BACKWARD_SHARE * activations,
        logits=micro_batch * logit_tokens * shape.vocab * 4 * LOGIT_COPIES,
        runtime=RUNTIME[plan.device_kind],
    )


def device_memory(setting: str) -> tuple[str, int]:
    """(device kind, bytes): the setting (planned as a GPU), or this machine's GPU (its part
    of it, where search workers share one: :func:`devices.gpu_share`), or its RAM."""
    kind = "cuda" if torch.cuda.is_available() or setting != "auto" else "cpu"
    if setting != "auto":
        return kind, parse_memory(setting)
    if kind == "cuda":
        total = torch.cuda.get_device_properties(devices.device()).total_memory
        return kind, total // devices.gpu_share()
    import psutil

    return kind, psutil.virtual_memory().total


def make(cfg: Config, *, data: Any = None, model_config: Any = None) -> Plan:
    """The plan of ``cfg``. ``data`` (a Prepared) supplies the token lengths; without it the
    training split is prepared here (or lengths assumed, with ``plan.use_data`` off).
    ``model_config``: a shape to plan instead of the model's own (one with no files)."""
    kind, memory = device_memory(cfg.plan.device_memory)
    # the model as training on a device of this kind loads it: one dtype rule for both
    model = assembly.resolve_base(cfg, gpu=kind == "cuda")
    model_config = model_config or model.config
    params = count_parameters(cfg, model_config)
    if data is None and cfg.plan.use_data:
        data = assembly.prepare(cfg, roles=("train",))
    lengths = measure_lengths(data.splits["train"]) if data is not None else \
        assumed_lengths(cfg)
    auto = cfg.train.micro_batch_size == "auto"
    plan = Plan(cfg=cfg, shape=Shape.of(model_config), params=params, lengths=lengths,
                weight_format=model.weight_format,
                precision=devices.resolve_precision(cfg.train.precision),
                device_kind=kind, device_memory=memory,
                micro_batch=1 if auto else cfg.train.micro_batch_size)
    if auto:
        plan.micro_batch = plan.auto_micro_batch()
        plan.token_budget = TOKENS_PER_MICRO_BATCH[kind]
    for name in ("p50", "p90", "max"):
        tokens = getattr(lengths, name)
        summary = getattr(lengths, "summary_" + name)
        plan.memory[name] = {gc: estimate(plan, micro_batch=plan.rows_at(tokens),
                                          tokens=tokens, summary=summary, checkpointing=gc)
                             for gc in (False, True)}
    return plan


def with_micro_batch(cfg: Config, plan: Plan) -> Config:
    """``cfg`` with ``train.micro_batch_size: auto`` replaced by the plan's choice."""
    if cfg.train.micro_batch_size != "auto":
        return cfg
    return replace(cfg, train=replace(cfg.train, micro_batch_size=plan.micro_batch))


def checkpointing(cfg: Config, plan: Plan | None = None, **make_kwargs: Any) -> bool:
    """Whether this run recomputes activations: ``train.gradient_checkpointing`` when set;
    for ``auto``, the method's own option if it has one (the k-bit methods), else the plan.
    """
    setting = cfg.train.gradient_checkpointing
    if setting != "auto":
        return bool(setting)
    own = getattr(cfg.method_options, "gradient_checkpointing", None)
    if own is not None:
        return bool(own)
    return (plan or make(cfg, **make_kwargs)).needs_checkpointing()


# ---------------------------------------------------------------- tokens and time

def tokens_per_epoch(lengths: Lengths, examples: int | None = None) -> float:
    return lengths.mean * (lengths.examples if examples is None else examples)


def run_tokens(cfg: Config, lengths: Lengths) -> float:
    """Training tokens of one ``peftune train`` run."""
    if cfg.train.max_steps > 0:
        return cfg.train.max_steps * cfg.train.batch_size * lengths.mean
    return tokens_per_epoch(lengths) * cfg.train.epochs


def trial_tokens(cfg: Config, lengths: Lengths) -> float:
    """Training tokens of one search trial at its most (largest epoch choice, no pruning)."""
    n = cfg.search.train_examples
    rows = min(n, lengths.examples) if n else lengths.examples
    return tokens_per_epoch(lengths, rows) * max(cfg.search.space.epochs)


def search_tokens(cfg: Config, lengths: Lengths) -> float:
    """Every trial run to the end, plus the trainings after them (:func:`trainings_after`)."""
    return cfg.search.n_trials * trial_tokens(cfg, lengths) + \
        trainings_after(cfg, lengths) * run_tokens(cfg, lengths)


def trainings_after(cfg: Config, lengths: Lengths) -> int:
    """The final model and, with ``search.baselines``, the default configuration: none of
    them where a trial on every training row kept the adapter it would train (the default is
    the first trial when it lies in the search space)."""
    search = cfg.search
    if not search.final:
        return 0
    kept = search.keep_adapters and search.final_on == "train" and \
        cfg.train.early_stopping == 0 and \
        (not search.train_examples or search.train_examples >= lengths.examples)
    default = search.baselines and not (kept and search.start_from_default)
    return int(not kept) + int(default)


# ---------------------------------------------------------------- output

def _gib(value: float) -> str:
    return f"{value / GIB:.1f}"


def _count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def render(plan: Plan, *, tokens_per_s: float | None = None,
           measured_peak: float | None = None) -> str:
    """The plan as text (what ``peftune plan`` prints)."""
    cfg, p, n = plan.cfg, plan.params, plan.lengths
    out = [f"plan for {cfg.method} on {cfg.model.name} ({plan.shape.model_type}, "
           f"{plan.shape.layers} layers, hidden {plan.shape.hidden}, vocab {plan.shape.vocab})",
           f"parameters: {_count(p.total)} total, {_count(p.trainable)} trainable "
           f"({100 * p.trainable / max(p.total, 1):.3f}%); weights {plan.weight_format}, "
           f"training precision {plan.precision}",
           f"tokens per example ({'measured on' if n.measured else 'assumed for'} "
           f"{n.examples or '?'} training rows): p50 {n.p50}, p90 {n.p90}, max {n.max} "
           f"(summary {n.summary_p50}/{n.summary_p90}/{n.summary_max})",
           f"memory per device (GiB) at micro-batch {plan.micro_batch}{_auto(cfg)}{_parts(plan)},"
           f" device {_gib(plan.device_memory)} GiB ({plan.device_kind}):",
           f"  {'':<30}{'weights':>8}{'autocast':>9}{'adapter':>8}{'activ.':>8}"
           f"{'backw.':>8}{'logits':>8}{'runtime':>8}{'total':>8}"]
    for name in ("p50", "p90", "max") if n.measured else ("max",):
        for gc in (False, True):
            m = plan.memory[name][gc]
            label = f"{name} {getattr(n, name)} tokens" + (", checkpointed" if gc else "")
            out.append(f"  {label:<30}" + "".join(
                f"{_gib(v):>{w}}" for v, w in (
                    (m.weights, 8), (m.autocast_copies, 9), (m.adapter, 8),
                    (m.activations, 8), (m.backward, 8), (m.logits, 8), (m.runtime, 8),
                    (m.total, 8))))
    for gc in (False, True):
        verdict = "fits" if plan.fits(gc) else "does NOT fit"
        out.append(f"{'with' if gc else 'without'} gradient checkpointing: micro-batch "
                   f"{plan.micro_batch} {verdict}; largest that fits: "
                   f"{plan.largest_micro_batch(gc)}")
    if not n.examples:
        return "\n".join(out)  # no data: no token counts or times
    out.append(f"tokens: {_count(tokens_per_epoch(n))} per epoch, "
               f"{_count(run_tokens(cfg, n))} per training run, "
               f"{_count(trial_tokens(cfg, n))} per search trial (at most), "
               f"{_count(search_tokens(cfg, n))} for the search")
    if tokens_per_s:
        out.append(f"measured {tokens_per_s:.0f} tokens/s: training run "
                   f"{_duration(run_tokens(cfg, n) / tokens_per_s)}, search trial "
                   f"{_duration(trial_tokens(cfg, n) / tokens_per_s)}, whole search "
                   f"{_duration(search_tokens(cfg, n) / tokens_per_s)} (training only, no "
                   "pruning)")
    if measured_peak:
        out.append(f"measured peak memory: {_gib(measured_peak)} GiB (predicted "
                   f"{_gib(plan.memory['max'][checkpointing(cfg, plan)].total)} GiB at the "
                   "longest example)")
    return "\n".join(out)


def _auto(cfg: Config) -> str:
    return " (auto)" if cfg.train.micro_batch_size == "auto" else ""


def _parts(plan: Plan) -> str:
    if plan.token_budget is None or plan.rows_at(plan.lengths.max) == plan.micro_batch:
        return ""
    return (f" ({plan.rows_at(plan.lengths.max)} at the longest row: rows longer than the "
            f"typical train in parts of at most {plan.token_budget} tokens)")


def brief(plan: Plan) -> str:
    """One line for the start of ``train`` and ``search``."""
    m = plan.memory["max"]
    return (f"plan: {_count(plan.params.trainable)} of {_count(plan.params.total)} parameters "
            f"trainable; peak ~{_gib(m[False].total)} GiB ({_gib(m[True].total)} with gradient "
            f"checkpointing) of {_gib(plan.device_memory)} GiB at micro-batch "
            f"{plan.micro_batch}{_auto(plan.cfg)}{_parts(plan)} x {plan.lengths.max} tokens; "
            "largest "
            "micro-batch that fits: "
            f"{plan.largest_micro_batch(False)} ({plan.largest_micro_batch(True)} "
            "checkpointed); `peftune plan` for details")
