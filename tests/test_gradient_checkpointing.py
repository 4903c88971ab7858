"""train.gradient_checkpointing: same loss and gradients, fewer saved activations."""

import pytest
import torch
from torch.autograd.graph import saved_tensors_hooks

from peftune import config_from_dict
from peftune.data import Collator
from peftune.train import run, use_checkpointing, wrap

from .conftest import make_llama


def _step(model, batch, on: bool):
    use_checkpointing(model, on)
    model.train()
    model.zero_grad(set_to_none=True)
    saved: dict[int, int] = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, sum(saved.values())


@pytest.mark.parametrize("method", ["lora", "prompt"])
def test_checkpointing_keeps_loss_and_gradients_and_saves_less(method):
    cfg = config_from_dict({"method": method, "lora": {"dropout": 0.0},
                            "prompt": {"prompt_tuning_init": "random"}})
    model = wrap(make_llama(64), cfg)
    ids = torch.randint(6, 64, (2, 40), generator=torch.Generator().manual_seed(0))
    batch = Collator(pad_id=1)([{"input_ids": r, "labels": r} for r in ids.tolist()])
    loss, grads, plain = _step(model, batch, on=False)
    loss_gc, grads_gc, checkpointed = _step(model, batch, on=True)
    torch.testing.assert_close(loss_gc, loss)
    assert grads.keys() == grads_gc.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads_gc[name], grads[name])
    assert checkpointed < 0.6 * plain
    _, _, again = _step(model, batch, on=False)  # and it switches off again (shared bases)
    assert again == plain


def test_train_option_reaches_the_model(tiny_cfg):
    tiny_cfg["train"].update(gradient_checkpointing=True, max_steps=1)
    layers = run(config_from_dict(tiny_cfg)).model.get_base_model().model.layers
    assert all(layer.gradient_checkpointing for layer in layers)
