"""Run by ``tests/test_distributed.py`` under ``accelerate launch``: a few DDP steps with the
summary-only LM head and without it, from the same seed. Each rank writes the per-step
losses, the rows its LM head projected, and the rows with a label, to ``OUT/rank-R.json``.

    accelerate launch --config_file configs/accelerate/cpu-2proc.yaml \
        tests/ddp_summary_head.py CONFIG.yaml OUT
"""

import json
import os
import sys
from pathlib import Path

import yaml

from peftune import config_from_dict
from peftune.assembly import load_base, prepare
from peftune.data import IGNORE_INDEX
from peftune.train import build_trainer, wrap


def train(settings: dict, *, summary_loss: bool, out: Path) -> dict:
    settings["train"]["summary_loss"] = summary_loss
    cfg = config_from_dict(settings)
    data = prepare(cfg)
    base = load_base(cfg, data.tokenizer)
    model = wrap(base, cfg)
    head_rows, label_rows, all_rows = [], [], []
    base.lm_head.register_forward_hook(
        lambda module, args, output: head_rows.append(args[0].shape[:-1].numel()))

    def count_labels(module, args, kwargs):
        labels = kwargs["labels"]
        label_rows.append(int((labels[:, 1:] != IGNORE_INDEX).sum()))
        all_rows.append(labels.numel())

    base.register_forward_pre_hook(count_labels, with_kwargs=True)
    trainer = build_trainer(cfg, model, data, output_dir=out / f"ckpt-{summary_loss}")
    trainer.train()
    return {"wrapped_in": type(trainer.model_wrapped).__name__,
            "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
            "head_rows": head_rows, "label_rows": label_rows, "all_rows": all_rows}


def main() -> None:
    config, out = Path(sys.argv[1]), Path(sys.argv[2])
    settings = yaml.safe_load(config.read_text())
    result = {mode: train(json.loads(json.dumps(settings)), summary_loss=mode == "summary",
                          out=out) for mode in ("summary", "full")}
    (out / f"rank-{os.environ['RANK']}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
