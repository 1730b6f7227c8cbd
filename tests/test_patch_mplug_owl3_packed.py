"""The patched mPLUG-Owl3 mirror on a packed batch (several samples in one row, as transformers'
``DataCollatorWithFlattening`` makes it) equals the same samples run one by one through the unpatched
mirror: the summed next-token loss and every gradient (parameters and image embeddings, summed over the
samples).

A packed row is given as position ids that restart at each sample, with or without transformers'
varlen keyword arguments (``cu_seq_lens_q/k``, ``max_length_q/k``); its ``media_offset`` is v1's
``[1, L, 2]`` (each token's row describes its own sample's images) or v2's one list of the row's
``<|image|>`` token indices.  The expected values come from the unpatched mirror in float64, sample by
sample; the patched model runs in float64 (reference backend) and float32 (both backends), each held to
its dtype's tolerances.  Random layouts per test (from the session seed): four samples, one of length 1,
0 to 2 images each with at least one sample without any."""
import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

import mmkernels
from mmkernels.patching import apply_mmkernels
from mmkernels.testing import assert_close, compare

from mirrors.qwen2_hyper import build, v1_media_offset
from test_patch_mplug_owl3 import CACHE, _triton_cases

V, T, HID = 61, 3, 64


def random_samples(version, S=4, low=2, high=9):
    """``(lengths, image token indices per sample)``: one sample of length 1, one without images.  v1's
    image tokens lie before the sample's last token (its media_offset counts images before a token)."""
    lengths = torch.randint(low, high + 1, (S,)).tolist()
    lengths[int(torch.randint(0, S, ()))] = 1
    room = [n - 1 if version == "v1" else n for n in lengths]
    counts = [min(int(torch.randint(0, 3, ())), r) for r in room]
    counts[int(torch.randint(0, S, ()))] = 0
    return lengths, [torch.randperm(r)[:c].sort().values.tolist() for r, c in zip(room, counts)]


class Packed:
    """One packed row and its samples."""

    def __init__(self, version, lengths, idx):
        self.version, self.lengths, self.idx = version, lengths, idx
        self.ids = [torch.randint(1, V, (1, n)) for n in lengths]
        counts = [len(i) for i in idx]
        self.cu_images = [0] + torch.tensor(counts).cumsum(0).tolist()
        self.cu = [0] + torch.tensor(lengths).cumsum(0).tolist()
        self.images = torch.randn(self.cu_images[-1], T, HID)

    def row(self, device):
        """``(input_ids, position_ids, media_offset, varlen kwargs)`` of the packed row."""
        ids = torch.cat(self.ids, 1).to(device)
        pos = torch.cat([torch.arange(n) for n in self.lengths])[None].to(device)
        if self.version == "v1":
            media_offset = torch.cat([v1_media_offset(i, n, first) for i, n, first in
                                      zip(self.idx, self.lengths, self.cu_images)])[None].to(device)
        else:
            media_offset = [torch.tensor([p + start for i, start in zip(self.idx, self.cu) for p in i],
                                         dtype=torch.long)]
        cu = torch.tensor(self.cu, dtype=torch.int32, device=device)
        longest = max(self.lengths)
        varlen = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
        return ids, pos, media_offset, varlen

    def labels(self, ids):
        """``ids`` with each sample's first token ignored (-100): no prediction across samples."""
        labels = ids.clone()
        labels[0, self.cu[:-1]] = -100
        return labels


def _loss(logits, labels):
    """The next-token loss summed over the predicted tokens, in the logits' dtype."""
    return F.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100, reduction="sum")


def run_per_sample(model, batch):
    """The unpatched model on each sample alone, in its own dtype (the loss in float64): (summed loss,
    gradients summed over the samples)."""
    model.zero_grad(set_to_none=True)
    images = batch.images.to(next(model.parameters()).dtype).requires_grad_()
    total = 0
    for s, ids in enumerate(batch.ids):
        a, b = batch.cu_images[s], batch.cu_images[s + 1]
        kw = {}
        if b > a:
            kw = dict(image_embeds=images[a:b], media_offset=v1_media_offset(batch.idx[s], ids.shape[1], 0)[None]
                      if batch.version == "v1" else [torch.tensor(batch.idx[s])])
        logits = model(input_ids=ids, use_cache=False, **kw).logits
        loss = _loss(logits.to(torch.float64), ids)
        loss.backward()
        total = total + loss.detach()
    grads = {n: p.grad for n, p in model.named_parameters()}
    grads["image_embeds"] = images.grad
    return total, grads


def run_packed(model, batch, route, backend, dtype, device):
    ids, pos, media_offset, varlen = batch.row(device)
    model.zero_grad(set_to_none=True)
    images = batch.images.to(device, dtype).requires_grad_()
    kw = varlen if route == "varlen kwargs" else {}
    with mmkernels.use_backend(backend):
        logits = model(input_ids=ids, position_ids=pos, image_embeds=images, media_offset=media_offset,
                       use_cache=False, **kw).logits
        loss = _loss(logits.to(torch.float64), batch.labels(ids))
        loss.backward()
    grads = {n: p.grad.cpu() if p.grad is not None else None for n, p in model.named_parameters()}
    grads["image_embeds"] = None if images.grad is None else images.grad.cpu()   # None: no image in the row
    return loss.detach().cpu(), grads


# sdpa: the model hands the layers a boolean mask, causal within each sample; eager: the additive form
CASES = [("reference", "cpu", v, r, d, "sdpa") for v in ("v1", "v2") for r, d in
         (("position ids", torch.float64), ("varlen kwargs", torch.float32))]
CASES += [("reference", "cpu", "v2", "position ids", torch.float32, "eager")]
CASES += _triton_cases(("v1", "position ids", torch.float32, "sdpa"),
                       ("v2", "varlen kwargs", torch.float32, "sdpa"))


@pytest.mark.parametrize("backend, device, version, route, dtype, attn", CASES)
def test_packed_batch_equals_per_sample_runs(backend, device, version, route, dtype, attn):
    batch = Packed(version, *random_samples(version))
    expected = build(version, dtype=torch.float64).train()
    loss, grads = run_per_sample(expected, batch)
    model = build(version, dtype=dtype, attn=attn).to(device).train()
    assert apply_mmkernels(model, plora=False, moe=False) == {"hyper_attention": 1}
    loss2, grads2 = run_packed(model, batch, route, backend, dtype, device)
    assert_close("loss", loss2, loss, dtype)
    assert grads2.keys() == grads.keys()
    # The q/k bias gradients sum terms that nearly cancel (softmax shift invariance), so their relative
    # error can exceed the one-operation tolerance in the unpatched model run in the same dtype too, by an
    # amount that varies with the seed; such a gradient must then be within twice the larger of that
    # tolerance and the unpatched model's own error, sample by sample in that dtype.
    own = None
    for name, g in grads.items():
        if g is None:       # no sample has an image: the images and the v1 gate take no part in the loss
            assert grads2[name] is None or not grads2[name].any(), name
            continue
        assert grads2[name] is not None, name
        c = compare(f"grad {name}", grads2[name], g, dtype)
        if not c.ok and dtype != torch.float64:
            if own is None:
                own = run_per_sample(build(version, dtype=dtype, attn=attn).train(), batch)[1]
            u = compare(f"unpatched grad {name}", own[name], g, dtype)
            assert c.rms_err <= 2 * max(u.rms_err, c.tolerance.rms_err) and \
                c.max_err <= 2 * max(u.max_err, c.tolerance.max_err), f"{c}; unpatched per sample in {dtype}: {u}"
        else:
            assert c.ok, str(c)


# --------------------------------------------------------------------------- bad input

def _patched(version="v1"):
    model = build(version)
    apply_mmkernels(model, plora=False, moe=False)
    return model


def _fixed(version="v1"):
    return Packed(version, [3, 4, 2], [[0], [], [0]] if version == "v1" else [[2], [], [1]])


@pytest.mark.parametrize("change, error, match", [
    ("batch of 2", ValueError, "shape \\(1, total, hidden\\)"),
    ("offsets", ValueError, "cu_seq_lens_q must end at the row's length L=9"),
    ("k differs", ValueError, "cu_seq_lens_k must equal cu_seq_lens_q"),
    ("float offsets", TypeError, "cu_seq_lens_q"),
    ("no offsets", ValueError, "cu_seq_lens_q must be a \\(S\\+1,\\) tensor"),
    ("max_length", ValueError, "max_length_q=3 must be at least"),
    ("padding", ValueError, "takes no padding mask"),
    ("v1 rows", ValueError, "shape \\(1, L=9, 2\\)"),
    ("v1 sample", ValueError, "packed sample 2"),
    ("v2 lists", ValueError, "list of one entry"),
])
def test_bad_packed_input_gets_a_clear_error(change, error, match):
    version = "v2" if change == "v2 lists" else "v1"
    batch = _fixed(version)
    ids, pos, media_offset, varlen = batch.row("cpu")
    kw = dict(input_ids=ids, position_ids=pos, image_embeds=batch.images, media_offset=media_offset,
              use_cache=False, **varlen)
    if change == "batch of 2":
        kw.update(input_ids=ids.expand(2, -1), position_ids=pos.expand(2, -1),
                  media_offset=media_offset.expand(2, -1, -1))
    elif change == "offsets":
        kw["cu_seq_lens_q"] = kw["cu_seq_lens_k"] = torch.tensor([0, 3, 7, 8], dtype=torch.int32)
    elif change == "k differs":
        kw["cu_seq_lens_k"] = torch.tensor([0, 4, 7, 9], dtype=torch.int32)
    elif change == "float offsets":
        kw["cu_seq_lens_q"] = kw["cu_seq_lens_q"].float()
    elif change == "no offsets":
        kw["cu_seq_lens_q"] = kw["cu_seq_lens_k"] = torch.zeros(0, dtype=torch.int32)
    elif change == "max_length":
        kw["max_length_q"] = 3
    elif change == "padding":
        kw["attention_mask"] = torch.ones(1, 9, dtype=torch.long).index_fill_(1, torch.tensor([0]), 0)
    elif change == "v1 rows":
        kw["media_offset"] = media_offset[:, :-1]
    elif change == "v1 sample":
        bad = media_offset.clone()
        bad[0, 7, 1] = -1000000                        # sample 2 (tokens 7:9) mixes rows with and without images
        kw["media_offset"] = bad
    elif change == "v2 lists":
        kw["media_offset"] = [torch.tensor([2]), torch.tensor([1])]
    with pytest.raises(error, match=match), mmkernels.use_backend("reference"):
        _patched(version)(**kw)


def test_a_packed_prompt_cannot_be_continued():
    """A packed row may fill a cache (transformers makes one by default), but a later step on it raises:
    decoding runs on padded batches."""
    model = _patched()
    batch = _fixed()
    ids, pos, media_offset, _ = batch.row("cpu")
    past = DynamicCache(config=model.config)
    with torch.no_grad(), mmkernels.use_backend("reference"):
        model(input_ids=ids, position_ids=pos, image_embeds=batch.images, media_offset=media_offset,
              use_cache=True, **{CACHE: past})
        with pytest.raises(ValueError, match="holds a packed batch"):
            model(input_ids=ids[:, -1:], position_ids=pos[:, -1:] + 1, use_cache=True, **{CACHE: past})


def test_a_left_padded_single_prompt_stays_padded():
    """A batch of one left-padded prompt has position ids that restart too (transformers' cumsum - 1 with
    the padding at 1); its padding mask keeps it on the padded path, equal to the unpatched model."""
    ids = torch.randint(1, V, (1, 7))
    mask = torch.ones(1, 7, dtype=torch.long)
    mask[0, :2] = 0
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    expected = build("v1")(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
    with torch.no_grad(), mmkernels.use_backend("reference"):
        logits = _patched()(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
    assert_close("logits", logits[0, 2:], expected[0, 2:].double(), torch.float32)
