"""The device and precision each command and worker uses, on the hardware a test pretends to
have: torch's CUDA queries are replaced, so these run on a CPU-only machine."""

import pytest
import torch
from transformers import LlamaConfig

from peftune import config_from_dict, devices
from peftune.search import spawn_workers


def gpus(monkeypatch, count, capability=(9, 0)):
    """Pretend this process sees ``count`` GPUs of one compute capability (0: none)."""
    import peftune.methods.qlora  # noqa: F401  (bitsandbytes probes CUDA when imported)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    for key in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(key, raising=False)


def test_device_on_a_cpu_one_gpu_several_gpus_and_under_a_launcher(monkeypatch):
    gpus(monkeypatch, 0)
    assert devices.device() == torch.device("cpu")
    assert devices.worker_env(1, 2) == {}
    assert devices.quantized_load_kwargs() == {}

    gpus(monkeypatch, 1)
    assert devices.device() == torch.device("cuda", 0)
    assert devices.quantized_load_kwargs() == {"device_map": {"": 0}}

    gpus(monkeypatch, 4)  # one process: the first GPU, not all four
    assert devices.device() == torch.device("cuda", 0)

    monkeypatch.setenv("LOCAL_RANK", "3")  # accelerate launch / torchrun, rank 3 of 8
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert devices.device() == torch.device("cuda", 3)
    # a k-bit base is quantized onto this rank's GPU, not GPU 0 of every rank
    assert devices.quantized_load_kwargs() == {"device_map": {"": 3}}


def test_one_process_with_several_gpus_trains_on_one_not_in_data_parallel(monkeypatch, caplog,
                                                                         tmp_path):
    from peftune.train import training_args

    cfg = config_from_dict({"train": {"precision": "fp32", "micro_batch_size": 4}})
    gpus(monkeypatch, 4)
    with caplog.at_level("WARNING", logger="peftune"):
        args = training_args(cfg, output_dir=tmp_path, has_eval=False)
    # n_gpu > 1 is what makes the Trainer wrap the model in nn.DataParallel
    assert args.n_gpu == 1 and args.device == torch.device("cuda", 0)
    assert "accelerate launch --num_processes 4" in caplog.text

    gpus(monkeypatch, 1)
    args = training_args(cfg, output_dir=tmp_path, has_eval=False)
    assert args.n_gpu == 1 and args.device == torch.device("cuda", 0)


def test_search_workers_get_a_gpu_each_round_robin(monkeypatch):
    gpus(monkeypatch, 2)
    share = devices.GPU_SHARE_ENV  # workers 0 and 2 share GPU 0
    assert [devices.worker_env(i, 3) for i in range(3)] == [
        {"CUDA_VISIBLE_DEVICES": "0", share: "2"}, {"CUDA_VISIBLE_DEVICES": "1", share: "1"},
        {"CUDA_VISIBLE_DEVICES": "0", share: "2"}]
    # ids are taken from what this process sees, so a restricted parent stays restricted
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")
    assert [devices.worker_env(i, 2)["CUDA_VISIBLE_DEVICES"] for i in range(2)] == ["5", "7"]


def test_spawned_search_workers_each_see_their_own_gpu(monkeypatch):
    import subprocess

    gpus(monkeypatch, 2)
    started = []

    class Recorded:
        """A worker that exits at once, having noted the GPU it was given."""

        returncode, pid = 0, 0

        def __init__(self, cmd, **kwargs):
            started.append(kwargs["env"].get("CUDA_VISIBLE_DEVICES"))

        def wait(self, timeout=None):
            return 0

        def poll(self):
            return 0

    monkeypatch.setattr(subprocess, "Popen", Recorded)
    assert spawn_workers(["search"], 2) == [0, 0]
    assert started == ["0", "1"]


@pytest.mark.parametrize("capability, bf16, precision, dtype", [
    ((9, 0), True, "bf16", torch.bfloat16),   # H100
    ((8, 0), True, "bf16", torch.bfloat16),   # A100
    ((7, 5), False, "fp16", torch.float16),   # T4: bf16 only emulated
    ((7, 0), False, "fp16", torch.float16),   # V100
])
def test_gpu_precision_follows_the_compute_capability(monkeypatch, capability, bf16,
                                                      precision, dtype):
    gpus(monkeypatch, 1, capability)
    assert devices.bf16_supported() is bf16
    assert devices.resolve_precision("auto") == precision
    assert devices.compute_dtype() == dtype
    assert devices.weights_dtype("auto", "auto") == dtype
    # an explicit fp32 run keeps fp32 weights (LoRA layers cannot mix fp32 inputs and 16-bit
    # weights without autocast); an explicit model.dtype is taken as it is
    assert devices.weights_dtype("auto", "fp32") == torch.float32
    assert devices.weights_dtype("float16", "bf16") == torch.float16


@pytest.mark.parametrize("cpu_bf16", [True, False])
def test_cpu_keeps_fp32_weights_and_computes_in_bf16_where_it_has_it(monkeypatch, cpu_bf16):
    gpus(monkeypatch, 0)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: cpu_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert devices.bf16_supported() is cpu_bf16
    assert devices.resolve_precision("auto") == ("bf16" if cpu_bf16 else "fp32")
    assert devices.weights_dtype("auto", "auto") == torch.float32
    assert devices.weights_dtype("auto", "bf16") == torch.float32


def gpu_memory(monkeypatch, total):
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: type("Props", (), {"total_memory": total})())


def test_workers_sharing_a_gpu_each_plan_for_their_part_of_it(monkeypatch):
    from peftune import plan

    gpus(monkeypatch, 1)
    gpu_memory(monkeypatch, 80 * 2**30)
    assert plan.device_memory("auto") == ("cuda", 80 * 2**30)  # alone on it
    for key, value in devices.worker_env(1, 2).items():  # 2 workers, 1 GPU
        monkeypatch.setenv(key, value)
    assert devices.gpu_share() == 2
    assert plan.device_memory("auto") == ("cuda", 40 * 2**30)
    assert plan.device_memory("24GiB") == ("cuda", 24 * 2**30)  # a stated size is not split


@pytest.mark.parametrize("capability, sharding, fmt", [
    ((9, 0), None, "bfloat16"), ((7, 0), None, "float16"), ((9, 0), "fsdp", "float32"),
    (None, None, "float32")])
def test_plan_loads_model_dtype_auto_as_loading_does(tiny_cfg, monkeypatch, capability,
                                                     sharding, fmt):
    """``model.dtype: auto`` is 16 bits on a GPU (fp32 under FSDP, or on a CPU) for the plan
    and the auto micro-batch as for loading: one rule, :func:`devices.weights_dtype`."""
    from peftune import plan

    gpus(monkeypatch, 0 if capability is None else 1, capability or (0, 0))
    gpu_memory(monkeypatch, 80 * 2**30)
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    if sharding:
        monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    tiny_cfg["train"]["precision"] = "auto"
    tiny_cfg["plan"] = {"use_data": False}
    p = plan.make(config_from_dict(tiny_cfg))
    assert p.weight_format == fmt == devices.DTYPE_NAMES[devices.weights_dtype("auto", "auto")]
    bytes_per_weight = 4 if fmt == "float32" else 2
    assert p.memory["max"][False].weights == bytes_per_weight * p.params.total


def test_free_generation_memory_counts_what_the_allocator_reserved_but_does_not_use(
        monkeypatch):
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda where=None: (1 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda where=None: type("Props", (), {"total_memory": 80 * gib})())
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda where=None: 10 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda where=None: 4 * gib)
    # 6 GiB reserved by the caching allocator but unused count as room, not as taken
    assert devices.room_bytes(torch.device("cuda", 0)) == 76 * gib
    assert devices.room_bytes(torch.device("cpu")) is None


ACCELERATE_ENV = ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED",
                  "ACCELERATE_DEEPSPEED_ZERO_STAGE")


def launch_env(monkeypatch, sharding):
    """The variables ``accelerate launch`` sets for an FSDP or DeepSpeed config."""
    for key in ACCELERATE_ENV:
        monkeypatch.delenv(key, raising=False)
    if sharding == "fsdp":
        monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    elif sharding:
        monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
        monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", sharding[-1])


@pytest.mark.parametrize("method, sharding, dtype, refused", [
    ("qlora", "fsdp", "auto", "cannot train under FSDP: its 4-bit"),
    ("lora-int8", "fsdp", "auto", "cannot train under FSDP: its int8"),
    ("qlora", "zero3", "auto", "cannot train under DeepSpeed ZeRO-3"),
    ("lora-int8", "zero3", "auto", "cannot train under DeepSpeed ZeRO-3"),
    ("adalora", "zero3", "auto", "cannot train under DeepSpeed ZeRO-3: its rank allocator"),
    ("ia3", "fsdp", "bfloat16", "needs model.dtype auto or float32, not bfloat16"),
    ("adalora", "fsdp", "float16", "needs model.dtype auto or float32"),
    ("llama-adapter", "fsdp", "bfloat16", "needs model.dtype auto or float32"),
])
def test_sharded_launches_a_method_cannot_train_under_are_refused_before_loading(
        tiny_cfg, monkeypatch, method, sharding, dtype, refused):
    from peftune import assembly, models
    from peftune.errors import ConfigError

    launch_env(monkeypatch, sharding)
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    cfg = config_from_dict({**tiny_cfg, "method": method, "model": {
        **tiny_cfg["model"], "dtype": dtype}})
    with pytest.raises(ConfigError, match=f"method '{method}'.*{refused}"):
        assembly.load_base(cfg, tokenizer=type("Tok", (), {"pad_token_id": 0})())


def test_fsdp_config_advertises_exactly_the_methods_that_train_under_it(monkeypatch):
    """configs/accelerate/fsdp.yaml names the methods it trains; every other one is refused,
    and a base loaded under it is fp32 (FSDP's mixed precision computes in bf16)."""
    import re
    from pathlib import Path

    from peftune.errors import ConfigError
    from peftune.methods import registry

    text = (Path(__file__).parent.parent / "configs/accelerate/fsdp.yaml").read_text()
    advertised = set(re.search(r"# methods: (.*)", text).group(1).replace(",", " ").split())
    launch_env(monkeypatch, "fsdp")
    gpus(monkeypatch, 1)
    assert devices.sharding() == "fsdp" and devices.weights_dtype("auto", "bf16") == \
        torch.float32
    trains = set()
    for name, method in registry().items():
        try:
            method.check_sharding(devices.sharding(), model_dtype="auto")
            trains.add(name)
        except ConfigError:
            pass
    assert advertised == trains
    launch_env(monkeypatch, "zero2")  # ZeRO-1/2 shard optimizer state only: all may run
    assert devices.sharding() == "deepspeed"
    for method in registry().values():
        method.check_sharding(devices.sharding(), model_dtype="bfloat16")


def test_qlora_packs_4bit_weights_in_bytes(monkeypatch):
    from peftune.methods.qlora import QLoraOptions, nf4_load_kwargs

    quant = nf4_load_kwargs(QLoraOptions())["quantization_config"]
    assert quant.bnb_4bit_quant_storage == torch.uint8
    assert quant.bnb_4bit_compute_dtype == devices.compute_dtype()


def test_fp16_overflows_the_grad_scaler_skips_do_not_stop_training():
    """Under fp16 an infinite gradient norm is a step the GradScaler skipped (and lowered its
    scale for); only a long run of them, or any non-finite norm in bf16/fp32, is divergence."""
    from types import SimpleNamespace

    from transformers import TrainerControl

    from peftune.train import StopOnDivergence

    def run(fp16, norms):
        guard, control = StopOnDivergence(), TrainerControl()
        for step, norm in enumerate(norms, 1):
            guard.on_log(SimpleNamespace(fp16=fp16), SimpleNamespace(global_step=step),
                         control, logs={"loss": 2.0, "grad_norm": norm})
        return guard.reason, control.should_training_stop

    inf = float("inf")
    assert run(True, [inf, inf, float("nan"), 1.5, 1.2, inf, 1.1]) == (None, False)
    reason, stopped = run(False, [inf, 1.5])
    assert stopped and reason == "grad_norm became inf at step 1"
    reason, stopped = run(True, [1.5] + [inf] * StopOnDivergence.MAX_OVERFLOWS)
    assert stopped and "grad_norm became inf" in reason
    assert run(True, [1.5] + [inf] * (StopOnDivergence.MAX_OVERFLOWS - 1) + [1.4]) == (
        None, False)


def test_kv_cache_estimate_and_the_generation_batch_it_allows():
    llama7b = LlamaConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                          num_key_value_heads=32, intermediate_size=11008, vocab_size=32000)
    per_seq = devices.kv_cache_bytes(llama7b, 1300, torch.bfloat16)
    assert per_seq == 2 * 32 * 32 * 128 * 2 * 1300  # 0.68 GB: the issue's ~22 GB at batch 32
    assert 21e9 < 32 * per_seq < 23e9
    gib = 2**30
    assert devices.generation_batch(cap=32, per_sequence=per_seq, free=80 * gib) == 32
    assert devices.generation_batch(cap=32, per_sequence=per_seq, free=10 * gib) == 11
    assert devices.generation_batch(cap=32, per_sequence=per_seq, free=gib // 4) == 1
    assert devices.generation_batch(cap=32, per_sequence=None, free=gib) == 32  # no estimate
    assert devices.generation_batch(cap=32, per_sequence=per_seq, free=None) == 32  # CPU
    # grouped-query attention: 8 key-value heads keep a quarter of the cache
    gqa = LlamaConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8)
    assert devices.kv_cache_bytes(gqa, 1300, torch.bfloat16) == per_seq // 4
    assert devices.kv_cache_bytes(gqa, 1300, torch.float32) == per_seq // 2


def test_place_leaves_a_model_spread_over_devices_alone(monkeypatch):
    model = torch.nn.Linear(2, 2)
    model.hf_device_map = {"layers.0": 0, "layers.1": 1}
    monkeypatch.setattr(devices, "device", lambda: torch.device("meta"))
    assert devices.place(model).weight.device.type == "cpu"
    del model.hf_device_map
    assert devices.place(model).weight.device.type == "meta"



def test_generation_batch_of_a_model_from_its_config_and_the_gpu_memory(monkeypatch):
    from peftune.config import EvalConfig
    from peftune.generation import batch_size
    from tests.conftest import make_llama

    model = make_llama(50)  # 2 layers, 2 key-value heads of 16 dims, fp32
    per_token = 2 * 2 * 2 * 16 * 4
    settings = EvalConfig(batch_size=16, max_new_tokens=20, num_beams=2)
    cuda = torch.device("cuda", 0)
    free = 10 * per_token * (80 + 20) * 2  # room for 10 beam pairs of 100 tokens, before margin
    monkeypatch.setattr(devices, "room_bytes", lambda where: free if where == cuda else None)
    assert batch_size(model, settings, 80, cuda) == 7  # 70% of the room for the cache
    assert batch_size(model, settings, 80, torch.device("cpu")) == 16  # CPU: eval.batch_size


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="glibc only")
def test_trim_heap_hands_freed_heap_pages_back():
    """Freed mid-sized tensors stay resident in glibc's heap until trimmed (in a fresh
    process: the heap's history decides where tensors live)."""
    import os
    import subprocess
    import sys

    script = """
import psutil, torch
from peftune import devices
rss = lambda: psutil.Process().memory_info().rss
big = torch.ones(4 * 2**20); del big       # a freed 16 MB mapping raises the mmap threshold
chunks = [torch.ones(2**20) for _ in range(100)]  # 4 MB each: from the heap now
keep = torch.ones(2**16)                   # above them: free() cannot shrink from the top
del chunks
held = rss()
print(held, rss() if devices.trim_heap() else held, rss())
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, check=True, timeout=300)
    held, trimmed, _ = map(int, out.stdout.split())
    assert held - trimmed > 300 * 2**20  # most of the 400 MB freed


def test_generation_room_is_the_total_less_what_this_process_holds_not_the_free_memory(
        monkeypatch):
    """Two runs of one seed must batch prompts alike: what other processes and the caching
    allocator hold (the driver's free memory) must not move the generation batch."""
    gib = 2**30
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda where: type("Props", (), {"total_memory": 80 * gib})())
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda where: 30 * gib)
    rooms = set()
    for free in (50 * gib, 20 * gib, 3 * gib):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda where, f=free: (f, 80 * gib))
        rooms.add(devices.room_bytes(cuda))
    assert rooms == {50 * gib}
    assert devices.room_bytes(torch.device("cpu")) is None


def test_auto_micro_batch_memory_is_the_device_total_not_what_is_free(monkeypatch):
    """``train.micro_batch_size: auto`` must not change with what happens to be free: another
    micro-batch splits each step differently and trains other weights."""
    import psutil

    from peftune import plan

    seen = set()
    for available in (20 * 2**30, 2 * 2**30):
        memory = psutil.virtual_memory()._replace(total=24 * 2**30, available=available,
                                                  free=available)
        monkeypatch.setattr(psutil, "virtual_memory", lambda m=memory: m)
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a, f=available: (f, 80 * 2**30))
        seen.add(plan.device_memory("auto"))
    assert seen == {("cpu", 24 * 2**30)}
