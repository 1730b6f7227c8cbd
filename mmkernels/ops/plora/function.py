"""The PLoRA custom ops, their autograd formula, and the public functional API.

Three ops in the ``mmkernels`` namespace (Triton kernels on CUDA, the Triton interpreter on CPU):

* ``plora_forward(x, weight, bias, lora_a, lora_b, im_mask, tile_flags, scaling, dropout_p,
  dropout_seed, check_metadata=True, dropout_keep_bits=None) -> (y, lora_hidden)`` with ``x [M, K]``
  and ``im_mask [M]``;
* ``plora_backward(..., check_metadata=True, dropout_keep_bits=None) -> (dx, dW0, db0, dA, dB)``;
* ``plora_dropout_keep_bits(im_mask, tile_flags, dropout_seed, in_features, dropout_p)``: the dropout
  keep-mask of the visual rows, drawn once per step and packed (int32 ``[M, cdiv(K, 32)]``,
  :func:`launch.dropout_keep_bits`); the forward reads it and the autograd formula saves it for the
  backward.  Where the ops get no bits, they draw the same ones themselves.

:class:`PLoRAFunction` is the single statement of the gradient; it is registered as the autograd
formula of ``plora_forward`` so the op differentiates the same way in eager mode and under
``torch.compile``, and ``torch.library.opcheck`` passes.

With ``check_metadata=True`` (the default) the ops check what they are given: the structure (shapes,
dtypes, devices, the mask's layout, the seed) and the values of ``tile_flags``, which must equal
``launch.tile_flags(im_mask)`` -- the kernels skip the LoRA term of a tile whose count is 0 -- at the
cost of one host sync.  ``check_metadata=False`` trusts everything: it is for callers that built the
arguments themselves.  :func:`plora_linear` validates its public inputs, derives the mask, flags and
seed in the same call and passes False (no sync, no second validation); the autograd backward passes
False too (its inputs are the forward's, saved).
"""
from __future__ import annotations

import torch

from ..._library import define_op
from ..._validation import (FLOAT_DTYPES, check_float, check_same_device, check_same_dtype, check_shape,
                            check_tensor)
from ...backend import require_triton, resolve_backend
from ..._utils import autocast_dtype, cdiv
from . import launch
from .kernels import FLAG_ROWS
from .reference import plora_linear_reference


def _check_op_args(x, weight, bias, lora_a, lora_b, im_mask, tile_flags, dropout_p, dropout_seed):
    """Structural checks of the raw ops' arguments (no host sync): the kernels index with these
    shapes and read the mask and the flags as contiguous arrays."""
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES)
    M, K = x.shape
    check_tensor("weight", weight, ndim=2, dtypes=FLOAT_DTYPES)
    N = weight.shape[0]
    check_shape("weight", weight, (N, K), f"in_features K={K}")
    check_tensor("lora_a", lora_a, ndim=2, dtypes=FLOAT_DTYPES)
    R = lora_a.shape[0]
    check_shape("lora_a", lora_a, (R, K), f"in_features K={K}")
    check_tensor("lora_b", lora_b, ndim=2, dtypes=FLOAT_DTYPES)
    check_shape("lora_b", lora_b, (N, R), f"out_features N={N}, rank r={R}")
    if bias is not None:
        check_tensor("bias", bias, ndim=1, dtypes=FLOAT_DTYPES)
        check_shape("bias", bias, (N,), f"out_features N={N}")
    check_tensor("im_mask", im_mask, ndim=1, dtypes=(torch.bool,))
    check_shape("im_mask", im_mask, (M,), "one flag per row of x")
    if M and not im_mask.is_contiguous():
        raise ValueError("im_mask must be contiguous (the kernels read it as a flat array)")
    check_tensor("tile_flags", tile_flags, ndim=1, dtypes=(torch.int32,))
    check_shape("tile_flags", tile_flags, (cdiv(M, FLAG_ROWS),), f"launch.tile_flags(im_mask): cdiv(M={M}, "
                f"{FLAG_ROWS})")
    if tile_flags.numel() and not tile_flags.is_contiguous():
        raise ValueError("tile_flags must be contiguous")
    check_float("dropout_p", dropout_p, low=0.0, high=1.0)
    if dropout_seed is not None:
        check_tensor("dropout_seed", dropout_seed, dtypes=(torch.int64,))
        if dropout_seed.numel() != 1:
            raise ValueError(f"dropout_seed must hold exactly one int64, got shape {tuple(dropout_seed.shape)}")
    elif dropout_p > 0:
        raise ValueError(f"dropout_p={dropout_p} > 0 needs a dropout_seed (an int64 tensor of one element)")
    check_same_dtype([("x", x), ("weight", weight), ("bias", bias), ("lora_a", lora_a), ("lora_b", lora_b)])
    check_same_device([("x", x), ("weight", weight), ("bias", bias), ("lora_a", lora_a), ("lora_b", lora_b),
                       ("im_mask", im_mask), ("tile_flags", tile_flags), ("dropout_seed", dropout_seed)])


def _check_tile_flags_values(im_mask, tile_flags):
    """The flags the kernels trust to skip text tiles must be the mask's (one host sync)."""
    if not torch.equal(tile_flags, launch.tile_flags(im_mask)):
        raise ValueError("tile_flags do not match im_mask: pass launch.tile_flags(im_mask) (per "
                         f"{FLAG_ROWS}-row group, the number of visual rows)")


def _check_keep_bits(x, dropout_keep_bits):
    """The packed keep-mask a caller passes must have the shape :func:`launch.dropout_keep_bits` gives."""
    if dropout_keep_bits is not None:
        M, K = x.shape
        check_tensor("dropout_keep_bits", dropout_keep_bits, ndim=2, dtypes=(torch.int32,))
        check_shape("dropout_keep_bits", dropout_keep_bits, (M, cdiv(K, 32)),
                    f"launch.dropout_keep_bits(...): [M={M}, cdiv(K={K}, 32)]")
        if dropout_keep_bits.numel() and dropout_keep_bits.stride(1) != 1:
            raise ValueError("dropout_keep_bits must have contiguous rows (stride 1 along its words)")
        check_same_device([("x", x), ("dropout_keep_bits", dropout_keep_bits)])


def _forward_impl(x, weight, bias, lora_a, lora_b, im_mask, tile_flags, scaling, dropout_p, dropout_seed,
                  check_metadata=True, dropout_keep_bits=None):
    require_triton(x.device, x.dtype)  # the op *is* the Triton path
    if check_metadata:
        _check_op_args(x, weight, bias, lora_a, lora_b, im_mask, tile_flags, dropout_p, dropout_seed)
        _check_keep_bits(x, dropout_keep_bits)
        _check_tile_flags_values(im_mask, tile_flags)
    return launch.plora_forward(x, weight, bias, lora_a, lora_b, im_mask, tile_flags, scaling, dropout_p,
                                dropout_seed, dropout_keep_bits)


def _forward_fake(x, weight, bias, lora_a, lora_b, im_mask, tile_flags, scaling, dropout_p, dropout_seed,
                  check_metadata=True, dropout_keep_bits=None):
    M = x.shape[0]
    return x.new_empty((M, weight.shape[0])), x.new_empty((M, lora_a.shape[0]))


def _backward_impl(grad_y, x, weight, lora_a, lora_b, lora_hidden, im_mask, tile_flags, scaling, dropout_p,
                   dropout_seed, output_mask, check_metadata=True, dropout_keep_bits=None):
    require_triton(x.device, x.dtype)  # the op *is* the Triton path
    if check_metadata:
        _check_op_args(x, weight, None, lora_a, lora_b, im_mask, tile_flags, dropout_p, dropout_seed)
        _check_keep_bits(x, dropout_keep_bits)
        M, N, R = x.shape[0], weight.shape[0], lora_a.shape[0]
        check_tensor("grad_y", grad_y, ndim=2, dtypes=(x.dtype,))
        check_shape("grad_y", grad_y, (M, N), "the forward output y [M, N]")
        check_tensor("lora_hidden", lora_hidden, ndim=2, dtypes=(x.dtype,))
        check_shape("lora_hidden", lora_hidden, (M, R), "the forward's second output S [M, r]")
        check_same_device([("x", x), ("grad_y", grad_y), ("lora_hidden", lora_hidden)])
        _check_tile_flags_values(im_mask, tile_flags)
    return launch.plora_backward(grad_y, x, weight, lora_a, lora_b, lora_hidden, im_mask, tile_flags, scaling,
                                 dropout_p, dropout_seed, output_mask, dropout_keep_bits)


def _backward_fake(grad_y, x, weight, lora_a, lora_b, lora_hidden, im_mask, tile_flags, scaling, dropout_p,
                   dropout_seed, output_mask, check_metadata=True, dropout_keep_bits=None):
    def maybe(flag, shape):
        return x.new_empty(shape) if flag else x.new_empty(0)

    N, K = weight.shape
    R = lora_a.shape[0]
    return (maybe(output_mask[0], x.shape), maybe(output_mask[1], (N, K)), maybe(output_mask[2], (N,)),
            maybe(output_mask[3], (R, K)), maybe(output_mask[4], (N, R)))


plora_forward_op = define_op(
    "plora_forward",
    "(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, Tensor im_mask, "
    "Tensor tile_flags, float scaling, float dropout_p, Tensor? dropout_seed, bool check_metadata=True, "
    "Tensor? dropout_keep_bits=None) -> (Tensor, Tensor)",
    _forward_impl, _forward_fake)

plora_backward_op = define_op(
    "plora_backward",
    "(Tensor grad_y, Tensor x, Tensor weight, Tensor lora_a, Tensor lora_b, Tensor lora_hidden, "
    "Tensor im_mask, Tensor tile_flags, float scaling, float dropout_p, Tensor? dropout_seed, "
    "bool[5] output_mask, bool check_metadata=True, Tensor? dropout_keep_bits=None) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    _backward_impl, _backward_fake, backward_of="plora_linear")


def _keep_bits_impl(im_mask, tile_flags, dropout_seed, in_features, dropout_p):
    require_triton(im_mask.device, torch.float16)
    return launch.dropout_keep_bits(im_mask, tile_flags, dropout_seed, im_mask.shape[0], in_features, dropout_p)


def _keep_bits_fake(im_mask, tile_flags, dropout_seed, in_features, dropout_p):
    return im_mask.new_empty((im_mask.shape[0], cdiv(in_features, 32)), dtype=torch.int32)


# the dropout keep-mask of the visual rows, drawn once per training step and packed (32 columns per
# int32 word); the forward reads it and saves it for the backward (its inputs are plora_linear's own)
plora_dropout_keep_bits_op = define_op(
    "plora_dropout_keep_bits",
    "(Tensor im_mask, Tensor tile_flags, Tensor dropout_seed, int in_features, float dropout_p) -> Tensor",
    _keep_bits_impl, _keep_bits_fake)


class PLoRAFunction(torch.autograd.Function):
    """Autograd for the fused PLoRA forward (math in ``kernels.py``)::

        S   = dropout(x[m]) @ A.T                 (saved; the keep-mask too, as packed bits)
        dB  = s * dY[m].T @ S
        dS  = s * dY[m] @ B
        dA  = dS.T @ dropout(x[m])
        dX  = dY @ W0;  dX[m] += (dS @ A) * keep / (1 - p)
        dW0 = dY.T @ x;  db0 = dY.sum(0)
    """

    @staticmethod
    def forward(x, weight, bias, lora_a, lora_b, im_mask, tile_flags, scaling, dropout_p, dropout_seed,
                check_metadata=True, dropout_keep_bits=None):
        return plora_forward_op(x, weight, bias, lora_a, lora_b, im_mask, tile_flags, scaling, dropout_p,
                                dropout_seed, check_metadata, dropout_keep_bits)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, lora_a, lora_b, im_mask, tile_flags, scaling, dropout_p, dropout_seed = inputs[:10]
        _, lora_hidden = output
        # S is an auxiliary output kept for the backward; the formula below has no term for a
        # gradient flowing into it, so it is marked non-differentiable rather than silently dropped.
        ctx.mark_non_differentiable(lora_hidden)
        # the packed keep-mask the forward read (None where the caller left the forward to draw it: the
        # backward then draws it again, bit-identically)
        keep_bits = inputs[11] if len(inputs) > 11 else None
        ctx.save_for_backward(x, weight, lora_a, lora_b, lora_hidden, im_mask, tile_flags, dropout_seed, keep_bits)
        ctx.scaling = scaling
        ctx.dropout_p = dropout_p
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx, grad_y, grad_hidden):
        x, weight, lora_a, lora_b, lora_hidden, im_mask, tile_flags, dropout_seed, keep_bits = ctx.saved_tensors
        need = ctx.needs_input_grad
        output_mask = [need[0], need[1], bool(need[2] and ctx.has_bias), need[3], need[4]]
        if not any(output_mask):
            return (None,) * 12
        dx, dw, db, da, dlb = plora_backward_op(grad_y, x, weight, lora_a, lora_b, lora_hidden, im_mask,
                                                tile_flags, ctx.scaling, ctx.dropout_p, dropout_seed,
                                                output_mask, False, keep_bits)  # the forward's own (checked) inputs
        grads = [g if flag else None for g, flag in zip((dx, dw, db, da, dlb), output_mask)]
        return (*grads, None, None, None, None, None, None, None)


torch.library.register_autograd("mmkernels::plora_forward", PLoRAFunction.backward,
                                setup_context=PLoRAFunction.setup_context)


def _validate(x, weight, bias, lora_a, lora_b, im_mask, scaling, dropout_p, training):
    check_tensor("x", x, min_ndim=1, dtypes=FLOAT_DTYPES)
    check_tensor("weight", weight, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("lora_a", lora_a, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("lora_b", lora_b, ndim=2, dtypes=FLOAT_DTYPES)
    if bias is not None:
        check_tensor("bias", bias, ndim=1, dtypes=FLOAT_DTYPES)
    check_tensor("im_mask", im_mask, dtypes=(torch.bool,))
    K = x.shape[-1]
    N = weight.shape[0]
    if weight.shape[1] != K:
        raise ValueError(f"weight must have shape (N, {K}) to match x's last dimension K={K}, "
                         f"got {tuple(weight.shape)}")
    r = lora_a.shape[0]
    if r < 1:
        raise ValueError(f"lora_a must have at least one row (rank r >= 1), got shape {tuple(lora_a.shape)}")
    check_shape("lora_a", lora_a, (r, K), f"rank r={r}, in_features K={K}")
    if lora_b.shape[1] != r:
        raise ValueError(f"lora_b must have shape ({N}, {r}) to match lora_a's rank r={r}, "
                         f"got {tuple(lora_b.shape)}")
    check_shape("lora_b", lora_b, (N, r), f"out_features N={N}, rank r={r}")
    if bias is not None:
        check_shape("bias", bias, (N,), f"out_features N={N}")
    check_shape("im_mask", im_mask, x.shape[:-1],
                "x.shape[:-1]; a 0-d tensor such as torch.tensor(True) for 1-D x" if x.dim() == 1 else "x.shape[:-1]")
    tensors = [("x", x), ("weight", weight), ("bias", bias), ("lora_a", lora_a), ("lora_b", lora_b)]
    check_same_dtype(tensors)
    check_same_device(tensors + [("im_mask", im_mask)])
    check_float("scaling", scaling)
    check_float("dropout_p", dropout_p, low=0.0, high=1.0)
    if not isinstance(training, bool):
        raise TypeError(f"training must be a bool, got {type(training).__name__}")


def plora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                 lora_b: torch.Tensor, im_mask: torch.Tensor, scaling: float = 1.0, dropout_p: float = 0.0,
                 training: bool = False) -> torch.Tensor:
    """Partial-LoRA linear (InternLM-XComposer2 ``PLoRA``)::

        y = x @ weight.T + bias                                       (every row)
        y[im_mask] += scaling * (dropout(x[im_mask]) @ lora_a.T) @ lora_b.T

    Args:
        x: ``[..., K]`` activations (float16, bfloat16, float32; float64 on the reference backend).
            A 1-D ``x [K]`` is one token (its ``im_mask`` is a 0-d bool tensor); ``K = 0`` gives the bias.
        weight: ``[N, K]`` base weight W0.   bias: ``[N]`` or None.
        lora_a: ``[r, K]`` (``Plora_A.weight``).   lora_b: ``[N, r]`` (``Plora_B.weight``).
        im_mask: bool ``x.shape[:-1]``, True for visual (image) tokens.
        scaling: ``lora_alpha / lora_r``.   dropout_p: LoRA dropout on visual rows, used when ``training``.

    Under ``torch.autocast`` the floating-point arguments are cast to the autocast dtype first, as the
    original's ``nn.Linear`` calls are.  Returns ``[..., N]``.  Text rows equal the base linear exactly;
    with no visual row the gradients of ``lora_a``/``lora_b`` are zero tensors.  The Triton backend draws its dropout mask from torch's
    generator (one seed per call), once per call: a Philox stream keyed by that seed with one counter
    per (row, group of four columns), so masks never repeat across rows; it keeps the mask for the
    backward as bits (``M * K / 8`` bytes).
    Tensors on the ``meta`` device only infer the output shape (any backend; no data-dependent op).

    Example::

        >>> x = torch.randn(2, 5, 64); m = torch.tensor([[0, 1, 1, 0, 0], [1, 1, 0, 0, 0]]).bool()
        >>> w, a, b = torch.randn(32, 64), torch.randn(16, 64), torch.randn(32, 16)
        >>> plora_linear(x, w, None, a, b, m).shape
        torch.Size([2, 5, 32])
    """
    dtype = autocast_dtype(x.device) if isinstance(x, torch.Tensor) and x.is_floating_point() else None
    if dtype is not None:
        # as XComposer2's three nn.Linear calls under autocast: every GEMM (and the output) in autocast's
        # dtype on both backends, the gradients flowing back to the full-precision tensors
        x, weight, bias, lora_a, lora_b = (t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point()
                                           else t for t in (x, weight, bias, lora_a, lora_b))
    _validate(x, weight, bias, lora_a, lora_b, im_mask, scaling, dropout_p, training)
    if x.device.type == "meta":  # shape inference only (e.g. models built under torch.device("meta"))
        return plora_linear_reference(x, weight, bias, lora_a, lora_b, im_mask, scaling, dropout_p, training)
    backend = resolve_backend(x.device, x.dtype)
    if backend == "reference":
        return plora_linear_reference(x, weight, bias, lora_a, lora_b, im_mask, scaling, dropout_p, training)
    K, N = x.shape[-1], weight.shape[0]
    M = im_mask.numel()  # rows = prod(x.shape[:-1]); reshape(-1, K) cannot infer it when K = 0
    x2 = x.reshape(M, K)
    if x2.numel() and x2.stride(-1) != 1:
        x2 = x2.contiguous()
    mask = im_mask.reshape(-1).contiguous()
    flags = launch.tile_flags(mask)
    p = float(dropout_p) if training else 0.0
    seed = keep_bits = None
    if p > 0:
        seed = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device=x.device)
        keep_bits = plora_dropout_keep_bits_op(mask, flags, seed, K, p)
    y, _ = plora_forward_op(x2, weight, bias, lora_a, lora_b, mask, flags, float(scaling), p, seed, False,
                            keep_bits)
    return y.view(*x.shape[:-1], N)
