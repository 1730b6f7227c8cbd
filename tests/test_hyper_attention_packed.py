"""``HyperAttention`` on packed rows: ``hidden_states [1, total, hidden]`` with ``cu_seqlens``, or with
position ids that restart at each sample (transformers' ``DataCollatorWithFlattening``), equals the same
samples run one by one through the dense ``[B, L]`` path, in the output and every gradient (the layer's
parameters, the hidden states and the image embeddings; shared parameters' gradients summed over the
samples).

The expected values come from the per-sample runs in float64 on the reference backend.  Random layouts
per test (from the session seed): four samples, one of length 1, the others of lengths no block size
divides; 0 to 2 images per sample with at least one sample without any; GQA 2; images of 3 tokens."""
import pytest
import torch

from mmkernels import HyperAttention, use_backend
from mmkernels.testing import assert_close, compare

from conftest import BACKEND_DEVICES

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DT_IDS = ["float32", "float16", "bfloat16"]
HIDDEN, H, HKV, D, T = 64, 4, 2, 16, 3
INT = dict(dtype=torch.int32)


def make_layer(mode, visibility, dtype=torch.float64, device="cpu"):
    layer = HyperAttention(HIDDEN, H, HKV, D, rope_theta=1e4, mode=mode, visibility=visibility)
    with torch.no_grad():                     # random, non-trivial values everywhere (biases and gate too)
        for p in layer.parameters():
            p.normal_(0.0, 0.3 if p.dim() == 2 else 1.0)
    return layer.to(device=device, dtype=dtype)


def random_layout(S=4, low=2, high=13, max_images=2):
    """``(lengths, image counts, image positions per sample)``: one sample of length 1, one without images."""
    lengths = torch.randint(low, high + 1, (S,)).tolist()
    lengths[int(torch.randint(0, S, ()))] = 1
    counts = [min(int(torch.randint(0, max_images + 1, ())), n) for n in lengths]
    counts[int(torch.randint(0, S, ()))] = 0
    positions = [torch.randperm(n)[:c].sort().values.tolist() for n, c in zip(lengths, counts)]
    return lengths, counts, positions


def offsets(counts, device="cpu"):
    return torch.tensor([0] + torch.tensor(counts, dtype=torch.long).cumsum(0).tolist(), **INT, device=device)


class Batch:
    """One packed batch and its samples."""

    def __init__(self, lengths, counts, positions, device="cpu"):
        self.lengths, self.counts = lengths, counts
        self.hidden = torch.randn(1, sum(lengths), HIDDEN, device=device)
        self.images = torch.randn(sum(counts), T, HIDDEN, device=device)
        self.positions = torch.tensor([p for ps in positions for p in ps], **INT, device=device)
        self.cu_seqlens, self.cu_images = offsets(lengths, device), offsets(counts, device)
        self.position_ids = torch.cat([torch.arange(n, device=device) for n in lengths])[None]

    def samples(self):
        cq, ci = self.cu_seqlens.tolist(), self.cu_images.tolist()
        return [(slice(cq[s], cq[s + 1]), slice(ci[s], ci[s + 1])) for s in range(len(cq) - 1)]


def run_packed(layer, batch, dtype, backend, dout, route):
    """Output and gradients (parameters, hidden states, images) of the packed forward."""
    x = batch.hidden.to(dtype, copy=True).requires_grad_()
    img = batch.images.to(dtype, copy=True).requires_grad_()
    layer.zero_grad(set_to_none=True)
    kw = dict(image_embeds=img, image_positions=batch.positions, cu_images=batch.cu_images)
    if not batch.counts or sum(batch.counts) == 0:
        kw = {}
    with use_backend(backend):
        if route == "cu_seqlens":           # positions derived from the offsets, bound = total
            out, cache = layer(x, None, **kw, cu_seqlens=batch.cu_seqlens)
        else:                               # restarting position ids, the offsets derived on the device
            out, cache = layer(x, batch.position_ids, **kw, packed=True)
    assert cache is None
    out.backward(dout.to(out.dtype))
    grads = {n: p.grad for n, p in layer.named_parameters()}
    grads.update(hidden_states=x.grad, image_embeds=img.grad if kw else None)
    return out, grads


def run_per_sample(layer, batch, dout, dtype=torch.float64, backend="reference"):
    """The samples one by one (dense, a batch of one each) in ``dtype`` on ``backend``: the concatenated
    outputs and the gradients summed over the samples."""
    x = batch.hidden.to(dtype, copy=True).requires_grad_()
    img = batch.images.to(dtype, copy=True).requires_grad_()
    layer.zero_grad(set_to_none=True)
    outs = []
    with use_backend(backend):
        for rows, imgs in batch.samples():
            n = rows.stop - rows.start
            pid = torch.arange(n, device=x.device)[None]
            cu = torch.tensor([0, imgs.stop - imgs.start], **INT, device=x.device)
            if imgs.stop > imgs.start:
                out, _ = layer(x[:, rows], pid, img[imgs], batch.positions[imgs], cu)
            else:
                out, _ = layer(x[:, rows], pid)
            outs.append(out)
    out = torch.cat(outs, 1)
    out.backward(dout.to(dtype))
    grads = {n: p.grad for n, p in layer.named_parameters()}
    grads.update(hidden_states=x.grad, image_embeds=img.grad if sum(batch.counts) else None)
    return out, grads


def check_packed(mode, visibility, dtype, backend, device, route, batch=None):
    """Packed on ``backend`` in ``dtype`` against the per-sample float64 reference, output and every
    gradient.  The q/k projection gradients (the k bias's above all) sum terms that nearly cancel
    (softmax shift invariance), so their relative error after a whole forward and backward can exceed
    the one-operation tolerance in the per-sample runs too, in float32 as in half precision; such a
    gradient must then be within twice the larger of that tolerance and the per-sample runs' own error
    (same dtype, same backend): packing costs no accuracy."""
    batch = batch or Batch(*random_layout(), device=device)
    reference = make_layer(mode, visibility, device=device)
    layer = make_layer(mode, visibility, dtype, device)
    layer.load_state_dict(reference.state_dict())
    dout = torch.randn(1, sum(batch.lengths), HIDDEN, device=device)
    out, grads = run_packed(layer, batch, dtype, backend, dout, route)
    out_ref, grads_ref = run_per_sample(reference, batch, dout)
    assert_close("out", out, out_ref, dtype)
    assert grads.keys() == grads_ref.keys()
    own = None
    for name, ref in grads_ref.items():
        if ref is None:
            assert grads[name] is None, name
            continue
        assert grads[name] is not None, name
        c = compare(f"grad {name}", grads[name], ref, dtype)
        if not c.ok:
            if own is None:
                own = run_per_sample(layer, batch, dout, dtype, backend)[1]
            u = compare(f"per-sample grad {name}", own[name], ref, dtype)
            assert c.rms_err <= 2 * max(u.rms_err, c.tolerance.rms_err) and \
                c.max_err <= 2 * max(u.max_err, c.tolerance.max_err), f"{c}; per sample in {dtype}: {u}"
        else:
            assert c.ok, str(c)
    return out


CASES = [("gated", "strict", "cu_seqlens"), ("gated", "inclusive", "position_ids"),
         ("joint", "strict", "position_ids"), ("joint", "inclusive", "cu_seqlens")]


@pytest.mark.parametrize("mode,visibility,route", CASES, ids=["-".join(c) for c in CASES])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_packed_module_equals_per_sample(backend, device, dtype, mode, visibility, route):
    check_packed(mode, visibility, dtype, backend, device, route)


def test_empty_samples_and_a_batch_without_images():
    """Empty samples (cu_seqlens repeating an offset) and a packed batch with no image at all."""
    check_packed("gated", "strict", torch.float64, "reference", "cpu", "cu_seqlens",
                 batch=Batch([3, 0, 5, 1, 0], [1, 0, 2, 0, 0], [[0], [], [1, 4], [], []]))
    check_packed("joint", "inclusive", torch.float64, "reference", "cpu", "position_ids",
                 batch=Batch([4, 1, 6], [0, 0, 0], [[], [], []]))


def _bad_calls():
    batch = Batch([3, 1, 4], [1, 0, 1], [[0], [], [2]])
    imgs = dict(image_embeds=batch.images, image_positions=batch.positions, cu_images=batch.cu_images)
    cu = batch.cu_seqlens
    return batch, [
        (dict(cu_seqlens=cu, use_cache=True), ValueError, "keeps no cache"),
        (dict(cu_seqlens=cu, key_padding_mask=torch.ones(1, 8, dtype=torch.bool)), ValueError, "key_padding_mask"),
        (dict(cu_seqlens=torch.tensor([0, 3, 4, 7], **INT)), ValueError, "cu_seqlens must end at total=8"),
        (dict(cu_seqlens=torch.tensor([0, 4, 3, 8], **INT)), ValueError, "cu_seqlens must be monotone"),
        (dict(cu_seqlens=cu.float()), TypeError, "cu_seqlens"),
        (dict(cu_seqlens=cu, max_seqlen=3), ValueError, "max_seqlen=3 must be at least"),
        (dict(cu_seqlens=cu, **dict(imgs, image_positions=torch.tensor([0, 4], **INT))), ValueError,
         "inside their sample"),
        (dict(packed=True, position_ids=None), ValueError, "needs cu_seqlens, or position_ids"),
        (dict(packed=True, **dict(imgs, cu_images=torch.tensor([0, 1, 1, 1, 2], **INT))), ValueError,
         "restart 3 time"),
        (dict(packed=True, position_ids=batch.position_ids.float()), TypeError, "position_ids must be an integer"),
        (dict(packed=True, position_ids=batch.position_ids[:, :-1]), ValueError, "shape \\(1, total=8\\)"),
        (dict(packed="yes"), TypeError, "packed must be a bool"),
        (dict(packed=False, cu_seqlens=cu), ValueError, "packed=False"),
        (dict(cu_seqlens=cu, image_embeds=batch.images), ValueError, "image_positions"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls()[1])))
def test_bad_packed_input_gets_a_named_error(case):
    batch, calls = _bad_calls()
    kw, error, match = calls[case]
    kw = dict(kw)
    layer = make_layer("gated", "strict", torch.float32)
    position_ids = kw.pop("position_ids", batch.position_ids)
    with pytest.raises(error, match=match), use_backend("reference"):
        layer(batch.hidden, position_ids, **kw)
    with pytest.raises(ValueError, match="shape \\(1, total, hidden\\)"), use_backend("reference"):
        layer(batch.hidden.expand(2, -1, -1), None, cu_seqlens=batch.cu_seqlens)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_an_empty_packed_batch(backend, device):
    """No token at all: no samples, empty samples only, or empty restarting positions."""
    layer = make_layer("gated", "strict", torch.float32, device)
    x = torch.randn(1, 0, HIDDEN, device=device, requires_grad=True)
    with use_backend(backend):
        for kw in (dict(cu_seqlens=torch.zeros(1, **INT, device=device)),
                   dict(cu_seqlens=torch.zeros(3, **INT, device=device)),
                   dict(position_ids=torch.zeros(1, 0, dtype=torch.long, device=device), packed=True)):
            out, cache = layer(x, kw.pop("position_ids", None), **kw)
            assert out.shape == (1, 0, HIDDEN) and cache is None
            out.sum().backward()
