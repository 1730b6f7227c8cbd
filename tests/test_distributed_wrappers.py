"""The modules under the distributed engines users run, proven on CPU with gloo.

A tiny model holding :class:`~mmkernels.HyperAttention` (gated, with images), :class:`~mmkernels.PLoRALinear`
and :class:`~mmkernels.MoE` (``ep_size=1``) trains under:

* DDP (``DistributedDataParallel``), reference backend, two steps;
* FSDP2 ``fully_shard`` (each layer and the root), the model built on the ``meta`` device, then
  ``to_empty`` and the full state dict loaded with ``set_model_state_dict(full_state_dict=True)``;
  reference backend, two steps; and once more with the Triton kernels (interpreter), one step;
* DeepSpeed ZeRO stage 2 through ``deepspeed.initialize`` (CPU accelerator, gloo, fp32, a client
  ``torch.optim.SGD``), reference backend, two steps.

Oracle: the same model in one process on the whole batch.  Each rank gets its own half of the batch
(equal token counts), the loss is the mean squared error over the rank's tokens, and every engine
averages gradients over ranks, so the averaged rank losses and the parameters after each step equal
the single-process ones (fp32 tolerance of :mod:`mmkernels.testing`; the whole model's *update* is
compared too, so the check is not diluted by the weights' size, and each parameter's update loosely:
see ``UPDATE_TOL``).  The Triton run's oracle runs the Triton kernels too.  What makes this exact:

* MoE is dropless (``drop_tokens=False``), ``k=2`` with ``top2_2nd_expert_sampling=False``: a token's
  routing depends on that token only (capacity would depend on the rank's token count);
* ``l_aux`` is not in the loss: DeepSpeed computes it from the local tokens, and the mean of per-rank
  ``l_aux`` is not the ``l_aux`` of the whole batch (it is not additive over tokens), under any engine;
* PLoRA's dropout is 0 (dropout masks differ between ranks and the single process);
* the optimizer is SGD (momentum, weight decay): Adam's first step is ``lr * g / (|g| + eps)``, which
  turns fp32 reduction-order noise in a near-zero gradient into an update of order ``lr``.

DeepSpeed on CPU needs, besides ``DS_ACCELERATOR=cpu``: ``LOCAL_RANK`` in the environment (its
launcher's job), ``"gradient_clipping": 0.0`` (0.19's default is 1.0, which would clip this step) and
``"zero_allow_untested_optimizer": true`` for the client SGD.  Its CPU communication backend
JIT-compiles a shared-memory C++ op (``deepspeed_shm_comm``: 30 s, 60 CPU-s, on a fresh machine) that serves
only ``inference_all_reduce``; the ranks replace ``deepspeed.comm.torch.build_shm_op`` with
``lambda: None`` so training never waits for that compiler.

One spawn of 2 ranks runs every engine in turn (each spawn costs seconds of imports); the tests below
read its results.
"""
import importlib.util
import os
import time
import zlib

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import mmkernels
from mmkernels.testing import assert_close, compare

from _distributed import run_ranks, skip_deepspeed_shm_build
from conftest import SESSION_SEED

WORLD = 2
H, HEADS, KV_HEADS, HEAD_DIM, FFN, E, L, T = 24, 2, 1, 16, 10, 4, 7, 3   # head_dim 16: the Triton minimum
N_IMAGES = (1, 2, 1, 1)          # images per sample of the global batch; B = 4 samples, 2 per rank
B = len(N_IMAGES)
LR, MOMENTUM, WEIGHT_DECAY = 0.005, 0.9, 0.01   # small steps: step 2 is not chaotic
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None


class PhiMLP(nn.Module):          # MoE-LLaVA-phi's expert: fc2(gelu_tanh(fc1 x))
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(H, FFN), nn.Linear(FFN, H)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class TinyModel(nn.Module):
    """A decoder-layer-shaped stack: hyper attention (text + images), a PLoRA projection on visual
    tokens, a MoE FFN; residual adds out of place."""

    def __init__(self, inplace_residual: bool = False):
        super().__init__()
        self.attn = mmkernels.HyperAttention(H, HEADS, KV_HEADS, head_dim=HEAD_DIM, rope_theta=1e4, mode="gated")
        self.proj = mmkernels.PLoRALinear(H, H, bias=True, lora_r=4, lora_alpha=8, lora_dropout=0.0)
        self.moe = mmkernels.MoE(H, PhiMLP(), num_experts=E, k=2, drop_tokens=False,
                                 top2_2nd_expert_sampling=False)
        self.inplace_residual = inplace_residual

    def forward(self, x, position_ids, im_mask, image_embeds, image_positions, cu_images):
        h, _ = self.attn(x, position_ids, image_embeds, image_positions, cu_images)
        x = x + h
        x = x + self.proj(x, im_mask)
        y, _, _ = self.moe(x)
        if self.inplace_residual:
            y += x            # what some decoder layers do with their FFN output
            return y
        return x + y


def _weights(seed):
    """Random values for every parameter (PLoRA's B and the attention gate are zeros at init, which
    would leave paths untested)."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * 0.3 for k, v in TinyModel().state_dict().items()}


def _batch(seed, rank=None):
    """The global batch, or rank ``rank``'s half of it (its samples, their images, the image layout
    rebased to 0)."""
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(B, L, H, generator=g)
    position_ids = torch.arange(L).expand(B, L)
    im_mask = torch.rand(B, L, generator=g) < 0.5
    cu = torch.tensor([0, *N_IMAGES], dtype=torch.int32).cumsum(0).to(torch.int32)
    images = torch.randn(int(cu[-1]), T, H, generator=g)
    positions = torch.cat([torch.randperm(L, generator=g)[:n].sort().values for n in N_IMAGES])   # increasing
    target = torch.randn(B, L, H, generator=g)
    if rank is None:
        return x, position_ids, im_mask, images, positions, cu, target
    b0, b1 = rank * B // WORLD, (rank + 1) * B // WORLD
    i0, i1 = int(cu[b0]), int(cu[b1])
    return (x[b0:b1], position_ids[b0:b1], im_mask[b0:b1], images[i0:i1], positions[i0:i1],
            cu[b0:b1 + 1] - cu[b0], target[b0:b1])


def _sgd(params):
    return torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)


def _loss(model, data):
    *inputs, target = data
    return ((model(*inputs) - target) ** 2).mean()


def _full(state_dict):
    """Plain CPU copies of a state dict; FSDP2's DTensor shards are gathered (a collective)."""
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone().numpy()
            for k, v in state_dict.items()}


def _mean_over_ranks(loss):
    loss = loss.detach().clone()
    dist.all_reduce(loss)
    return float(loss) / dist.get_world_size()


def _single_process(seed, steps):
    model = TinyModel()
    model.load_state_dict(_weights(seed))
    opt = _sgd(model.parameters())
    losses = []
    for _ in range(steps):
        loss = _loss(model, _batch(seed))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return {"losses": losses, "params": _full(model.state_dict())}


def _train(model, opt, rank, seed, steps):
    losses = []
    for _ in range(steps):
        loss = _loss(model, _batch(seed, rank))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(_mean_over_ranks(loss))
    return losses


def _ddp(rank, seed, steps):
    from torch.nn.parallel import DistributedDataParallel
    model = TinyModel()
    model.load_state_dict(_weights(seed))
    ddp = DistributedDataParallel(model)
    losses = _train(ddp, _sgd(ddp.parameters()), rank, seed, steps)
    return {"losses": losses, "params": _full(model.state_dict())}


def _cpu_mesh():
    """FSDP2's default mesh is on the accelerator where there is one; these ranks shard CPU tensors."""
    from torch.distributed.device_mesh import init_device_mesh
    return init_device_mesh("cpu", (dist.get_world_size(),))


def _fsdp2_meta(rank, seed, steps, inplace_residual=False):
    """FSDP2 as a large model is brought up: built on ``meta`` (MoE verifies its template expert on a
    CPU probe, so that works), sharded, materialised with ``to_empty`` and filled from a full state
    dict."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import fully_shard
    with torch.device("meta"):
        model = TinyModel(inplace_residual)
    mesh = _cpu_mesh()
    for layer in (model.attn, model.proj, model.moe):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device="cpu")
    # set_model_state_dict turns the given dict's values into shards in place: give it its own dict
    set_model_state_dict(model, _weights(seed), options=StateDictOptions(full_state_dict=True))
    assert all(type(p).__name__ == "DTensor" for p in model.parameters())
    losses = _train(model, _sgd(model.parameters()), rank, seed, steps)
    return {"losses": losses, "params": _full(model.state_dict())}


def _zero2(rank, seed, steps):
    os.environ["DS_ACCELERATOR"] = "cpu"   # this rank's process only; CPU tensors even where CUDA is present
    os.environ["LOCAL_RANK"] = str(rank)   # deepspeed's launcher sets it; the group is already up
    import deepspeed
    skip_deepspeed_shm_build()   # no JIT build of a shared-memory op (inference_all_reduce only)
    model = TinyModel()
    model.load_state_dict(_weights(seed))
    config = {"train_micro_batch_size_per_gpu": B // WORLD, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True,
              "gradient_clipping": 0.0, "fp16": {"enabled": False}, "bf16": {"enabled": False}}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=_sgd(model.parameters()), config=config)
    assert type(engine.optimizer).__name__ == "DeepSpeedZeroOptimizer" and engine.zero_optimization_stage() == 2
    losses = []
    for _ in range(steps):
        loss = _loss(engine, _batch(seed, rank))
        engine.backward(loss)
        engine.step()
        losses.append(_mean_over_ranks(loss))
    return {"losses": losses, "params": _full(model.state_dict())}


def _fsdp2_deepspeed_layout_checkpoint(rank, seed):
    """A MoE writing DeepSpeed's keys (``state_dict_layout="deepspeed"``, what ``apply_mmkernels`` uses) under
    FSDP2, through torch.distributed.checkpoint's full state dict: save, then load what was saved."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
    from torch.distributed.fsdp import fully_shard
    torch.manual_seed(seed)
    moe = mmkernels.MoE(H, PhiMLP(), num_experts=E, k=2, drop_tokens=False, top2_2nd_expert_sampling=False,
                        state_dict_layout="deepspeed")
    full = moe.state_dict()
    fully_shard(moe, mesh=_cpu_mesh())
    options = StateDictOptions(full_state_dict=True)
    return {"get": _error(get_model_state_dict, moe, options=options),
            "set": _error(set_model_state_dict, moe, dict(full), options=options)}


def _error(fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except Exception as e:   # noqa: BLE001 - what failed is the result
        return f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
    return None


def _engines(rank, world, seed, with_triton, with_deepspeed):
    """Every engine in turn on this rank; the single-process oracles first, one on each rank (in parallel)."""
    assert world == WORLD
    out, cpu = {"single_triton": None}, {}

    def run(key, fn, *args):
        t = time.process_time()
        out[key] = fn(*args)
        cpu[key] = round(time.process_time() - t, 2)

    if rank == 0:
        run("single", _single_process, seed, 2)
    elif with_triton:
        # the Triton run's oracle runs the same kernels: the check is of the engine, not of the kernels'
        # fp32 rounding against the reference (their own tests do that)
        with mmkernels.use_backend("triton"):
            run("single_triton", _single_process, seed, 1)
    run("ddp", _ddp, rank, seed, 2)
    run("fsdp2_meta", _fsdp2_meta, rank, seed, 2)
    if with_triton:
        with mmkernels.use_backend("triton"):
            run("fsdp2_meta_triton", _fsdp2_meta, rank, seed, 1)
    run("fsdp2_inplace_residual_error", _error, _fsdp2_meta, rank, seed, 1, True)
    run("fsdp2_deepspeed_layout_errors", _fsdp2_deepspeed_layout_checkpoint, rank, seed)
    if with_deepspeed:
        run("zero2", _zero2, rank, seed, 2)
    out["cpu_seconds"] = cpu   # per engine, for the test budget (pytest -s prints them)
    return out


@pytest.fixture(scope="module")
def engines():
    seed = (SESSION_SEED + zlib.crc32(b"test_distributed_wrappers")) % 2**30   # replayable: see conftest
    results = run_ranks(_engines, WORLD, seed, mmkernels.interpreter_enabled(), HAS_DEEPSPEED, timeout=150)
    print("CPU seconds per engine and rank:", [r["cpu_seconds"] for r in results])
    return seed, results


# Per-parameter updates are checked loosely: the key projection's bias gets a gradient that the softmax's
# shift invariance nearly cancels (only RoPE breaks it), so fp32 rounding that differs with the batch split
# (e.g. kernel block sizes chosen by row count) is ~1e-5 of it.  The whole model's update is checked at
# the fp32 tolerance, and each parameter after the step too.
UPDATE_TOL = 1e-3


def _check_engine(engines, key, single_key="single"):
    """Every rank's averaged losses, parameters after the step(s) and the whole model's update equal the
    single-process run's at the fp32 tolerance; each parameter's update to UPDATE_TOL."""
    seed, results = engines
    initial = _weights(seed)
    single = next(r[single_key] for r in results if r.get(single_key) is not None)
    names = list(single["params"])
    for rank, result in enumerate(results):
        got = result[key]
        tag = f"rank {rank} {key}"
        for step, (loss, want) in enumerate(zip(got["losses"], single["losses"], strict=True)):
            assert_close(f"{tag}: loss of step {step}", torch.tensor(loss), torch.tensor(want, dtype=torch.float64),
                         torch.float32)
        updates, want_updates = [], []
        for name in names:
            a, e = torch.from_numpy(got["params"][name]), torch.from_numpy(single["params"][name]).double()
            assert_close(f"{tag}: {name}", a, e, torch.float32)
            updates.append((a - initial[name]).flatten())
            want_updates.append((e - initial[name].double()).flatten())
            c = compare(f"{tag}: {name} update", updates[-1], want_updates[-1], torch.float32)
            assert c.max_err <= UPDATE_TOL and c.rms_err <= UPDATE_TOL, f"{c} (tolerance here {UPDATE_TOL})"
        assert_close(f"{tag}: the model's update", torch.cat(updates), torch.cat(want_updates), torch.float32)


def test_ddp_step_equals_single_process(engines):
    _check_engine(engines, "ddp")


def test_fsdp2_meta_init_to_empty_load_step_equals_single_process(engines):
    _check_engine(engines, "fsdp2_meta")


def test_fsdp2_triton_step_equals_single_process(engines):
    if all(r["single_triton"] is None for r in engines[1]):
        pytest.skip("the Triton kernels need the interpreter on the gloo ranks' CPU tensors (TRITON_INTERPRET=1)")
    _check_engine(engines, "fsdp2_meta_triton", "single_triton")


@pytest.mark.skipif(not HAS_DEEPSPEED, reason="DeepSpeed is not installed")
def test_deepspeed_zero2_step_equals_single_process(engines):
    _check_engine(engines, "zero2")


# MoE's output is never a view: FSDP2 attaches its pre-backward hook (the all-gather of the layer's
# parameters for backward) to a module's outputs, and an in-place op on a view output dropped it, so
# `y += x` on the MoE output failed in backward on the freed (resharded) expert weights.

def test_fsdp2_inplace_residual_on_moe_output(engines):
    """An in-place residual add on the MoE output under FSDP2 (what a decoder layer may do)."""
    errors = [result["fsdp2_inplace_residual_error"] for result in engines[1]]
    assert errors == [None] * WORLD, errors


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("shape", [(5, H), (2, 3, H), (H,)])
def test_moe_output_is_not_a_view(backend, shape):
    """The cause of the FSDP2 case above, on one process (no engine); the input gradient keeps x's shape."""
    moe = mmkernels.MoE(H, PhiMLP(), num_experts=E, k=2, drop_tokens=False, top2_2nd_expert_sampling=False)
    x = torch.randn(shape, requires_grad=True)
    with mmkernels.use_backend(backend):
        y, _, _ = moe(x)
        assert y.shape == x.shape and not y._is_view()
        (y + 0).sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.xfail(strict=True, reason=(
    "MoE(state_dict_layout='deepspeed') writes keys (deepspeed_moe.gate.wg.weight, "
    "deepspeed_moe.experts.deepspeed_experts.<i>.<linear>.weight) that are not attribute paths of the module; "
    "torch.distributed.checkpoint's get_model_state_dict resolves every state-dict key with getattr "
    "(AttributeError: no attribute 'deepspeed_moe'; so on one process too), and set_model_state_dict under FSDP2 "
    "rejects them as unexpected keys.  A documented limit: DCP checkpoints need the packed layout (the default, "
    "tested above; a patched model's layers can be switched with layer.state_dict_layout = 'packed'), and "
    "MoE.deepspeed_state_dict() exports DeepSpeed's keys"))
def test_fsdp2_dcp_checkpoint_of_deepspeed_layout_moe(engines):
    errors = [result["fsdp2_deepspeed_layout_errors"] for result in engines[1]]
    assert errors == [{"get": None, "set": None}] * WORLD, errors
