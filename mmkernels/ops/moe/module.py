"""``MoE``: a drop-in for ``deepspeed.moe.layer.MoE`` as MoE-LLaVA uses it.

Same constructor (DeepSpeed 0.19 names and defaults), same ``forward(hidden_states, used_token=None)
-> (output, l_aux, exp_counts)``.  The template ``expert`` (the dense FFN being upcycled) is copied
into per-expert stacked weights for the grouped GEMMs:

* ``fc1``, ``fc2`` (phi-2): ``fc2(gelu_tanh(fc1 x + b1)) + b2``; packed as w1 = fc1, w2 = fc2;
* ``gate_proj``, ``up_proj``, ``down_proj`` (StableLM-2): ``down(silu(gate x) * up x)``; w1 = [gate; up],
  w2 = down;
* ``w1``, ``w2``, ``c_proj`` (Qwen): ``c_proj(w1 x * silu(w2 x))``; w1 = [w2; w1] (w2 is the gate),
  w2 = c_proj.

All children are ``nn.Linear``; the SwiGLU forms must be bias-free.  An ``act`` / ``act_fn`` /
``activation_fn`` child, if present, must be a tanh GELU (GELU form) or SiLU.

Parameters: ``gate_weight [E, H]`` (float32, DeepSpeed's ``gate.wg``), ``w1 [E, F or 2F, H]``,
``b1 [E, F]`` (GELU form only, if fc1 has a bias), ``w2 [E, H, F]``, ``b2 [E, H]``.  ``load_state_dict``
also accepts DeepSpeed's key layout (``deepspeed_moe.gate.wg.weight``,
``deepspeed_moe.experts.deepspeed_experts.{i}.<name>.weight``), so MoE-LLaVA checkpoints load, and
:meth:`MoE.deepspeed_state_dict` writes it.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..._validation import check_float
from .function import moe_ffn, moe_route
from .reference import capacity_for

_FORMS = {  # form -> (first-layer names stacked in order, second-layer name, activation)
    "fc1/fc2": (("fc1",), "fc2", "gelu_tanh"),
    "gate_proj/up_proj/down_proj": (("gate_proj", "up_proj"), "down_proj", "swiglu"),
    "w1/w2/c_proj": (("w2", "w1"), "c_proj", "swiglu"),   # Qwen: w2 is the gate, w1 the up projection
}
_DS_PREFIX = "deepspeed_moe."
_DS_GATE = "deepspeed_moe.gate.wg.weight"
_DS_EXPERT = "deepspeed_moe.experts.deepspeed_experts."
_ACT_ATTRS = ("act", "act_fn", "activation_fn", "activation")


def _linear(module: nn.Module, name: str) -> Optional[nn.Linear]:
    child = getattr(module, name, None)
    return child if isinstance(child, nn.Linear) else None


def _check_activation(expert: nn.Module, activation: str) -> None:
    for attr in _ACT_ATTRS:
        act = getattr(expert, attr, None)
        if act is None or not isinstance(act, nn.Module):
            continue
        cls = type(act).__name__
        if activation == "gelu_tanh":
            ok = (isinstance(act, nn.GELU) and act.approximate == "tanh") or any(
                s in cls for s in ("NewGELU", "GELUTanh", "FastGELU", "GeluTanh"))
        else:
            ok = isinstance(act, nn.SiLU) or "SiLU" in cls
        if not ok:
            need = ("a tanh-approximated GELU (gelu_new / nn.GELU(approximate='tanh'))"
                    if activation == "gelu_tanh" else "SiLU")
            raise ValueError(f"unsupported expert activation {attr}={cls}: the {activation} form needs {need}")


def expert_form(expert: nn.Module) -> str:
    """Which supported FFN form ``expert`` is; ``ValueError`` naming the expected children otherwise."""
    for form, (firsts, second, activation) in _FORMS.items():
        if all(_linear(expert, n) is not None for n in (*firsts, second)):
            if activation == "swiglu" and any(_linear(expert, n).bias is not None for n in (*firsts, second)):
                raise ValueError(f"unsupported expert {type(expert).__name__}: the {form} (SwiGLU) form must "
                                 "have bias-free linears")
            _check_activation(expert, activation)
            return form
    if not isinstance(expert, nn.Module):
        raise TypeError(f"expert must be an nn.Module, got {type(expert).__name__}")
    raise ValueError(
        f"unsupported expert module {type(expert).__name__} (children: {[n for n, _ in expert.named_children()]}): "
        "expected nn.Linear children fc1/fc2 (GELU MLP), gate_proj/up_proj/down_proj or w1/w2/c_proj (SwiGLU)")


def _pack(layers: dict, form: str):
    """(w1, b1, w2, b2) of one expert from its linears' weight/bias tensors by name."""
    firsts, second, _ = _FORMS[form]
    w1 = torch.cat([layers[n]["weight"] for n in firsts], 0)
    b1 = layers[firsts[0]].get("bias") if len(firsts) == 1 else None
    return w1, b1, layers[second]["weight"], layers[second].get("bias")


class MoE(nn.Module):
    """Sparse mixture-of-experts layer with DeepSpeed ``MoE`` semantics (see :mod:`mmkernels.ops.moe`).

    Args (DeepSpeed 0.19 names and defaults):
        hidden_size: H.   expert: template FFN (copied into every expert).   num_experts: E.
        k: experts per token (1, 2, or general top-k).
        capacity_factor / eval_capacity_factor: capacity ``max(ceil(S/E * cf * k), min_capacity)``
            in training / eval (k = 1: no factor k).   min_capacity: lower bound of the capacity.
        drop_tokens: False = dropless.   use_rts: k = 1 random token selection (randomness from torch's
            generator); False keeps token order.
        top2_2nd_expert_sampling: k = 2 samples the second expert with Gumbel noise (train and eval,
            as DeepSpeed does).
        ep_size > 1, use_residual, noisy_gate_policy ('Jitter', 'RSample'), use_tutel and
        enable_expert_tensor_parallelism raise ``NotImplementedError``.

    ``forward(hidden_states [..., H], used_token=None) -> (output [..., H], l_aux, exp_counts [E])``.

    Example::

        >>> ffn = nn.Sequential(); ffn.fc1 = nn.Linear(64, 256); ffn.fc2 = nn.Linear(256, 64)
        >>> moe = MoE(64, ffn, num_experts=4, k=2, capacity_factor=1.5, eval_capacity_factor=2.0,
        ...           min_capacity=0)
        >>> y, l_aux, counts = moe(torch.randn(2, 10, 64))
    """

    def __init__(self, hidden_size: int, expert: nn.Module, num_experts: int = 1, ep_size: int = 1, k: int = 1,
                 capacity_factor: float = 1.0, eval_capacity_factor: float = 1.0, min_capacity: int = 4,
                 use_residual: bool = False, noisy_gate_policy: Optional[str] = None, drop_tokens: bool = True,
                 use_rts: bool = True, use_tutel: bool = False, enable_expert_tensor_parallelism: bool = False,
                 top2_2nd_expert_sampling: bool = True) -> None:
        super().__init__()
        for name, value in (("hidden_size", hidden_size), ("num_experts", num_experts), ("ep_size", ep_size),
                            ("k", k), ("min_capacity", min_capacity)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if hidden_size < 1 or num_experts < 1:
            raise ValueError(f"hidden_size and num_experts must be >= 1, got {hidden_size}, {num_experts}")
        if num_experts % max(ep_size, 1):
            raise ValueError(f"num_experts ({num_experts}) must be divisible by ep_size ({ep_size})")
        if ep_size != 1:
            raise NotImplementedError(f"ep_size={ep_size}: expert parallelism (ep_size > 1) is not implemented")
        if use_residual:
            raise NotImplementedError("use_residual=True (residual MoE) is not implemented")
        if noisy_gate_policy not in (None, "None"):
            if noisy_gate_policy in ("Jitter", "RSample"):
                raise NotImplementedError(f"noisy_gate_policy={noisy_gate_policy!r} is not implemented")
            raise ValueError("noisy_gate_policy must be None, 'None', 'Jitter' or 'RSample', "
                             f"got {noisy_gate_policy!r}")
        if use_tutel:
            raise NotImplementedError("use_tutel=True is not implemented (the grouped-GEMM path replaces Tutel)")
        if enable_expert_tensor_parallelism:
            raise NotImplementedError("enable_expert_tensor_parallelism=True is not implemented")
        if not 1 <= k <= num_experts:
            raise ValueError(f"k must be in [1, num_experts={num_experts}], got k={k}")
        check_float("capacity_factor", capacity_factor)
        check_float("eval_capacity_factor", eval_capacity_factor)
        if capacity_factor <= 0 or eval_capacity_factor <= 0:
            raise ValueError(f"capacity_factor and eval_capacity_factor must be > 0, got {capacity_factor}, "
                             f"{eval_capacity_factor}")
        if min_capacity < 0:
            raise ValueError(f"min_capacity must be >= 0, got {min_capacity}")
        self.form = expert_form(expert)
        self.activation = _FORMS[self.form][2]
        self.hidden_size = hidden_size
        self.num_experts = num_experts
        self.ep_size = ep_size
        self.num_local_experts = num_experts // ep_size
        self.k = k
        self.capacity_factor = float(capacity_factor)
        self.eval_capacity_factor = float(eval_capacity_factor)
        self.min_capacity = int(min_capacity)
        self.drop_tokens = bool(drop_tokens)
        self.use_rts = bool(use_rts)
        self.top2_2nd_expert_sampling = bool(top2_2nd_expert_sampling)
        self.noisy_gate_policy = None

        layers = {n: {"weight": m.weight.detach(), **({"bias": m.bias.detach()} if m.bias is not None else {})}
                  for n, m in expert.named_children() if isinstance(m, nn.Linear)}
        w1, b1, w2, b2 = _pack(layers, self.form)
        if w1.shape[-1] != hidden_size or w2.shape[0] != hidden_size:
            raise ValueError(f"expert's input/output width must be hidden_size={hidden_size}, got "
                             f"{w1.shape[-1]} and {w2.shape[0]}")
        E = num_experts
        self.w1 = nn.Parameter(w1.unsqueeze(0).repeat(E, 1, 1))
        self.b1 = nn.Parameter(b1.unsqueeze(0).repeat(E, 1)) if b1 is not None else None
        self.w2 = nn.Parameter(w2.unsqueeze(0).repeat(E, 1, 1))
        self.b2 = nn.Parameter(b2.unsqueeze(0).repeat(E, 1)) if b2 is not None else None
        wg = nn.Linear(hidden_size, E, bias=False, device=w1.device, dtype=torch.float32)  # DeepSpeed's init
        self.gate_weight = nn.Parameter(wg.weight.detach())

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, num_experts={self.num_experts}, k={self.k}, form={self.form}, "
                f"ffn={self.w2.shape[-1]}, capacity_factor={self.capacity_factor}, "
                f"eval_capacity_factor={self.eval_capacity_factor}, min_capacity={self.min_capacity}, "
                f"drop_tokens={self.drop_tokens}, use_rts={self.use_rts}, "
                f"top2_2nd_expert_sampling={self.top2_2nd_expert_sampling}")

    def capacity(self, num_tokens: int) -> Optional[int]:
        """Capacity per expert for ``num_tokens`` rows in the current mode (None when dropless)."""
        if not self.drop_tokens:
            return None
        cf = self.capacity_factor if self.training else self.eval_capacity_factor
        return capacity_for(num_tokens, self.num_experts, cf, self.k, self.min_capacity)

    def route(self, x2: torch.Tensor, second_expert_noise: Optional[torch.Tensor] = None,
              token_order: Optional[torch.Tensor] = None):
        """Routing for ``x2 [S, H]``; noise / token order are drawn from torch's generator when not given."""
        S = x2.shape[0]
        logits = F.linear(x2.float(), self.gate_weight.float())
        if second_expert_noise is None and self.k == 2 and self.top2_2nd_expert_sampling:
            u = torch.rand(S, self.num_experts, device=x2.device).clamp_(min=1e-20, max=1.0 - 1e-7)
            second_expert_noise = -torch.log(-torch.log(u))                       # Gumbel(0, 1)
        if token_order is None and self.k == 1 and self.use_rts and self.drop_tokens:
            token_order = torch.argsort(torch.rand(S, device=x2.device), descending=True)
        return moe_route(logits, self.k, self.capacity(S), second_expert_noise, token_order)

    def forward(self, hidden_states: torch.Tensor, used_token: Optional[torch.Tensor] = None,
                second_expert_noise: Optional[torch.Tensor] = None, token_order: Optional[torch.Tensor] = None):
        if used_token is not None:
            raise NotImplementedError("used_token is not implemented")
        if not isinstance(hidden_states, torch.Tensor) or hidden_states.shape[-1:] != (self.hidden_size,):
            raise ValueError(f"hidden_states must be a tensor [..., {self.hidden_size}], got "
                             f"{getattr(hidden_states, 'shape', type(hidden_states).__name__)}")
        x2 = hidden_states.reshape(-1, self.hidden_size)
        routing = self.route(x2, second_expert_noise, token_order)
        y = moe_ffn(x2, routing, self.w1, self.b1, self.w2, self.b2, self.activation)
        return y.view(hidden_states.shape), routing.l_aux, routing.exp_counts

    # ------------------------------------------------------------------ DeepSpeed interop

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        ds_keys = [key for key in state_dict if key.startswith(prefix + _DS_PREFIX)]
        if ds_keys:
            layers: dict[int, dict] = {}
            for key in ds_keys:
                rest = key[len(prefix):]
                if rest == _DS_GATE:
                    state_dict[prefix + "gate_weight"] = state_dict.pop(key)
                elif rest.startswith(_DS_EXPERT):
                    idx, name, kind = rest[len(_DS_EXPERT):].split(".", 2)
                    layers.setdefault(int(idx), {}).setdefault(name, {})[kind] = state_dict.pop(key)
            if layers:
                if sorted(layers) != list(range(self.num_experts)):
                    error_msgs.append(f"DeepSpeed state dict has experts {sorted(layers)}, expected "
                                      f"0..{self.num_experts - 1}")
                else:
                    packed = [_pack(layers[i], self.form) for i in range(self.num_experts)]
                    for j, name in enumerate(("w1", "b1", "w2", "b2")):
                        if packed[0][j] is not None:
                            state_dict[prefix + name] = torch.stack([p[j] for p in packed], 0)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def deepspeed_state_dict(self) -> dict:
        """This layer's weights in DeepSpeed's key layout (relative to the MoE module)."""
        firsts, second, _ = _FORMS[self.form]
        out = {_DS_GATE: self.gate_weight.detach().clone()}
        F1 = self.w1.shape[1] // len(firsts)
        for i in range(self.num_experts):
            base = f"{_DS_EXPERT}{i}."
            for j, name in enumerate(firsts):
                out[f"{base}{name}.weight"] = self.w1[i, j * F1:(j + 1) * F1].detach().clone()
            if self.b1 is not None:
                out[f"{base}{firsts[0]}.bias"] = self.b1[i].detach().clone()
            out[f"{base}{second}.weight"] = self.w2[i].detach().clone()
            if self.b2 is not None:
                out[f"{base}{second}.bias"] = self.b2[i].detach().clone()
        return out

    @classmethod
    def from_deepspeed(cls, ds_moe: nn.Module) -> "MoE":
        """The equivalent layer of a ``deepspeed.moe.layer.MoE`` (same config, same weights)."""
        try:
            inner = ds_moe.deepspeed_moe
            gate = inner.gate
            experts = list(inner.experts.deepspeed_experts)
        except AttributeError as e:
            raise TypeError(f"ds_moe must be a deepspeed.moe.layer.MoE (deepspeed_moe.gate / "
                            f"deepspeed_moe.experts.deepspeed_experts), got {type(ds_moe).__name__}") from e
        wg = gate.wg.weight
        layer = cls(
            hidden_size=wg.shape[1], expert=experts[0], num_experts=getattr(ds_moe, "num_experts", len(experts)),
            ep_size=getattr(ds_moe, "ep_size", 1), k=gate.k, capacity_factor=gate.capacity_factor,
            eval_capacity_factor=gate.eval_capacity_factor, min_capacity=int(gate.min_capacity),
            use_residual=getattr(ds_moe, "use_residual", False),
            noisy_gate_policy=getattr(gate, "noisy_gate_policy", None),
            drop_tokens=getattr(gate, "drop_tokens", True), use_rts=getattr(gate, "use_rts", True),
            top2_2nd_expert_sampling=getattr(gate, "top2_2nd_expert_sampling", True))
        sd = {key: value for key, value in ds_moe.state_dict().items() if key.startswith(_DS_PREFIX)}
        layer.load_state_dict(sd)
        layer.train(ds_moe.training)
        return layer
