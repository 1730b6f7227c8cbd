"""A tiny faithful mirror of MoE-LLaVA's language model, with the real DeepSpeed ``MoE`` (0.19.8).

Written from ``PKU-YuanGroup/MoE-LLaVA@6cb5f66`` ``moellava/model/language_model/llava_phi_moe.py`` and
``llava_stablelm_moe.py`` (see ``../shared/research/moe.md`` section 1):

* ``initialize_moe_modules`` replaces ``model.layers[i].mlp`` of the chosen layers (``moe_mode='sparse'``:
  layers 0, 2, 4, ...) by ``deepspeed.moe.layer.MoE(hidden, expert=<that dense MLP>, num_experts, ep_size,
  k, capacity_factor, eval_capacity_factor, min_capacity, use_residual)``, and checks that every expert
  equals the dense MLP (sparse upcycling);
* the decoder layer's forward unpacks the MoE's ``(output, l_aux, exp_counts)`` and collects ``l_aux``
  (phi-2: the parallel block ``x + attn(ln x) + moe(ln x)``; StableLM: ``x + attn(ln1 x)``, then
  ``+ moe(ln2 x)``);
* the causal-LM forward adds ``router_aux_loss_coef * sum(l_aux over the MoE layers)`` (0.01, a sum, not a
  mean) to the LM loss when ``labels`` are given.

The backbones are transformers' ``PhiForCausalLM`` / ``StableLmForCausalLM`` with a tiny config; only the
decoder layers' forward is MoE-LLaVA's (the ``len(x) == 3`` tuple test of the original, which misfires on
a dense layer with batch 3, is an ``isinstance`` here).  Dropout is off, so a forward is a function of
its inputs and, with DeepSpeed's default ``top2_2nd_expert_sampling=True``, of the Gumbel noise of each
MoE layer (see :func:`same_gumbel_draws`).

:func:`deepspeed_process_group` gives DeepSpeed the one-process gloo group that ``deepspeed.initialize``
would, so the layers get their ``ep_size_1`` expert-parallel group as in MoE-LLaVA's training.  (DeepSpeed
0.19.8's ``MoE`` with ``ep_size=1`` also runs without any process group, as long as
``set_deepspeed_parallelism`` is not called; the tests use the group to be faithful.)
"""
from __future__ import annotations

import contextlib
import importlib
import os
import tempfile

import torch

from _distributed import skip_deepspeed_shm_build

ROUTER_AUX_LOSS_COEF = 0.01
# MoE-LLaVA's released settings (scripts/v1/*/finetune_moe.sh and the released config.json files)
MOE_LLAVA_SETTINGS = dict(num_experts=4, k=2, capacity_factor=1.5, eval_capacity_factor=2.0, min_capacity=0,
                          use_residual=False, ep_size=1)


def _moe_out(self, out):
    """MoE-LLaVA's unpacking of the MLP output: a DeepSpeed MoE returns (output, l_aux, exp_counts)."""
    if isinstance(out, tuple):
        out, l_aux, _ = out
        self.moe_losses.append(l_aux)
    return out


def _phi_layer_forward(self, hidden_states, attention_mask=None, position_ids=None, position_embeddings=None,
                       **kwargs):
    """``MoEPhiDecoderLayer_forward``: the parallel block, the MLP (or MoE) on the layer-normed input."""
    residual = hidden_states
    hidden_states = self.input_layernorm(hidden_states)
    attn_outputs, _ = self.self_attn(hidden_states=hidden_states, attention_mask=attention_mask,
                                     position_ids=position_ids, position_embeddings=position_embeddings, **kwargs)
    attn_outputs = self.resid_dropout(attn_outputs)
    feed_forward_hidden_states = self.resid_dropout(_moe_out(self, self.mlp(hidden_states)))
    return attn_outputs + feed_forward_hidden_states + residual


def _stablelm_layer_forward(self, hidden_states, attention_mask=None, position_ids=None, position_embeddings=None,
                            **kwargs):
    """``MoEStableLMDecoderLayer_forward``: attention, then the MLP (or MoE) on post_attention_layernorm."""
    residual = hidden_states
    hidden_states = self.input_layernorm(hidden_states)
    attn_output, _ = self.self_attn(hidden_states=hidden_states, attention_mask=attention_mask,
                                    position_ids=position_ids, position_embeddings=position_embeddings, **kwargs)
    hidden_states = residual + attn_output
    residual = hidden_states
    hidden_states = _moe_out(self, self.mlp(self.post_attention_layernorm(hidden_states)))
    return residual + self.dropout(hidden_states)


def _causal_lm_class(base):
    class MoELLaVAForCausalLM(base):
        """``MoELLaVA{Phi,StableLM}ForCausalLM``'s language-model part."""

        def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
            self.moe_losses.clear()
            out = super().forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
            if self.moe_losses:
                out["moe_loss"] = self.config.router_aux_loss_coef * sum(self.moe_losses)
                if labels is not None:
                    out["loss"] = out.loss + out["moe_loss"]
            return out

    MoELLaVAForCausalLM.__name__ = MoELLaVAForCausalLM.__qualname__ = f"MoELLaVA{base.__name__}"
    return MoELLaVAForCausalLM


def tiny_config(backbone: str, num_layers: int = 2, hidden: int = 64, intermediate: int = 84, vocab: int = 97):
    """A tiny phi-2 or StableLM-2 config (dropout off, no eos: generate() runs max_new_tokens steps)."""
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=num_layers,
                  num_attention_heads=4, max_position_embeddings=64, attention_dropout=0.0, tie_word_embeddings=False,
                  bos_token_id=1, eos_token_id=None, pad_token_id=0)
    if backbone == "phi":
        from transformers import PhiConfig
        return PhiConfig(hidden_act="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, partial_rotary_factor=0.5, **common)
    if backbone == "stablelm":
        from transformers import StableLmConfig
        return StableLmConfig(hidden_act="silu", num_key_value_heads=4, use_parallel_residual=False, use_qkv_bias=True,
                              hidden_dropout=0.0, partial_rotary_factor=0.25, **common)
    raise ValueError(f"backbone must be 'phi' or 'stablelm', got {backbone!r}")


def initialize_moe_modules(model, *, moe_mode: str = "sparse", **moe_args) -> list:
    """MoE-LLaVA's ``initialize_moe_modules``: DeepSpeed MoE on the chosen layers; returns their indices.

    ``moe_args`` go to ``deepspeed.moe.layer.MoE`` over :data:`MOE_LLAVA_SETTINGS` (e.g. ``drop_tokens``,
    ``top2_2nd_expert_sampling``, which MoE-LLaVA leaves at DeepSpeed's defaults)."""
    from deepspeed.moe.layer import MoE

    layers = model.model.layers
    n = len(layers)
    idx = {"sparse": list(range(n))[::2], "dense": list(range(n)), "first_half": list(range(n))[:n // 2],
           "second_half": list(range(n))[n // 2:]}[moe_mode]
    args = {**MOE_LLAVA_SETTINGS, **moe_args}
    model.config.moe = dict(moe_enable=True, moe_mode=moe_mode, moe_layers_idx=idx, **args)
    for i in idx:
        mlp = layers[i].mlp
        pretrained = {k: v.clone() for k, v in mlp.state_dict().items()}
        layers[i].mlp = MoE(model.config.hidden_size, expert=mlp, **args)
        for e in layers[i].mlp.deepspeed_moe.experts.deepspeed_experts:   # upcycling: every expert is the MLP
            loaded = e.state_dict()
            assert loaded.keys() == pretrained.keys()
            assert all(torch.equal(pretrained[k], v) for k, v in loaded.items())
    return idx


def build(backbone: str = "phi", *, seed: int = 0, num_layers: int = 2, dtype=torch.float32, moe_mode="sparse",
          **moe_args):
    """The mirror: a tiny phi-2 / StableLM-2 causal LM with MoE-LLaVA's DeepSpeed MoE layers (random weights
    from ``seed``; each expert then perturbed so the experts differ, as after MoE training)."""
    from transformers import PhiForCausalLM, StableLmForCausalLM

    base, layer_forward = {"phi": (PhiForCausalLM, _phi_layer_forward),
                           "stablelm": (StableLmForCausalLM, _stablelm_layer_forward)}[backbone]
    config = tiny_config(backbone, num_layers=num_layers)
    config.router_aux_loss_coef = ROUTER_AUX_LOSS_COEF
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _causal_lm_class(base)(config)
        idx = initialize_moe_modules(model, moe_mode=moe_mode, **moe_args)
        with torch.no_grad():
            for i in idx:
                for p in model.model.layers[i].mlp.deepspeed_moe.experts.parameters():
                    p.add_(torch.randn_like(p) * 0.1 * p.std())
    model.moe_losses = []
    for layer in model.model.layers:
        layer.moe_losses = model.moe_losses    # MoE-LLaVA collects them per forward (here: a shared list)
        layer.forward = layer_forward.__get__(layer)   # as MoE-LLaVA rebinds each layer's forward
    return model.to(dtype)


@contextlib.contextmanager
def same_gumbel_draws():
    """Make DeepSpeed's top-2 second-expert sample draw what ``mmkernels.MoE`` draws from the same generator
    state: ``u = torch.rand(S, E)`` clamped to [1e-20, 1 - 1e-7], noise ``-log(-log(u))``.  (DeepSpeed's own
    ``Gumbel(0, 1).rsample`` maps the same ``torch.rand`` draw through ``Uniform(tiny, 1 - eps)``, which
    differs in the last bits.)  With this and equal seeds, sampled routing is identical patched and not."""
    from deepspeed.moe import sharded_moe

    def gumbel_rsample(shape, device):
        u = torch.rand(shape, device=device).clamp_(min=1e-20, max=1.0 - 1e-7)
        return -torch.log(-torch.log(u))

    real = sharded_moe.gumbel_rsample
    sharded_moe.gumbel_rsample = gumbel_rsample
    try:
        yield
    finally:
        sharded_moe.gumbel_rsample = real


@contextlib.contextmanager
def deepspeed_process_group():
    """A one-process gloo group, with DeepSpeed's communication backend on it, as ``deepspeed.initialize``
    sets up; everything is torn down on exit (DeepSpeed's expert-group registry, its backend, the group).

    DeepSpeed's ``TorchBackend`` would JIT-build its shared-memory all-reduce op (~18 s of C++ compilation
    on a fresh machine, useless for one process): that build is skipped."""
    import torch.distributed as dist
    import deepspeed
    ds_comm = importlib.import_module("deepspeed.comm.comm")
    from deepspeed.utils import groups

    if dist.is_initialized() or ds_comm.cdb is not None:
        raise RuntimeError("a process group already exists")
    with tempfile.TemporaryDirectory(prefix="mmkernels-moe-llava-") as tmp:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'store')}", rank=0, world_size=1)
        restore_shm_build = skip_deepspeed_shm_build()
        try:
            deepspeed.init_distributed(dist_backend="gloo")
            yield
        finally:
            restore_shm_build()
            for registry in (groups._EXPERT_PARALLEL_GROUP, groups._EXPERT_PARALLEL_GROUP_RANKS,
                             groups._EXPERT_DATA_PARALLEL_GROUP, groups._EXPERT_DATA_PARALLEL_GROUP_RANKS):
                registry.clear()
            ds_comm.cdb = None
            dist.destroy_process_group()


def set_expert_parallel_groups(model) -> None:
    """What ``deepspeed.initialize`` does for each MoE layer (needs :func:`deepspeed_process_group`)."""
    from deepspeed.moe.layer import MoE

    for m in model.modules():
        if isinstance(m, MoE):
            m.set_deepspeed_parallelism()


def moe_layers(model) -> dict:
    """qualified name -> DeepSpeed MoE layer."""
    from deepspeed.moe.layer import MoE

    return {n: m for n, m in model.named_modules() if isinstance(m, MoE)}
