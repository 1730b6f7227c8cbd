"""``MoE``: a drop-in for ``deepspeed.moe.layer.MoE`` as MoE-LLaVA uses it.

Same constructor (DeepSpeed 0.19 names and defaults), same ``forward(hidden_states, used_token=None)
-> (output, l_aux, exp_counts)``.  The template ``expert`` (the dense FFN being upcycled) is copied
into per-expert stacked weights for the grouped GEMMs:

* ``fc1``, ``fc2`` (phi-2): ``fc2(gelu_tanh(fc1 x + b1)) + b2``; packed as w1 = fc1, w2 = fc2;
* ``gate_proj``, ``up_proj``, ``down_proj`` (StableLM-2): ``down(silu(gate x) * up x)``; w1 = [gate; up],
  w2 = down;
* ``w1``, ``w2``, ``c_proj`` (Qwen): ``c_proj(w1 x * silu(w2 x))``; w1 = [w2; w1] (w2 is the gate),
  w2 = c_proj.

The children's names only say which linears to pack.  What the expert computes is *verified*: at
construction its own ``forward`` runs on a probe input (float64 on the CPU, seeded random weights in
its linears) and must equal the packed form (:func:`~.reference.expert_ffn`) to 3e-6 relative.  An
expert that calls ``torch.relu`` or exact ``F.gelu`` in ``forward``, has extra parameters, or mixes up
gate and up is rejected with a ``ValueError`` that names its class and says what its output matches
instead.  (For the SwiGLU forms the probe also decides which linear is the gate.)

Parameters: ``gate_weight [E, H]`` (float32, DeepSpeed's ``gate.wg``), ``w1 [E, F or 2F, H]``,
``b1 [E, F]`` (GELU form only, if fc1 has a bias), ``w2 [E, H, F]``, ``b2 [E, H]``.  ``load_state_dict``
also accepts DeepSpeed's key layout (``deepspeed_moe.gate.wg.weight``,
``deepspeed_moe.experts.deepspeed_experts.{i}.<name>.weight``), so MoE-LLaVA checkpoints load, and
:meth:`MoE.deepspeed_state_dict` writes it.  Loading is as strict as ``nn.Module``'s, key by key in the
checkpoint's own names: missing and unexpected DeepSpeed keys are reported (``strict=True`` raises,
``strict=False`` returns them and loads the rest), and a wrong shape is a size-mismatch error naming
the key.

Expert parallelism (``ep_size=P > 1``, :mod:`.parallel`): rank r of the expert-parallel group holds
the global experts ``r*E/P ... (r+1)*E/P - 1`` (``w1`` etc. have ``E/P`` rows; the router
``gate_weight [E, H]`` is replicated).  Each rank routes its own tokens; the rows travel to their
experts' ranks and back with ``all_to_all_single`` (capacity mode: DeepSpeed's equal-split ``[E, C, H]``
exchange; dropless: a counts exchange, then an uneven exchange of exactly the routed rows), and both
directions are differentiable.  ``output``, ``l_aux`` and ``exp_counts`` on a rank are those of the
single-process layer on that rank's tokens.  Checkpoints: ``load_state_dict`` takes a full single-rank
state dict (all E experts, either key layout) and keeps this rank's slice, so one checkpoint loads at
any ``ep_size``; ``state_dict()`` holds this rank's experts only, under DeepSpeed's expert-parallel
checkpoint names ``deepspeed_moe.experts.deepspeed_experts.{global id}.<linear>.{weight,bias}`` (the id
``r*E/P + i``, as DeepSpeed's engine writes its ``layer_*_expert_{id}_*`` files) plus
``deepspeed_moe.gate.wg.weight``; :meth:`MoE.full_state_dict` (a collective) gathers the ``ep_size=1``
state dict on every rank.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..._utils import autocast_dtype
from ..._validation import (FLOAT_DTYPES, RUN_HOOKS, check_float, check_int, check_no_hooks, check_same_device,
                             check_tensor, module_hooks)
from . import parallel
from .function import moe_ffn, moe_route
from .reference import capacity_for, expert_ffn

_FORMS = {  # form -> (first-layer names stacked in order, second-layer name, activation)
    "fc1/fc2": (("fc1",), "fc2", "gelu_tanh"),
    "gate_proj/up_proj/down_proj": (("gate_proj", "up_proj"), "down_proj", "swiglu"),
    "w1/w2/c_proj": (("w2", "w1"), "c_proj", "swiglu"),   # Qwen: w2 is the gate, w1 the up projection
}
_DS_PREFIX = "deepspeed_moe."
_DS_GATE = "deepspeed_moe.gate.wg.weight"
_DS_EXPERT = "deepspeed_moe.experts.deepspeed_experts."
_STATE_DICT_LAYOUTS = ("packed", "deepspeed")
_NOISY_GATE_POLICIES = (None, "None", "Jitter", "RSample")
_DROP_POLICIES = ("probs", "position")

# The probe: rows of a float64 input through the expert's own forward, with these weight scales
# (first-layer pre-activations ~ N(0, 1.5^2 + 0.5^2): the range where GELU-tanh and exact GELU differ
# most: 6e-5 to 2e-4 of the output), compared at a relative tolerance between that difference and the
# 5e-8 of an expert that computes its activation in float32 internally.
_PROBE_ROWS = 8
_PROBE_SEED = 20240607
_PROBE_RTOL = 3e-6


def _linear(module: nn.Module, name: str) -> Optional[nn.Linear]:
    child = getattr(module, name, None)
    return child if isinstance(child, nn.Linear) else None


_MODULE_STATE = {"_parameters", "_buffers", "_modules", "training"}


def _tensor_layout(tensors: dict) -> dict:
    return {n: None if t is None else (tuple(t.shape), t.dtype) for n, t in tensors.items()}


def _same_structure(a: nn.Module, b: nn.Module) -> bool:
    """Same class, same plain attributes, the same parameter and buffer names, shapes and dtypes, no
    hooks and, recursively, the same children: a deep copy (any values in the parameters and buffers).
    False when unsure."""
    if type(a) is not type(b) or set(a._modules) != set(b._modules):
        return False
    if module_hooks(a, RUN_HOOKS) or module_hooks(b, RUN_HOOKS):
        return False
    if _tensor_layout(a._parameters) != _tensor_layout(b._parameters) or \
            _tensor_layout(a._buffers) != _tensor_layout(b._buffers):
        return False
    va = {k: v for k, v in vars(a).items() if k not in _MODULE_STATE and not k.endswith("hooks")}
    vb = {k: v for k, v in vars(b).items() if k not in _MODULE_STATE and not k.endswith("hooks")}
    if set(va) != set(vb):
        return False
    for key, x in va.items():
        y = vb[key]
        try:
            same = (torch.equal(x, y) if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)
                    else bool(x is y or x == y))
        except Exception:
            same = False
        if not same:
            return False
    return all((x is None and y is None) or (x is not None and y is not None and _same_structure(x, y))
               for x, y in ((a._modules[n], b._modules[n]) for n in a._modules))


# DeepSpeed's classes whose own forward MoE reproduces, recognised in a class's MRO by (module, qualname)
# without importing DeepSpeed: path inside a ``deepspeed.moe.layer.MoE`` -> class
DEEPSPEED_PARTS = {"": ("deepspeed.moe.layer", "MoE"),
                   "deepspeed_moe": ("deepspeed.moe.sharded_moe", "MOELayer"),
                   "deepspeed_moe.gate": ("deepspeed.moe.sharded_moe", "TopKGate"),
                   "deepspeed_moe.experts": ("deepspeed.moe.experts", "Experts")}


def deepspeed_class(cls: type, ident) -> Optional[type]:
    """The class in ``cls``'s MRO that is DeepSpeed's ``ident`` = (module, name), or None."""
    for base in cls.__mro__:
        if (base.__module__, base.__qualname__) == ident:
            return base
    return None


def deepspeed_forward_problem(module: nn.Module, ident) -> Optional[str]:
    """Why ``module`` would not run the forward of DeepSpeed's ``ident`` class (None when it does, or
    when its class is not DeepSpeed's at all, as a stand-in with DeepSpeed's attributes)."""
    if "forward" in vars(module):
        return "has a forward set on the instance"
    base = deepspeed_class(type(module), ident)
    if base is not None and type(module).forward is not base.forward:
        return f"class {type(module).__qualname__} overrides DeepSpeed's {ident[1]}.forward"
    return None


def _check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return value


def expert_form(expert: nn.Module) -> str:
    """Which supported FFN form ``expert``'s children name; ``ValueError`` naming the expected children
    otherwise.  This is only the naming: :class:`MoE` then verifies what ``forward`` computes."""
    if not isinstance(expert, nn.Module):
        raise TypeError(f"expert must be an nn.Module, got {type(expert).__name__}")
    for form, (firsts, second, activation) in _FORMS.items():
        if all(_linear(expert, n) is not None for n in (*firsts, second)):
            if activation == "swiglu" and any(_linear(expert, n).bias is not None for n in (*firsts, second)):
                raise ValueError(f"unsupported expert {type(expert).__name__}: the {form} (SwiGLU) form must "
                                 "have bias-free linears")
            return form
    raise ValueError(
        f"unsupported expert module {type(expert).__name__} (children: {[n for n, _ in expert.named_children()]}): "
        "expected nn.Linear children fc1/fc2 (GELU MLP), gate_proj/up_proj/down_proj or w1/w2/c_proj (SwiGLU)")


def _global_expert_key(key: str, offset: int) -> str:
    """``deepspeed_moe.experts.deepspeed_experts.{i}.rest`` -> ``...{offset + i}.rest`` (other keys as they are)."""
    if not key.startswith(_DS_EXPERT):
        return key
    index, dot, rest = key[len(_DS_EXPERT):].partition(".")
    return f"{_DS_EXPERT}{offset + int(index)}{dot}{rest}" if index.isdigit() else key


def _describe(firsts, second, activation) -> str:
    if activation == "swiglu":
        return f"{second}(silu({firsts[0]} x) * {firsts[1]} x)"
    return f"{second}({activation}({firsts[0]} x))"


def _packed(params, layout, activation, x):
    """:func:`~.reference.expert_ffn` (what the kernels compute) on ``params`` packed as ``layout``."""
    firsts, second = layout
    w1 = params[f"{firsts[0]}.weight"] if len(firsts) == 1 else torch.cat([params[f"{n}.weight"] for n in firsts], 0)
    b1 = params.get(f"{firsts[0]}.bias") if len(firsts) == 1 else None
    return expert_ffn(x, w1, b1, params[f"{second}.weight"], params.get(f"{second}.bias"), activation)


def _candidates(firsts, second, activation):
    """(description, fn(params, x) -> y, layout or None) for what the expert might compute.  A layout
    ``(firsts, second)`` marks a form mmkernels runs (fn is then the packed form itself); None, one it
    can only name in the error."""
    def lin(params, name, x):
        return F.linear(x, params[f"{name}.weight"], params.get(f"{name}.bias"))

    out = []
    if activation == "gelu_tanh":
        (f1,) = firsts
        out.append((_describe(firsts, second, activation),
                    lambda p, x: _packed(p, (firsts, second), activation, x), (firsts, second)))
        acts = {"gelu (exact erf)": F.gelu, "relu": F.relu, "silu": F.silu,
                "quick_gelu": lambda z: z * torch.sigmoid(1.702 * z), "identity": lambda z: z}
        for name, act in acts.items():
            out.append((f"{second}({name}({f1} x))", lambda p, x, act=act: lin(p, second, act(lin(p, f1, x))), None))
        return out
    for gate, up in (firsts, firsts[::-1]):   # which linear is the gate is verified, not assumed
        out.append((_describe((gate, up), second, activation),
                    lambda p, x, gate=gate, up=up: _packed(p, ((gate, up), second), activation, x), ((gate, up), second)))
        acts = {"gelu_tanh": lambda z: F.gelu(z, approximate="tanh"), "gelu (exact erf)": F.gelu, "relu": F.relu}
        for name, act in acts.items():
            out.append((f"{second}({name}({gate} x) * {up} x)",
                        lambda p, x, act=act, gate=gate, up=up: lin(p, second, act(lin(p, gate, x)) * lin(p, up, x)),
                        None))
    return out


def _probe_tensor(shape, name, firsts, gen) -> torch.Tensor:
    """A float64 probe value for parameter ``name``: N(0, 1) rows scaled by 1/sqrt(fan_in) (x1.5 in the
    first layer), 0.5 * N(0, 1) for a bias.  Only the first 67 rows (a prime, so the period aligns with
    no gate/up split) are drawn and then repeated: drawing every element of a phi-2-sized expert costs
    seconds, copying rows costs a memory write."""
    layer, kind = name.rsplit(".", 1)
    if kind == "weight" and len(shape) == 2:
        std = (1.5 if layer in firsts else 1.0) / max(shape[1], 1) ** 0.5
    else:
        std = 0.5
    rows = min(shape[0], 67) if shape else 0
    if not shape or rows == shape[0]:
        return torch.randn(shape, generator=gen, dtype=torch.float64) * std
    base = torch.randn((rows, *shape[1:]), generator=gen, dtype=torch.float64) * std
    return base.repeat(-(-shape[0] // rows), *([1] * (len(shape) - 1)))[:shape[0]]


def _check_widths(expert: nn.Module, form: str, hidden_size: int) -> None:
    """The linears chain: H -> F (each first-layer linear) -> H, with H = hidden_size."""
    firsts, second, _ = _FORMS[form]
    cls = type(expert).__name__
    for n in firsts:
        out_f, in_f = _linear(expert, n).weight.shape
        if in_f != hidden_size:
            raise ValueError(f"expert {cls}'s {n} must take hidden_size={hidden_size} inputs, got weight "
                             f"{(out_f, in_f)}")
    widths = {n: _linear(expert, n).weight.shape[0] for n in firsts}
    out_s, in_s = _linear(expert, second).weight.shape
    if out_s != hidden_size:
        raise ValueError(f"expert {cls}'s {second} must give hidden_size={hidden_size} outputs, got weight "
                         f"{(out_s, in_s)}")
    if any(w != in_s for w in widths.values()):
        raise ValueError(f"expert {cls}'s linears do not chain: {second} takes {in_s} inputs but "
                         + ", ".join(f"{n} gives {w}" for n, w in widths.items()))


def _verify_expert(expert: nn.Module, form: str, hidden_size: int):
    """Run ``expert``'s own forward on a probe and return the layout ``(firsts, second)`` whose packed
    form (:func:`~.reference.expert_ffn`) it equals; ``ValueError`` naming the expert class and what
    differed otherwise.

    The probe is float64 on the CPU with seeded random weights in the expert's linears (its own
    weights may be on another device, in a low-precision dtype, on ``meta``, or degenerate, e.g. all
    zeros), through ``torch.func.functional_call``, so the expert module itself is not touched and
    torch's global generator is not advanced."""
    cls = type(expert).__name__
    # the packed layer never calls the expert: hooks on it would not run (the probe below would run them)
    check_no_hooks("expert", expert, f"mmkernels.MoE (which copies {cls}'s weights and never calls it)")
    firsts, second, activation = _FORMS[form]
    linears = (*firsts, second)
    packable = {f"{n}.{kind}" for n in linears for kind in ("weight", "bias")}
    params = dict(expert.named_parameters())
    extra = sorted(n for n in params if n not in packable)
    if extra:
        raise ValueError(f"unsupported expert {cls}: parameters {extra} are outside the {form} linears that "
                         f"mmkernels.MoE packs ({', '.join(linears)}); its output would not be reproduced")
    with torch.device("cpu"):   # the probe runs on the CPU even under a `with torch.device(...)` block
        gen = torch.Generator(device="cpu").manual_seed(_PROBE_SEED)
        probe = {name: _probe_tensor(tuple(p.shape), name, firsts, gen) for name, p in params.items()}
        for name, b in expert.named_buffers():
            if b.device.type == "meta":
                raise ValueError(f"cannot verify expert {cls}: buffer {name!r} is on the meta device (the probe "
                                 "that checks what forward() computes needs its values)")
            probe[name] = b.detach().to("cpu", torch.float64 if b.is_floating_point() else b.dtype)
        x = torch.randn(_PROBE_ROWS, hidden_size, generator=gen, dtype=torch.float64)
        try:
            with torch.no_grad():
                got = torch.func.functional_call(expert, probe, (x,))
        except Exception as e:
            raise ValueError(f"cannot verify expert {cls}: its forward() failed on a float64 CPU probe input "
                             f"[{_PROBE_ROWS}, {hidden_size}] ({type(e).__name__}: {e}); mmkernels.MoE runs an expert "
                             f"as {_describe(firsts, second, activation)} only after checking that it computes that") from e
        if isinstance(got, tuple) and got:   # DeepSpeed's Experts keep the first element of a tuple output
            got = got[0]
        if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(x.shape):
            raise ValueError(f"unsupported expert {cls}: on a probe input of shape {tuple(x.shape)} its forward() "
                             f"returned {getattr(got, 'shape', type(got).__name__)}, expected a tensor of the same shape")
        got = got.double()
        scale = max(float(got.abs().max()), 1e-30)
        results = []
        with torch.no_grad():
            # the packed forms come first: the usual case costs one packed forward; the rest only names
            # what a rejected expert computes
            for description, fn, layout in _candidates(firsts, second, activation):
                try:
                    err = float((fn(probe, x) - got).abs().max()) / scale
                except RuntimeError:   # a diagnostic form that does not fit these shapes
                    err = float("inf")
                if layout is not None and err <= _PROBE_RTOL:
                    return layout
                results.append((err, description, layout))
    err, description, layout = min(results, key=lambda r: r[0])
    want = _describe(firsts, second, activation)
    want_err = next(e for e, d, _ in results if d == want)
    if err <= _PROBE_RTOL:
        found = f"it computes {description} instead"
    else:
        found = (f"it matches none of the forms tried (closest: {description}, relative difference {err:.1e}; "
                 "an expert that computes in reduced precision internally, or uses dropout in training mode, "
                 "cannot be verified either)")
    raise ValueError(
        f"unsupported expert {cls}: its forward() differs from the packed form {want} (its activation or "
        f"structure) by {want_err:.1e} relative (> {_PROBE_RTOL:.0e}) on a probe input: {found}; mmkernels.MoE "
        f"implements the {activation} activation for {form} experts")


class MoE(nn.Module):
    """Sparse mixture-of-experts layer with DeepSpeed ``MoE`` semantics (see :mod:`mmkernels.ops.moe`).

    Args (DeepSpeed 0.19 names and defaults):
        hidden_size: H.   expert: template FFN (copied into every expert; what its ``forward`` computes is
            verified on a probe input, see the module docstring).   num_experts: E.
        k: experts per token, ``1 <= k <= E``.
        capacity_factor / eval_capacity_factor: capacity ``max(ceil(S/E * cf * k), min_capacity)``
            in training / eval (k = 1: no factor k).   min_capacity: lower bound of the capacity; for
            k = 1 the token count S must be >= min_capacity (DeepSpeed's ``top1gating`` asserts it).
        drop_tokens: False = dropless.   use_rts: k = 1 random token selection, as DeepSpeed's
            ``top1gating``: an ``[S, E]`` uniform from torch's generator (drawn in training and eval,
            dropless too), and an over-full expert keeps its rows with the largest draws; False keeps
            the rows ``torch.topk`` picks from the 0/1 mask (see :func:`~mmkernels.moe_route`).
        top2_2nd_expert_sampling: k = 2 samples the second expert with Gumbel noise (train and eval,
            as DeepSpeed does).
        noisy_gate_policy: None / 'None'; 'RSample' is accepted for k >= 2, where DeepSpeed ignores it
            (only its ``top1gating`` reads it).  'Jitter', and 'RSample' with k = 1, raise
            ``NotImplementedError``.
        drop_policy (mmkernels only; DeepSpeed's ``MoE`` has no such argument and always runs
            ``topkgating``'s default ``'probs'``): which choices k >= 3 drops at capacity, None meaning
            DeepSpeed's (``'probs'``); ``'position'`` is ``topkgating(drop_policy='position')``.  See
            :func:`~mmkernels.moe_route`.
        state_dict_layout (mmkernels only): the keys ``state_dict()`` writes: ``"packed"`` (``gate_weight``,
            ``w1``, ``b1``, ``w2``, ``b2``) or ``"deepspeed"`` (DeepSpeed's own keys, as a DeepSpeed ``MoE`` in
            the same place would write them; what ``apply_mmkernels`` uses so a patched model's checkpoint
            keeps its keys).  ``load_state_dict`` accepts either layout whatever this says.  With
            ``ep_size > 1``, ``state_dict()`` writes DeepSpeed's expert-parallel names whatever this says
            (packed tensors of this rank's experts would mean all E under ``ep_size=1``'s keys);
            :meth:`full_state_dict` follows it.
        ep_size: expert parallelism over ``torch.distributed`` (P ranks share the E experts, see below);
            1 (the default) needs no process group.
        ep_group (mmkernels only; DeepSpeed builds it inside its engine): the expert-parallel
            ``ProcessGroup`` of ``ep_size`` ranks; group rank r holds global experts ``r*E/P ...
            (r+1)*E/P - 1``.  None builds DeepSpeed's groups from the default group (every rank of it
            must construct the layer, in the same order: ``new_group`` is a collective): consecutive
            ranks ``[i*P, (i+1)*P)`` form an expert-parallel group (``self.ep_group``), and the ranks
            holding the same experts (``{j, j+P, ...}``) its expert-data-parallel group
            (``self.expert_data_parallel_group``; None for a group you pass).  The groups are built once
            per ``ep_size`` and shared by every layer.  ``ValueError`` naming the argument when
            ``num_experts`` or the world size is not divisible by ``ep_size``, when no default process
            group is initialised, or when ``ep_group`` has another size or lacks this rank.
        use_residual, use_tutel and enable_expert_tensor_parallelism raise ``NotImplementedError``; a
        value of the wrong type or range raises ``TypeError`` / ``ValueError`` naming the argument.

    ``forward(hidden_states [..., H], used_token=None) -> (output [..., H], l_aux, exp_counts [E])``.

    Under ``torch.autocast`` ``hidden_states`` may differ from the weights' dtype, and the dtypes are
    DeepSpeed's: router logits ``F.linear(x.float(), gate_weight.float())`` (autocast runs them in its
    dtype, as in DeepSpeed's gate), the gating after them in float32, the experts' GEMMs in the
    autocast dtype (DeepSpeed's ``nn.Linear`` calls), the output in the autocast dtype, ``l_aux``
    float32.  (DeepSpeed's gating arithmetic after the logits partly follows autocast, e.g. a bf16
    softmax on CPU: values agree to the autocast dtype's rounding.)

    Expert parallelism (``ep_size > 1``): ``forward`` is a collective over ``ep_group`` (so is its
    backward); every rank routes its own tokens with the full router, and ``output``, ``l_aux`` and
    ``exp_counts`` are what the single-process layer (all E experts, the same weights) gives on this
    rank's tokens -- DeepSpeed's semantics (capacity, the auxiliary loss and the counts are local).

    * Capacity mode (``drop_tokens=True``): the ``[E, C, H]`` capacity buffer is exchanged with an
      equal-split ``all_to_all_single``, DeepSpeed's ``_AllToAll``, and the local experts run on all
      ``P*C`` rows each (zero padding included, as DeepSpeed's), so the results equal DeepSpeed's.
      Equal splits need the same C on every rank, i.e. the same token count (or one giving the same C)
      and train/eval mode; a rank without tokens takes the others' C.  A small ``all_reduce`` checks
      this first (its one host read): a mismatch, or a routing error on any rank (k = 1 with fewer than
      ``min_capacity`` tokens), raises ``ValueError`` on every rank.  In dropless mode an error raised
      on one rank only (such bad input) leaves the others waiting in the exchange until the process
      group's timeout, as with any collective.
    * Dropless (``drop_tokens=False``): one ``all_to_all_single`` of the per-expert counts ``[E]``,
      then an uneven ``all_to_all_single`` of exactly the routed rows.  Sizing the receive buffer (and
      the split lists the collective takes) needs the counts on the host: that is the one
      device-to-host synchronisation of the forward (both directions' sizes in one read), and the
      backward has none.
    * The received rows run through the fused grouped-GEMM FFN (:func:`~mmkernels.moe_ffn`, no host
      sync on the Triton backend); both exchanges are differentiable, the backward being the reverse
      all-to-all.
    * Gradients: a rank's expert gradients come from every rank's rows of its experts; the router's
      from its own tokens only.  A data-parallel engine all-reduces the router (and the rest of the
      model) over all ranks and the experts over ``expert_data_parallel_group`` only; the expert
      parameters carry DeepSpeed's ``allreduce=False`` / ``group_name="ep_size_P"`` marks, so DeepSpeed's
      engine does so.  (Plain DDP over the whole world would average different experts: don't.)
    * Checkpoints: see the module docstring (``state_dict()`` writes this rank's experts under
      DeepSpeed's expert-parallel names whatever ``state_dict_layout`` says; ``load_state_dict`` takes a
      full single-rank checkpoint or such a rank's own; :meth:`full_state_dict` gathers all E).
    * The router is replicated: construct it identically on every rank (the same seed) or load a
      checkpoint, as with DeepSpeed.

    Example::

        >>> class PhiMLP(nn.Module):          # phi-2's MLP: fc2(gelu_tanh(fc1 x))
        ...     def __init__(self, h, f):
        ...         super().__init__()
        ...         self.fc1, self.fc2 = nn.Linear(h, f), nn.Linear(f, h)
        ...     def forward(self, x):
        ...         return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))
        >>> moe = MoE(64, PhiMLP(64, 256), num_experts=4, k=2, capacity_factor=1.5, eval_capacity_factor=2.0,
        ...           min_capacity=0)
        >>> y, l_aux, counts = moe(torch.randn(2, 10, 64))
    """

    def __init__(self, hidden_size: int, expert: nn.Module, num_experts: int = 1, ep_size: int = 1, k: int = 1,
                 capacity_factor: float = 1.0, eval_capacity_factor: float = 1.0, min_capacity: int = 4,
                 use_residual: bool = False, noisy_gate_policy: Optional[str] = None, drop_tokens: bool = True,
                 use_rts: bool = True, use_tutel: bool = False, enable_expert_tensor_parallelism: bool = False,
                 top2_2nd_expert_sampling: bool = True, drop_policy: Optional[str] = None,
                 state_dict_layout: str = "packed", ep_group=None) -> None:
        super().__init__()
        # types and ranges first (ValueError / TypeError), then what is not implemented
        hidden_size = check_int("hidden_size", hidden_size, low=1)
        num_experts = check_int("num_experts", num_experts, low=1)
        ep_size = check_int("ep_size", ep_size, low=1)
        k = check_int("k", k, low=1)
        min_capacity = check_int("min_capacity", min_capacity, low=0)
        if k > num_experts:
            raise ValueError(f"k must be in [1, num_experts={num_experts}], got k={k}")
        if num_experts % ep_size:
            raise ValueError(f"num_experts ({num_experts}) must be divisible by ep_size ({ep_size}): each rank of the "
                             "expert-parallel group holds num_experts / ep_size experts")
        capacity_factor = check_float("capacity_factor", capacity_factor)
        eval_capacity_factor = check_float("eval_capacity_factor", eval_capacity_factor)
        for name, value in (("capacity_factor", capacity_factor), ("eval_capacity_factor", eval_capacity_factor)):
            if value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        for name, value in (("use_residual", use_residual), ("drop_tokens", drop_tokens), ("use_rts", use_rts),
                            ("use_tutel", use_tutel),
                            ("enable_expert_tensor_parallelism", enable_expert_tensor_parallelism),
                            ("top2_2nd_expert_sampling", top2_2nd_expert_sampling)):
            _check_bool(name, value)
        if noisy_gate_policy is not None and not isinstance(noisy_gate_policy, str):
            raise TypeError(f"noisy_gate_policy must be None or a str, got {type(noisy_gate_policy).__name__}")
        if noisy_gate_policy not in _NOISY_GATE_POLICIES:
            raise ValueError("noisy_gate_policy must be None, 'None', 'Jitter' or 'RSample', "
                             f"got {noisy_gate_policy!r}")
        if drop_policy is not None:
            if not isinstance(drop_policy, str):
                raise TypeError(f"drop_policy must be None or a str, got {type(drop_policy).__name__}")
            if drop_policy not in _DROP_POLICIES:
                raise ValueError(f"drop_policy must be None, 'probs' or 'position', got {drop_policy!r}")
            if k <= 2:
                raise ValueError(f"drop_policy={drop_policy!r} only applies to k >= 3 (DeepSpeed's topkgating); "
                                 f"k={k} uses DeepSpeed's top{k}gating, which has one fixed priority rule")
        if state_dict_layout not in _STATE_DICT_LAYOUTS:
            raise ValueError(f"state_dict_layout must be one of {_STATE_DICT_LAYOUTS}, got {state_dict_layout!r}")
        if use_residual:
            raise NotImplementedError("use_residual=True (residual MoE) is not implemented")
        if noisy_gate_policy == "Jitter":
            raise NotImplementedError("noisy_gate_policy='Jitter' (multiplicative input jitter in training) "
                                      "is not implemented")
        if noisy_gate_policy == "RSample" and k == 1:
            raise NotImplementedError("noisy_gate_policy='RSample' with k=1 (Gumbel noise on the top-1 choice "
                                      "in training) is not implemented; DeepSpeed ignores it for k >= 2")
        if use_tutel:
            raise NotImplementedError("use_tutel=True is not implemented (the grouped-GEMM path replaces Tutel)")
        if enable_expert_tensor_parallelism:
            raise NotImplementedError("enable_expert_tensor_parallelism=True is not implemented")

        self.form = expert_form(expert)
        self.activation = _FORMS[self.form][2]
        _check_widths(expert, self.form, hidden_size)
        firsts, second = _verify_expert(expert, self.form, hidden_size)
        self._firsts, self._second = tuple(firsts), second   # packing order (gate first for SwiGLU)
        # last of the checks: with ep_group=None this builds the process groups (a collective)
        self.ep_group, self.expert_data_parallel_group, self.ep_rank = parallel.resolve_ep_group(ep_size, ep_group)
        self.expert_group_name = f"ep_size_{ep_size}"   # DeepSpeed's name for these groups
        self.hidden_size = hidden_size
        self.num_experts = num_experts
        self.ep_size = ep_size
        self.num_local_experts = num_experts // ep_size
        self.k = k
        self.capacity_factor = float(capacity_factor)
        self.eval_capacity_factor = float(eval_capacity_factor)
        self.min_capacity = int(min_capacity)
        self.drop_tokens = drop_tokens
        self.use_rts = use_rts
        self.top2_2nd_expert_sampling = top2_2nd_expert_sampling
        self.noisy_gate_policy = noisy_gate_policy if noisy_gate_policy != "None" else None
        self.drop_policy = drop_policy
        self.state_dict_layout = state_dict_layout

        lin = {n: _linear(expert, n) for n in (*self._firsts, self._second)}
        w1 = torch.cat([lin[n].weight.detach() for n in self._firsts], 0) if len(self._firsts) > 1 else \
            lin[self._firsts[0]].weight.detach()
        b1 = lin[self._firsts[0]].bias
        w2, b2 = lin[self._second].weight.detach(), lin[self._second].bias
        E = self.num_local_experts   # this rank's experts (all of them when ep_size=1)
        self.w1 = nn.Parameter(w1.unsqueeze(0).repeat(E, 1, 1))
        self.b1 = nn.Parameter(b1.detach().unsqueeze(0).repeat(E, 1)) if b1 is not None else None
        self.w2 = nn.Parameter(w2.unsqueeze(0).repeat(E, 1, 1))
        self.b2 = nn.Parameter(b2.detach().unsqueeze(0).repeat(E, 1)) if b2 is not None else None
        wg = nn.Linear(hidden_size, num_experts, bias=False, device=w1.device, dtype=torch.float32)  # DeepSpeed's init
        self.gate_weight = nn.Parameter(wg.weight.detach())
        self._mark_expert_parameters()

    def _mark_expert_parameters(self) -> None:
        if self.ep_size > 1:
            # what DeepSpeed's Experts set: a DeepSpeed engine reduces these gradients only within the
            # expert-data-parallel group of that name, not over the whole data-parallel world
            for p in self.expert_parameters():
                p.allreduce = False
                p.group_name = self.expert_group_name

    def expert_parameters(self) -> list:
        """This rank's expert weights and biases (``w1``, ``b1``, ``w2``, ``b2``; the router is not one)."""
        return [p for p in (self.w1, self.b1, self.w2, self.b2) if p is not None]

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, num_experts={self.num_experts}, k={self.k}, form={self.form}, "
                + (f"ep_size={self.ep_size}, ep_rank={self.ep_rank}, " if self.ep_size > 1 else "")
                + f"ffn={self.w2.shape[-1]}, capacity_factor={self.capacity_factor}, "
                f"eval_capacity_factor={self.eval_capacity_factor}, min_capacity={self.min_capacity}, "
                f"drop_tokens={self.drop_tokens}, use_rts={self.use_rts}, "
                f"top2_2nd_expert_sampling={self.top2_2nd_expert_sampling}"
                + (f", noisy_gate_policy={self.noisy_gate_policy!r}" if self.noisy_gate_policy else "")
                + (f", drop_policy={self.drop_policy!r}" if self.drop_policy else ""))

    def capacity(self, num_tokens: int) -> Optional[int]:
        """Capacity per expert for ``num_tokens`` rows in the current mode (None when dropless)."""
        if not self.drop_tokens:
            return None
        cf = self.capacity_factor if self.training else self.eval_capacity_factor
        return capacity_for(num_tokens, self.num_experts, cf, self.k, self.min_capacity)

    def route(self, x2: torch.Tensor, second_expert_noise: Optional[torch.Tensor] = None,
              token_order: Optional[torch.Tensor] = None):
        """Routing for ``x2 [S, H]``; the second-expert noise (k = 2) and the random token selection draw
        (k = 1, ``use_rts``; a given ``token_order`` replaces it) come from torch's generator, as DeepSpeed's."""
        S = x2.shape[0]
        if self.k == 1 and 0 < S < self.min_capacity:
            # DeepSpeed's top1gating: assert logits.shape[0] >= min_capacity (whether or not it drops);
            # an empty input has nothing to route and gives an empty output
            raise ValueError(f"k=1 needs at least min_capacity={self.min_capacity} tokens, got {S}: DeepSpeed's "
                             "top1gating asserts this; set min_capacity=0 or pass more tokens")
        if second_expert_noise is not None and self.k != 2:
            raise ValueError(f"second_expert_noise is the Gumbel sample of DeepSpeed's top2gating (k=2); this layer "
                             f"has k={self.k}, whose DeepSpeed gating takes no noise")
        logits = F.linear(x2.float(), self.gate_weight.float())
        if second_expert_noise is None and self.k == 2 and self.top2_2nd_expert_sampling:
            u = torch.rand(S, self.num_experts, device=x2.device).clamp_(min=1e-20, max=1.0 - 1e-7)
            second_expert_noise = -torch.log(-torch.log(u))                       # Gumbel(0, 1)
        rts_uniform = None
        if token_order is None and self.k == 1 and self.use_rts:
            # DeepSpeed's top1gating draws this whenever use_rts (training and eval, dropless too), so
            # the random stream stays where DeepSpeed's would be; an over-full expert keeps its C rows
            # with the largest draws (moe_route's "rts" policy, DeepSpeed's torch.topk call)
            rts_uniform = torch.rand(S, self.num_experts, device=x2.device)
        capacity = self.capacity(S) if S > 0 else None   # no rows: nothing to drop (and no min_capacity rule)
        if self.k >= 3 and self.drop_tokens:   # topkgating's policy (None: its default, 'probs')
            return moe_route(logits, self.k, capacity, second_expert_noise, token_order,
                             drop_policy=self.drop_policy or "probs")
        return moe_route(logits, self.k, capacity, second_expert_noise, token_order, rts_uniform=rts_uniform)

    def forward(self, hidden_states: torch.Tensor, used_token: Optional[torch.Tensor] = None,
                second_expert_noise: Optional[torch.Tensor] = None, token_order: Optional[torch.Tensor] = None):
        if used_token is not None:
            raise NotImplementedError("used_token is not implemented")
        check_tensor("hidden_states", hidden_states, min_ndim=1, dtypes=FLOAT_DTYPES)
        if hidden_states.shape[-1:] != (self.hidden_size,):
            raise ValueError(f"hidden_states must be a tensor [..., {self.hidden_size}], got "
                             f"{tuple(hidden_states.shape)}")
        if hidden_states.dtype != self.w1.dtype and autocast_dtype(hidden_states.device) is None:
            # (under autocast the router and the experts cast as DeepSpeed's do: see the class docstring)
            raise TypeError(f"hidden_states has dtype {hidden_states.dtype} but the expert weights are "
                            f"{self.w1.dtype}; convert one (e.g. moe.to({hidden_states.dtype})) or run under "
                            "torch.autocast")
        check_same_device([("hidden_states", hidden_states), ("gate_weight", self.gate_weight), ("w1", self.w1)])
        x2 = hidden_states.reshape(-1, self.hidden_size)
        capacity = None
        if self.ep_size > 1 and self.drop_tokens:
            # before routing, so that every rank raises the same error (no rank left waiting in a collective)
            capacity = parallel.agree_capacity(self.capacity, x2.shape[0], self.ep_group, x2.device)
        routing = self.route(x2, second_expert_noise, token_order)
        # the output is never a view (see moe_ffn): FSDP2 hooks it, and a residual `y += x` must keep that hook
        if self.ep_size > 1:
            y = parallel.expert_parallel_ffn(x2, routing, self.w1, self.b1, self.w2, self.b2, self.activation,
                                             self.ep_group, capacity, out_shape=hidden_states.shape)
        else:
            y = moe_ffn(hidden_states, routing, self.w1, self.b1, self.w2, self.b2, self.activation)
        return y, routing.l_aux, routing.exp_counts

    # ------------------------------------------------------------------ DeepSpeed interop

    def _deepspeed_expert_keys(self, experts=None) -> dict:
        """DeepSpeed expert key (relative to the MoE module) -> (packed parameter, index, row slice) for
        ``experts``, pairs ``(global expert id, index into the packed tensors)``; by default this rank's
        experts ``(ep_rank*L + i, i)``, named by their global ids as DeepSpeed's EP checkpoints name them."""
        if experts is None:
            L = self.num_local_experts
            experts = [(self.ep_rank * L + i, i) for i in range(L)]
        F1 = self.w1.shape[1] // len(self._firsts)
        keys = {}
        for g, i in experts:
            base = f"{_DS_EXPERT}{g}."
            for j, name in enumerate(self._firsts):
                keys[f"{base}{name}.weight"] = ("w1", i, slice(j * F1, (j + 1) * F1))
            if self.b1 is not None:
                keys[f"{base}{self._firsts[0]}.bias"] = ("b1", i, slice(None))
            keys[f"{base}{self._second}.weight"] = ("w2", i, slice(None))
            if self.b2 is not None:
                keys[f"{base}{self._second}.bias"] = ("b2", i, slice(None))
        return keys

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """Translate DeepSpeed's key layout into the packed parameters, key by key.

        Every expected DeepSpeed key that is absent goes to ``missing_keys`` under its DeepSpeed name
        (the packed slice keeps its current value, as ``nn.Module`` leaves a missing parameter alone);
        a present key of the wrong shape is a size-mismatch error naming it; a key under
        ``deepspeed_moe.`` that this layer does not have (another linear, an expert index >= E, a bias
        the form has not) stays in ``state_dict``, so ``nn.Module`` reports it as unexpected.
        """
        if self.ep_size > 1:
            self._slice_packed_keys(state_dict, prefix, error_msgs)
        if any(key.startswith(prefix + _DS_PREFIX) for key in state_dict):
            self._translate_deepspeed_keys(state_dict, prefix, strict, missing_keys, error_msgs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self._mark_expert_parameters()   # assign=True replaced the Parameters

    def _translate_deepspeed_keys(self, state_dict, prefix, strict, missing_keys, error_msgs):
        gate_key, native_gate = prefix + _DS_GATE, prefix + "gate_weight"
        if gate_key in state_dict:
            if native_gate in state_dict:
                error_msgs.append(f"state dict has both {gate_key} (DeepSpeed layout) and {native_gate}; "
                                  "give the router weight once")
                state_dict.pop(gate_key)
            else:
                state_dict[native_gate] = state_dict.pop(gate_key)
        elif native_gate not in state_dict:
            if strict:
                missing_keys.append(gate_key)
            state_dict[native_gate] = self.gate_weight.detach()   # not reported a second time as gate_weight

        expected = {prefix + key: target for key, target in self._deepspeed_expert_keys().items()}
        if not any(key.startswith(prefix + _DS_EXPERT) for key in state_dict):
            return   # only the gate is in DeepSpeed's layout; the experts (if any) in the packed one
        if self.ep_size > 1:
            # a full checkpoint holds the other ranks' experts too: this rank takes its slice and leaves
            # theirs (any key an expert < num_experts has); other names stay, so they are unexpected
            others = self._deepspeed_expert_keys([(g, g) for g in range(self.num_experts)])
            for key in others:
                if prefix + key not in expected:
                    state_dict.pop(prefix + key, None)
        native = [n for n in ("w1", "b1", "w2", "b2") if getattr(self, n) is not None]
        both = [prefix + n for n in native if prefix + n in state_dict]
        if both:
            error_msgs.append(f"state dict has DeepSpeed expert keys ({prefix}{_DS_EXPERT}...) and the packed "
                              f"key(s) {both}; give the expert weights in one layout")
            return
        pieces, complete = {}, True
        for key, (pname, i, rows) in expected.items():
            if key not in state_dict:
                complete = False
                if strict:
                    missing_keys.append(key)
                continue
            value = state_dict.pop(key)
            want = getattr(self, pname)[i, rows].shape
            if not isinstance(value, torch.Tensor) or value.shape != want:
                complete = False
                error_msgs.append(f"size mismatch for {key}: copying a param with shape "
                                  f"{tuple(getattr(value, 'shape', ())) if isinstance(value, torch.Tensor) else type(value).__name__} "
                                  f"from checkpoint, the shape in current model is {tuple(want)} "
                                  f"(expert {self.ep_rank * self.num_local_experts + i}'s part of the packed {pname} "
                                  f"{tuple(getattr(self, pname).shape)}).")
                continue
            pieces[key] = value
        if complete:
            # every piece present: build the packed tensors from the checkpoint's own tensors (works with
            # assign=True and with a layer constructed on the meta device)
            by_param = {n: [[] for _ in range(self.num_local_experts)] for n in native}
            for key, (pname, i, _) in expected.items():
                by_param[pname][i].append(pieces[key])
            for n in native:
                state_dict[prefix + n] = torch.stack([torch.cat(parts, 0) for parts in by_param[n]], 0)
            return
        # partial (strict=False, or errors reported above): current values with the given pieces copied in
        packed = {n: getattr(self, n).detach().clone() for n in native}
        with torch.no_grad():
            for key, value in pieces.items():
                pname, i, rows = expected[key]
                packed[pname][i, rows].copy_(value)
        for n in native:
            state_dict[prefix + n] = packed[n]

    def _slice_packed_keys(self, state_dict, prefix, error_msgs):
        """ep_size > 1: a packed key (``w1`` ...) of a full single-rank checkpoint holds all E experts; keep
        this rank's L.  Any other expert count is an error naming the key (the current value stays)."""
        L, r = self.num_local_experts, self.ep_rank
        for n in ("w1", "b1", "w2", "b2"):
            key = prefix + n
            if key not in state_dict or getattr(self, n) is None:
                continue
            value = state_dict[key]
            if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == self.num_experts:
                state_dict[key] = value[r * L:(r + 1) * L]
            else:
                error_msgs.append(f"size mismatch for {key}: with ep_size={self.ep_size} a packed {n} must hold all "
                                  f"num_experts={self.num_experts} experts (a full single-rank checkpoint; this rank "
                                  f"keeps experts {r * L}..{(r + 1) * L - 1}), got shape "
                                  f"{tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__}")
                state_dict[key] = getattr(self, n).detach()

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self.state_dict_layout == "packed" and self.ep_size == 1:
            super()._save_to_state_dict(destination, prefix, keep_vars)
            return
        for key, value in self._deepspeed_tensors(keep_vars).items():
            destination[prefix + key] = value

    def _deepspeed_tensors(self, keep_vars: bool = False, packed=None, gate=None, experts=None) -> dict:
        # each expert's slice is its own tensor (a clone), as DeepSpeed's separate parameters are, so
        # safetensors and sharded checkpointing see no shared storage; keep_vars keeps the autograd link
        def piece(t):
            return t if keep_vars else t.detach().clone()
        if packed is None:
            packed = {n: getattr(self, n) for n in ("w1", "b1", "w2", "b2")}
        if gate is None:
            gate = self.gate_weight if keep_vars else self.gate_weight.detach()
        out = {_DS_GATE: gate}
        for key, (pname, i, rows) in self._deepspeed_expert_keys(experts).items():
            out[key] = piece(packed[pname][i, rows])
        return out

    def deepspeed_state_dict(self) -> dict:
        """This layer's weights in DeepSpeed's key layout (relative to the MoE module).  With ep_size > 1:
        this rank's experts under their global ids (DeepSpeed's expert-parallel checkpoint names), like
        ``state_dict()``; :meth:`full_state_dict` gathers all of them."""
        return self._deepspeed_tensors(gate=self.gate_weight.detach().clone())

    def full_state_dict(self) -> dict:
        """The full single-rank state dict: all E experts, in the keys ``ep_size=1`` writes for this
        ``state_dict_layout`` (packed ``gate_weight``/``w1``/... with E experts, or DeepSpeed's keys with
        experts 0..E-1), on every rank; tensors are detached copies.

        A collective over ``ep_group`` when ep_size > 1 (``all_gather`` of the expert tensors): every rank
        of the group must call it.  The router is replicated, so this rank's copy is used.  What it
        returns loads into a layer of any ``ep_size`` (each rank keeps its slice)."""
        packed = {n: getattr(self, n).detach() for n in ("w1", "b1", "w2", "b2") if getattr(self, n) is not None}
        if self.ep_size > 1:
            packed = {n: parallel.gather_experts(t, self.ep_group) for n, t in packed.items()}   # new tensors
        gate = self.gate_weight.detach().clone()
        if self.state_dict_layout == "packed":
            return {**{n: t.clone() if self.ep_size == 1 else t for n, t in packed.items()}, "gate_weight": gate}
        # _deepspeed_tensors copies each expert's slice: no copy of the packed tensors first
        return self._deepspeed_tensors(packed=packed, gate=gate,
                                       experts=[(g, g) for g in range(self.num_experts)])

    @classmethod
    def from_deepspeed(cls, ds_moe: nn.Module, state_dict_layout: str = "packed") -> "MoE":
        """The equivalent layer of a ``deepspeed.moe.layer.MoE`` (same config, same weights).

        Every DeepSpeed option is passed through, so one this layer does not compute as DeepSpeed does
        raises (``NotImplementedError`` naming it); the template expert is verified like a constructor
        argument, and the weights load strictly.

        A DeepSpeed layer built with ``ep_size > 1`` gives an expert-parallel layer on the same group (its
        ``deepspeed_moe.ep_group``; DeepSpeed's layout built from the default group when it has none yet)
        holding the same local experts, which DeepSpeed names ``0 .. L-1`` in memory and this layer by
        their global ids.  Collective then: every rank of the group converts its layer."""
        try:
            inner = ds_moe.deepspeed_moe
            gate = inner.gate
            experts = list(inner.experts.deepspeed_experts)
        except AttributeError as e:
            raise TypeError(f"ds_moe must be a deepspeed.moe.layer.MoE (deepspeed_moe.gate / "
                            f"deepspeed_moe.experts.deepspeed_experts), got {type(ds_moe).__name__}") from e
        if not experts:
            raise ValueError("ds_moe has no experts (deepspeed_moe.experts.deepspeed_experts is empty)")
        # what this layer would not reproduce: hooks anywhere in the DeepSpeed layer (every expert's
        # included), and a DeepSpeed part whose forward is not DeepSpeed's own
        check_no_hooks("ds_moe", ds_moe, "the converted layer (it copies the weights and runs its own kernels)")
        for path, ident in DEEPSPEED_PARTS.items():
            problem = deepspeed_forward_problem(ds_moe.get_submodule(path), ident)
            if problem:
                raise ValueError(f"ds_moe{'.' + path if path else ''} {problem}; mmkernels.MoE reproduces "
                                 "DeepSpeed's own forward only")
        kinds = {type(ex).__name__ for ex in experts}
        if len(kinds) != 1:
            raise ValueError(f"ds_moe's experts must all be copies of one template, got classes {sorted(kinds)}")
        wg = gate.wg.weight
        ep_size = getattr(ds_moe, "ep_size", 1)
        num_experts = getattr(ds_moe, "num_experts", len(experts) * ep_size)
        if isinstance(ep_size, int) and ep_size >= 1 and len(experts) * ep_size != num_experts:
            raise ValueError(f"ds_moe holds {len(experts)} experts but num_experts={num_experts} with "
                             f"ep_size={ep_size} means {num_experts // ep_size} per rank")
        # The constructor draws a router init that the loaded weights then replace: under a forked
        # generator, so converting a layer leaves torch's random stream (dropout, the Gumbel sampling of
        # training) where the unconverted model would have it
        device = next((p.device for p in experts[0].parameters()), torch.device("cpu"))
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            layer = cls(
                hidden_size=wg.shape[1], expert=experts[0], num_experts=num_experts, ep_size=ep_size,
                ep_group=getattr(inner, "ep_group", None) if ep_size != 1 else None, k=gate.k,
                capacity_factor=gate.capacity_factor,
                eval_capacity_factor=gate.eval_capacity_factor, min_capacity=int(gate.min_capacity),
                use_residual=bool(getattr(ds_moe, "use_residual", False)),
                noisy_gate_policy=getattr(gate, "noisy_gate_policy", None),
                drop_tokens=bool(getattr(gate, "drop_tokens", True)), use_rts=bool(getattr(gate, "use_rts", True)),
                enable_expert_tensor_parallelism=bool(getattr(ds_moe, "enable_expert_tensor_parallelism", False)),
                top2_2nd_expert_sampling=bool(getattr(gate, "top2_2nd_expert_sampling", True)),
                drop_policy=getattr(gate, "drop_policy", None) if gate.k >= 3 else None,
                state_dict_layout=state_dict_layout)
        for i, ex in enumerate(experts[1:], 1):
            # DeepSpeed's experts are deep copies of one template: verified once, unless one was changed
            # (another class, attribute, parameter layout or child); each of them loads strictly below
            if not _same_structure(ex, experts[0]):
                try:
                    form = expert_form(ex)
                    _check_widths(ex, form, layer.hidden_size)
                    layout = _verify_expert(ex, form, layer.hidden_size)
                except (TypeError, ValueError) as e:
                    raise type(e)(f"ds_moe's expert {i}: {e}") from e
                if form != layer.form or layout != (layer._firsts, layer._second):
                    raise ValueError(f"ds_moe's expert {i} ({type(ex).__name__}) computes a different form from "
                                     f"expert 0 ({layer.form}, {_describe(layer._firsts, layer._second, layer.activation)})")
                dtypes = {n: p.dtype for n, p in experts[0].named_parameters()}
                for n, p in ex.named_parameters():
                    if p.dtype != dtypes.get(n, p.dtype):
                        raise ValueError(f"ds_moe's expert {i}'s {n} is {p.dtype} but expert 0's is {dtypes[n]}; "
                                         "mmkernels.MoE packs every expert's weights into one tensor")
        sd = {key: value for key, value in ds_moe.state_dict().items() if key.startswith(_DS_PREFIX)}
        if layer.ep_size > 1:
            # a DeepSpeed layer names its local experts 0..L-1 in memory; its EP checkpoints (and this
            # layer) name them by global id ep_rank*L + i
            offset = layer.ep_rank * layer.num_local_experts
            sd = {_global_expert_key(key, offset): value for key, value in sd.items()}
        layer.load_state_dict(sd)
        layer.train(ds_moe.training)
        return layer
