#!/usr/bin/env bash
# The commands users run on CUDA, end to end on a small random LLaMA, each output checked:
# train, evaluate, summarize, search with 2 workers, export, compare (LoRA and QLoRA), and a
# DDP train when the machine has two GPUs or more. Exits non-zero at the first failure.
#
#   benchmarks/gpu_smoke.sh              # on a CUDA machine: a few minutes
#   DEVICE=cpu benchmarks/gpu_smoke.sh   # the same commands with CUDA hidden (a dry run)
#
# PYTHON (default: .venv/bin/python, else python) must have peftune and the embedded model
# installed (`make`), whose tokenizer the random model uses: nothing is downloaded.
# WORK (default: a new temporary folder) keeps every run folder and log.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}
DEVICE=${DEVICE:-cuda}
WORK=${WORK:-$(mktemp -d "${TMPDIR:-/tmp}/peftune-gpu-smoke.XXXXXX")}
mkdir -p "$WORK"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if [ "$DEVICE" = cpu ]; then export CUDA_VISIBLE_DEVICES=""; fi
peftune() { "$PYTHON" -m peftune "$@"; }
fail() { echo "FAIL: $*" >&2; exit 1; }
stage() { STAGE=$1; START=$SECONDS; echo "== $1" >&2; }
done_stage() { echo "ok   $STAGE ($((SECONDS - START)) s)"; }
# each command says where its model is ("model on cuda:0", "training on cuda:0"): on the
# device under test, and on a GPU never on the CPU
on_device() {
    grep -Eq "(model|training) on $DEVICE" "$1" || fail "$STAGE did not run on $DEVICE (see $1)"
    if [ "$DEVICE" != cpu ] && grep -Eq "(model|training) on cpu" "$1"; then
        fail "$STAGE ran partly on the CPU (see $1)"
    fi
}

"$PYTHON" - "$DEVICE" "$WORK/model" <<'EOF' || fail "setup"
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from peftune import models
from peftune.config import ModelConfig

device, folder = sys.argv[1], sys.argv[2]
if device == "cuda" and not torch.cuda.is_available():
    sys.exit("no CUDA device visible; DEVICE=cpu runs the same commands on the CPU")
tok = models.load_tokenizer(ModelConfig())  # the embedded SmolLM2 tokenizer
torch.manual_seed(0)
config = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512,
                     num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                     max_position_embeddings=2048, bos_token_id=tok.bos_token_id,
                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
LlamaForCausalLM(config).save_pretrained(folder)
tok.save_pretrained(folder)
print(f"{device}: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}; "
      f"torch {torch.__version__}; work folder {folder.rsplit('/', 1)[0]}")
EOF

COMMON=(--model.name "$WORK/model" --data.source aclsum --data.max_train_examples 16
        --data.max_eval_examples 8 --data.max_source_tokens 256 --eval.max_new_tokens 16
        --train.max_steps 4 --train.batch_size 4 --train.micro_batch_size 2
        --train.logging_steps 1 --train.eval_each_epoch false)
LORA=configs/aclsum-smollm2-lora.yaml

stage train
peftune train --config $LORA "${COMMON[@]}" --output_dir "$WORK/train" 2> "$WORK/train.log" \
    || fail "train (see $WORK/train.log)"
on_device "$WORK/train.log"
"$PYTHON" - "$WORK/train" <<'EOF' || fail "train output"
import json, math, sys
from pathlib import Path
run = Path(sys.argv[1])
assert (run / "adapter" / "adapter_model.safetensors").is_file(), "no adapter"
loss = json.loads((run / "metrics.json").read_text())["train"]["train_loss"]
assert math.isfinite(loss) and loss > 0, f"train loss {loss}"
EOF
done_stage

stage evaluate
peftune evaluate --config $LORA "${COMMON[@]}" --output_dir "$WORK/train" \
    --eval.zero_shot true 2> "$WORK/evaluate.log" || fail "evaluate (see $WORK/evaluate.log)"
on_device "$WORK/evaluate.log"
"$PYTHON" - "$WORK/train" <<'EOF' || fail "evaluate output"
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
metrics = json.loads((run / "metrics.json").read_text())
for tag in ("test", "zero_shot_test"):
    assert metrics[tag]["num_examples"] == 8 and "rougeL" in metrics[tag], metrics.get(tag)
rows = (run / "predictions.jsonl").read_text().splitlines()
assert len(rows) == 8, f"{len(rows)} predictions"
EOF
done_stage

stage summarize
printf '%s\n' '{"document": "We propose a method for parsing. It is fast and accurate."}' \
    '{"document": "This paper studies translation of low-resource languages with pivots."}' \
    '{"document": "A new corpus of dialogues is released, annotated for emotions."}' \
    > "$WORK/docs.jsonl"
peftune summarize "$WORK/train" --input "$WORK/docs.jsonl" > "$WORK/summaries.txt" \
    2> "$WORK/summarize.log" || fail "summarize (see $WORK/summarize.log)"
on_device "$WORK/summarize.log"
[ "$(wc -l < "$WORK/summaries.txt")" -eq 3 ] || fail "summarize printed $(wc -l < \
    "$WORK/summaries.txt") lines for 3 documents"
done_stage

stage "search with 2 workers"
peftune search --config configs/aclsum-smollm2-search.yaml "${COMMON[@]}" \
    --output_dir "$WORK/search" --search.n_trials 4 --search.workers 2 \
    --search.train_examples 8 --search.eval_examples 4 --search.intermediate_steps 2 \
    --search.baselines true 2> "$WORK/search.log" || fail "search (see $WORK/search.log)"
on_device "$WORK/search.log"
"$PYTHON" - "$WORK/search" <<'EOF' || fail "search output"
import sys
from pathlib import Path
import optuna
run = Path(sys.argv[1])
study = optuna.load_study(study_name=run.name, storage=f"sqlite:///{run / 'study.db'}")
finished = [t for t in study.trials if t.state.is_finished() and t.state.name != "FAIL"]
assert len(finished) >= 4, [t.state for t in study.trials]
assert (run / "best.yaml").is_file() and (run / "final" / "adapter").is_dir()
assert (run / "zero-shot" / "metrics.json").is_file(), "no zero-shot baseline"
EOF
done_stage

stage export
peftune export "$WORK/train" --format merged --out "$WORK/merged" 2> "$WORK/export.log" \
    || fail "export (see $WORK/export.log)"
"$PYTHON" - "$WORK/merged" "$DEVICE" <<'EOF' || fail "exported model"
import sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, device = sys.argv[1], sys.argv[2]
tok = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder).to(device)
ids = tok.apply_chat_template([{"role": "user", "content": "Summarize: a test."}],
                              add_generation_prompt=True, return_tensors="pt",
                              return_dict=True).to(device)
out = model.generate(**ids, max_new_tokens=4, do_sample=False)
assert out.shape[1] > ids["input_ids"].shape[1]
EOF
done_stage

stage "compare lora and qlora"
peftune compare --config $LORA "${COMMON[@]}" --output_dir "$WORK/compare" \
    --methods lora,qlora > "$WORK/compare.out" 2> "$WORK/compare.log" \
    || fail "compare (see $WORK/compare.log)"
on_device "$WORK/compare.log"
"$PYTHON" - "$WORK/compare" <<'EOF' || fail "compare output"
import csv, sys
from pathlib import Path
rows = list(csv.DictReader((Path(sys.argv[1]) / "compare.csv").open()))
assert [r["method"] for r in rows] == ["lora", "qlora"], rows
for r in rows:
    assert not r["error"] and r["rougeL"] != "", r
EOF
done_stage

GPUS=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")
if [ "$DEVICE" = cuda ] && [ "$GPUS" -ge 2 ]; then
    stage "DDP train on 2 GPUs"
    "$PYTHON" -m accelerate.commands.launch --config_file configs/accelerate/multi-gpu.yaml \
        --num_processes 2 -m peftune train --config $LORA "${COMMON[@]}" \
        --output_dir "$WORK/ddp" 2> "$WORK/ddp.log" || fail "DDP train (see $WORK/ddp.log)"
    grep -q "training on cuda:1" "$WORK/ddp.log" || fail "rank 1 did not train on cuda:1"
    [ -f "$WORK/ddp/adapter/adapter_model.safetensors" ] || fail "DDP: no adapter"
    done_stage
else
    echo "skip DDP train ($GPUS GPUs visible)"
fi
echo "all stages passed on $DEVICE; logs in $WORK"
