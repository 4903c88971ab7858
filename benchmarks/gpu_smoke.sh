#!/usr/bin/env bash
# The commands users run on CUDA, each on a small random LLaMA and checked, within about
# 6 minutes on one H100: train (LoRA bf16, QLoRA), evaluate, summarize, a search with 2
# workers, export (merged, GGUF), FSDP on 1 process, `peftune plan` predicted against measured
# peak memory, and benchmarks/gpu.py (tokens/s and MFU of a ~1B LLaMA, 10 steps). Each stage
# has its own time limit; a failed stage is recorded and the next one runs. Writes
# smoke.json, smoke.md and logs.tar.gz to $OUT (default ./gpu-smoke-out); exits non-zero if
# a stage failed.
#
#   benchmarks/gpu_smoke.sh --bundle gpu-bundle   # a bare GPU machine: `make gpu-bundle` here,
#                                                 # carry gpu-bundle/ there; no registry needed
#   benchmarks/gpu_smoke.sh                       # a machine set up with `make`
#   benchmarks/gpu_smoke.sh --cpu [--bundle DIR]  # CUDA hidden: the stages that can run on a
#                                                 # CPU, quickly; the others are "skipped"
#
# --bundle DIR installs DIR's wheels with `pip install --no-index` into WORK/site (first on
# PYTHONPATH), next to PYTHON's own torch and accelerate, and uses DIR/tokenizer. PYTHON
# (default: .venv/bin/python, else python3) is the interpreter with torch. WORK (default: a
# new temporary folder) keeps every run folder and log.
set -uo pipefail
cd "$(dirname "$0")/.."
SMOKE=$PWD/benchmarks/gpu_smoke.sh

# ---------------------------------------------------------------- the stages (one each call)
peftune() { "$PYTHON" -m peftune "$@"; }
common() {
    echo --model.name "$WORK/model" --data.source "$WORK/data" --data.max_train_examples 16 \
        --data.max_eval_examples 8 --data.max_source_tokens 256 --eval.max_new_tokens 16 \
        --train.max_steps 4 --train.batch_size 4 --train.micro_batch_size 2 \
        --train.logging_steps 1 --train.eval_each_epoch false
}
LORA=configs/aclsum-smollm2-lora.yaml

stage_install() {
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --disable-pip-version-check --target "$WORK/site" "$BUNDLE"/wheels/*.whl
}

stage_versions() {
    "$PYTHON" - "$WORK/versions.json" "${BUNDLE:+$BUNDLE/MANIFEST.json}" <<'EOF'
import importlib.metadata as md, json, sys
from pathlib import Path
import torch
from packaging.requirements import Requirement
# what the machine brings (the bundle's MANIFEST names it) may differ from our pins; the
# rest must be what pyproject.toml pins
image = json.loads(Path(sys.argv[2]).read_text())["image"] if sys.argv[2] else []

def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None

names = ("peftune", "torch", "transformers", "peft", "accelerate", "datasets", "optuna",
         "bitsandbytes", "gguf", "rouge-score", "numpy", "pyarrow")
found = {n: version(n) for n in names}
found["cuda"] = torch.version.cuda
found["peftune_from"] = str(Path(md.distribution("peftune").locate_file("peftune")))
pins = [r for r in map(Requirement, md.requires("peftune") or []) if r.marker is None]
off = {r.name: f"{version(r.name)} (pinned {r.specifier})" for r in pins
       if version(r.name) not in r.specifier}
wrong = sorted(n for n in off if n not in image)
# what pip's resolver would have said: a bundled package that the machine's packages (or
# the bundle) do not satisfy, e.g. datasets on too old a pyarrow
bundled = json.loads(Path(sys.argv[2]).read_text())["packages"] if sys.argv[2] else {}
unmet = sorted(f"{name} needs {r.name}{r.specifier}, found {version(r.name) or 'none'}"
               for name in bundled for r in map(Requirement, md.requires(name) or [])
               if (r.marker is None or r.marker.evaluate({"extra": ""}))
               and (version(r.name) is None
                    or not r.specifier.contains(version(r.name), prereleases=True)))
json.dump({"versions": found, "not_as_pinned": off, "unmet": unmet}, open(sys.argv[1], "w"))
print(json.dumps(found), "\nthe machine's own, not as pinned:",
      {n: v for n, v in off.items() if n in image})
assert not wrong, "not as pyproject.toml pins them: " + ", ".join(f"{n} {off[n]}" for n in wrong)
assert not unmet, "; ".join(unmet)
EOF
}

stage_setup() {
    "$PYTHON" - "$DEVICE" "$WORK" "$TOKENIZER" <<'EOF'
import json, random, sys
from pathlib import Path
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
device, work, tokenizer = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
if device == "cuda" and not torch.cuda.is_available():
    sys.exit("no CUDA device visible; --cpu runs the CPU stages")
if tokenizer:
    tok = AutoTokenizer.from_pretrained(tokenizer)
else:
    from peftune import models
    from peftune.config import ModelConfig
    tok = models.load_tokenizer(ModelConfig())  # the embedded SmolLM2 tokenizer
torch.manual_seed(0)
config = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512,
                     num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                     max_position_embeddings=2048, bos_token_id=tok.bos_token_id,
                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
LlamaForCausalLM(config).save_pretrained(work / "model")
tok.save_pretrained(work / "model")
words = ("model data method result parsing translation corpus summary paper study task "
         "language dialogue emotion annotation accuracy speed baseline training text").split()
rng = random.Random(0)
(work / "data").mkdir(exist_ok=True)
for split, n in (("train", 32), ("validation", 8), ("test", 8)):
    rows = []
    for i in range(n):
        # 150-400 words: rows of a few hundred tokens for gpu.py (the commands cut at 256)
        doc = " ".join(rng.choice(words) for _ in range(rng.randint(150, 400)))
        rows.append({"id": f"{split}{i}", "document": doc + " .",
                     "summary": " ".join(doc.split()[:8]) + " ."})
    (work / "data" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
print(f"{device}: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}; "
      f"torch {torch.__version__}")
EOF
}

check_adapter() {
    "$PYTHON" - "$1" <<'EOF'
import json, math, sys
from pathlib import Path
run = Path(sys.argv[1])
assert (run / "adapter" / "adapter_model.safetensors").is_file(), "no adapter"
loss = json.loads((run / "metrics.json").read_text())["train"]["train_loss"]
assert math.isfinite(loss) and loss > 0, f"train loss {loss}"
print(f"train loss {loss:.3f}")
EOF
}

stage_train_lora() {
    # shellcheck disable=SC2046
    peftune train --config $LORA $(common) --train.precision auto \
        --output_dir "$WORK/train" && check_adapter "$WORK/train"
}

stage_train_qlora() {
    # shellcheck disable=SC2046
    peftune train --config $LORA $(common) --method qlora --output_dir "$WORK/qlora" \
        && check_adapter "$WORK/qlora"
}

stage_evaluate() {
    # shellcheck disable=SC2046
    peftune evaluate --config $LORA $(common) --output_dir "$WORK/train" \
        --eval.zero_shot "$FULL" && "$PYTHON" - "$WORK/train" <<'EOF'
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
metrics = json.loads((run / "metrics.json").read_text())
assert metrics["test"]["num_examples"] == 8 and "rougeL" in metrics["test"], metrics
rows = (run / "predictions.jsonl").read_text().splitlines()
assert len(rows) == 8, f"{len(rows)} predictions"
print(f"test ROUGE-L {metrics['test']['rougeL']:.3f} (random model)")
EOF
}

stage_summarize() {
    printf '%s\n' '{"document": "We propose a method for parsing. It is fast and accurate."}' \
        '{"document": "This paper studies translation of low-resource languages."}' \
        > "$WORK/docs.jsonl"
    peftune summarize "$WORK/train" --input "$WORK/docs.jsonl" > "$WORK/summaries.txt" \
        && [ "$(wc -l < "$WORK/summaries.txt")" -eq 2 ]
}

stage_search() {
    # shellcheck disable=SC2046
    peftune search --config configs/aclsum-smollm2-search.yaml $(common) \
        --output_dir "$WORK/search" --search.n_trials 2 --search.workers 2 \
        --search.train_examples 8 --search.eval_examples 4 --search.intermediate_steps 2 \
        --search.baselines false && "$PYTHON" - "$WORK/search" <<'EOF'
import sys
from pathlib import Path
import optuna
run = Path(sys.argv[1])
study = optuna.load_study(study_name=run.name, storage=f"sqlite:///{run / 'study.db'}")
finished = [t for t in study.trials if t.state.name == "COMPLETE"]
assert len(finished) >= 2, [t.state for t in study.trials]
assert (run / "best.yaml").is_file() and (run / "final" / "adapter").is_dir()
print(f"{len(finished)} trials complete")
EOF
}

stage_export() {
    # one process for both formats (the commands `peftune export --format merged|gguf` run)
    "$PYTHON" - "$WORK" "$DEVICE" <<'EOF'
import sys
from pathlib import Path
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from peftune.commands import export_command as export
work, device = Path(sys.argv[1]), sys.argv[2]
merged = export(str(work / "train"), fmt="merged", out=str(work / "merged"))
gguf = export(str(work / "train"), fmt="gguf", out=str(work / "gguf"))
tok = AutoTokenizer.from_pretrained(merged)
model = AutoModelForCausalLM.from_pretrained(merged).to(device)
ids = tok.apply_chat_template([{"role": "user", "content": "Summarize: a test."}],
                              add_generation_prompt=True, return_tensors="pt",
                              return_dict=True).to(device)
out = model.generate(**ids, max_new_tokens=4, do_sample=False)
assert out.shape[1] > ids["input_ids"].shape[1]
files = list(gguf.rglob("*.gguf")) if gguf.is_dir() else [gguf]
assert files and all(f.stat().st_size > 0 for f in files), "no GGUF file"
print(f"merged model generates on {device}; GGUF {files[0].stat().st_size / 2**20:.1f} MiB")
EOF
}

stage_fsdp_lora() {
    # shellcheck disable=SC2046
    "$PYTHON" -m accelerate.commands.launch --config_file configs/accelerate/fsdp.yaml \
        --num_processes 1 -m peftune train --config $LORA $(common) \
        --output_dir "$WORK/fsdp" && check_adapter "$WORK/fsdp"
}

stage_plan() {
    "$PYTHON" - "$WORK" <<'EOF'
import json, sys
from pathlib import Path
from peftune import assembly, config_from_dict, plan
from peftune.measure import training_speed
work = Path(sys.argv[1])
cfg = config_from_dict({"model": {"name": str(work / "model")},
                        "data": {"source": str(work / "data"), "max_source_tokens": 256},
                        "train": {"batch_size": 8, "micro_batch_size": 8},
                        "plan": {"measure_steps": 3}})
data = assembly.prepare(cfg, roles=("train",))
p = plan.make(cfg, data=data)
speed, peak = training_speed(cfg, data)
predicted = p.memory["max"][plan.checkpointing(cfg, p)].total
result = {"weights": p.weight_format, "precision": p.precision, "micro_batch": p.micro_batch,
          "longest_tokens": p.lengths.max, "predicted_gib": predicted / 2**30,
          "measured_gib": peak / 2**30, "tokens_per_s": speed}
(work / "plan.json").write_text(json.dumps(result))
print(json.dumps(result))
EOF
}

stage_gpu_bench() {
    mkdir -p "$WORK/bench" && OUT="$WORK/bench" "$PYTHON" benchmarks/gpu.py --tokenizer "$WORK/model" \
        --data "$WORK/data" --steps 10 --warmup 2 --micro-batch 16 --max-source-tokens 512
}

if [ "${1:-}" = --stage ]; then  # one stage, run by run_stage below under its time limit
    "stage_${2//-/_}"
    exit
fi

# ---------------------------------------------------------------- options and environment
BUNDLE="" DEVICE=cuda
OUT=${OUT:-gpu-smoke-out}
while [ $# -gt 0 ]; do
    case $1 in
        --bundle) BUNDLE=$(cd "$2" && pwd); shift 2 ;;
        --cpu) DEVICE=cpu; shift ;;
        --out) OUT=$2; shift 2 ;;
        *) echo "usage: $0 [--bundle DIR] [--cpu] [--out DIR]" >&2; exit 2 ;;
    esac
done
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo "$PWD/.venv/bin/python" || echo python3)}
WORK=${WORK:-$(mktemp -d "${TMPDIR:-/tmp}/peftune-gpu-smoke.XXXXXX")}
BUDGET=${BUDGET:-360}  # seconds for all stages; a stage starts only with 20 s left
FULL=$([ "$DEVICE" = cuda ] && echo true || echo false)
mkdir -p "$OUT" "$WORK"
OUT=$(cd "$OUT" && pwd)
if [ -n "$BUNDLE" ]; then
    TOKENIZER=$BUNDLE/tokenizer
    export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
else
    TOKENIZER=""
    export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi
[ "$DEVICE" = cpu ] && export CUDA_VISIBLE_DEVICES=""
export PYTHON WORK DEVICE TOKENIZER BUNDLE FULL OUT
: > "$WORK/stages.tsv"

# name, limit in seconds, and where it runs: all (CPU and GPU), cuda (GPU only), or bundle
run_stage() {
    local name=$1 limit=$2 where=$3 left=$((BUDGET - SECONDS)) start=$SECONDS rc sampler=""
    local status note="" peak=""
    if [ "$where" = cuda ] && [ "$DEVICE" != cuda ]; then
        status=skipped note="needs CUDA"
    elif [ "$where" = bundle ] && [ -z "$BUNDLE" ]; then
        status=skipped note="no --bundle"
    elif [ "$left" -lt 20 ]; then
        status=skipped note="the ${BUDGET} s budget was spent"
    else
        [ "$limit" -gt "$left" ] && limit=$left
        if [ "$DEVICE" = cuda ] && command -v nvidia-smi > /dev/null; then
            nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 250 \
                > "$WORK/$name.mem" 2> /dev/null &
            sampler=$!
        fi
        echo "== $name (at most $limit s)" >&2
        timeout -k 10 "$limit" bash "$SMOKE" --stage "$name" > "$WORK/$name.log" 2>&1
        rc=$?
        [ -n "$sampler" ] && kill "$sampler" 2> /dev/null && wait "$sampler" 2> /dev/null
        [ -n "$sampler" ] && peak=$(sort -n "$WORK/$name.mem" | tail -1)
        case $rc in
            0) status=ok ;;
            124 | 137) status=timeout note="over $limit s" ;;
            *) status=failed note=$(grep -v '^\s*$' "$WORK/$name.log" | tail -1 | tr '\t' ' ' | cut -c1-200) ;;
        esac
        # on a GPU, every command must say its model and training were there
        if [ "$status" = ok ] && [ "$DEVICE" = cuda ] &&
            grep -Eq "(model|training) on cpu" "$WORK/$name.log"; then
            status=failed note="ran (partly) on the CPU"
        fi
    fi
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - start))" "$limit" \
        "$peak" "$note" >> "$WORK/stages.tsv"
    echo "$status $name ($((SECONDS - start)) s) $note" >&2
}

run_stage install 120 bundle
run_stage versions 60 all
run_stage setup 90 all
run_stage train-lora 90 all
run_stage train-qlora 120 cuda
run_stage evaluate 90 all
run_stage summarize 60 all
run_stage export 90 all
run_stage plan 90 cuda
run_stage gpu-bench 200 cuda
run_stage fsdp-lora 120 cuda
run_stage search 150 cuda  # last: the slowest, and the least bound to the GPU

"$PYTHON" - "$WORK" "$OUT" "$DEVICE" "$SECONDS" <<'EOF'
import json, re, sys
from pathlib import Path
work, out, device, total = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])

def read(name):
    path = work / name
    return json.loads(path.read_text()) if path.is_file() else None

stages = []
for line in (work / "stages.tsv").read_text().splitlines():
    name, status, seconds, limit, peak, note = line.split("\t")
    log = work / f"{name}.log"
    text = log.read_text(errors="replace") if log.is_file() else ""
    # what the commands say about where they ran: "model on cuda:0, weights in bfloat16",
    # "training on cuda:0 in bf16"
    model = sorted(set(re.findall(r"model on (\S+), weights in (\w+)", text)))
    train = sorted(set(re.findall(r"training on (\S+) in (\w+)", text)))
    weights = sorted(set(re.findall(r"base weights in (\w+)", text)))
    stages.append({"stage": name, "status": status, "seconds": int(seconds),
                   "limit_s": int(limit), "peak_gpu_mib": int(peak) if peak else None,
                   "model": [f"{d} {t}" for d, t in model],
                   "training": [f"{d} {p}" for d, p in train],
                   "training_weights": weights, "note": note})
bench = read("bench/gpu.json")
summary = {"device": device, "total_s": total, "versions": read("versions.json"),
           "stages": stages, "plan": read("plan.json"), "gpu_bench": bench, "work": str(work)}
(out / "smoke.json").write_text(json.dumps(summary, indent=1))
md = [f"# GPU smoke: {device}, {total} s", "",
      f"versions: {json.dumps((summary['versions'] or {}).get('versions'))}", "",
      "| stage | status | s | peak GPU MiB (nvidia-smi) | model on | training on "
      "| base weights in training | note |", "|---|---|---|---|---|---|---|---|"]
md += [f"| {s['stage']} | {s['status']} | {s['seconds']} | {s['peak_gpu_mib'] or ''} | "
       f"{', '.join(s['model'])} | {', '.join(s['training'])} | "
       f"{', '.join(s['training_weights'])} | {s['note']} |" for s in stages]
if summary["plan"]:
    p = summary["plan"]
    md.append(f"\npeftune plan: predicted {p['predicted_gib']:.2f} GiB, measured peak "
              f"{p['measured_gib']:.2f} GiB (weights {p['weights']}, {p['precision']}, "
              f"micro-batch {p['micro_batch']} x {p['longest_tokens']} tokens)")
if bench:
    md += ["", f"benchmarks/gpu.py on {bench['device']}:", "",
           "| run | tokens/s | MFU % | peak GPU GiB |", "|---|---|---|---|"]
    md += [f"| {k} | {r['tokens_per_s']:.0f} | {r['mfu_pct']:.1f} | {r['peak_gpu_gib']:.1f} |"
           for k, r in bench["results"].items()]
(out / "smoke.md").write_text("\n".join(md) + "\n")
print("\n".join(md))
EOF
(cd "$WORK" && tar -czf "$OUT/logs.tar.gz" ./*.log stages.tsv)  # every stage's output
! awk -F'\t' '$2 == "failed" || $2 == "timeout" {bad = 1} END {exit !bad}' \
    "$WORK/stages.tsv"
