"""Exact speed-ups of the DiT (wan/dit.py, wan/dit_context.py, wan/attention.py): each is
checked in fp32 against the plain formulation (kept below as the reference: the block as
the official model writes it), the conditioning cache against recomputing it (with row
selection and with block swapping), reuse by counting calls, torch.compile of the blocks,
and the attention kernel choice."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from _speed_models import TINY, tiny_dit, tiny_inputs
from wan_i2v.wan import attention as attention_module
from wan_i2v.wan import dit as dit_module
from wan_i2v.wan.attention import attention, fast_kernels, resolve_backend
from wan_i2v.wan.dit import apply_rope, modulated_layer_norm, rms_norm, rms_norm_rope, rotate_pairs
from wan_i2v.wan.dit_context import ContextCache, make_model_fn
from wan_i2v.wan.offload import BlockSwap

CFG = replace(TINY, num_layers=3)
TOL = 1e-6


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# --------------------------------------------------------------------------- the plain formulation

def ref_rms(x, norm):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight.float()).to(x.dtype)


def ref_block(block, x, e0, rope, context, context_img, cd):
    """The block as the official model writes it (and as wan/dit.py did before the fusions)."""
    shift1, scale1, gate1, shift2, scale2, gate2 = (block.modulation.float() + e0).unsqueeze(2).unbind(1)
    sa, ca = block.self_attn, block.cross_attn
    b, n, h = x.shape[0], x.shape[1], sa.num_heads
    y = (F.layer_norm(x, x.shape[-1:], eps=block.norm1.eps) * (1 + scale1) + shift1).to(cd)
    q = apply_rope(ref_rms(sa.q(y), sa.norm_q).view(b, n, h, -1), rope)
    k = apply_rope(ref_rms(sa.k(y), sa.norm_k).view(b, n, h, -1), rope)
    v = sa.v(y).view(b, n, h, -1)
    x = x + sa.o(attention(q, k, v).flatten(2)).float() * gate1
    y = block.norm3(x).to(cd)
    q = ref_rms(ca.q(y), ca.norm_q).view(b, n, h, -1)
    heads = lambda t: t.view(b, -1, h, t.shape[-1] // h)  # noqa: E731
    kt, vt = heads(ref_rms(ca.k(context), ca.norm_k)), heads(ca.v(context))
    ki, vi = heads(ref_rms(ca.k_img(context_img), ca.norm_k_img)), heads(ca.v_img(context_img))
    x = x + ca.o((attention(q, kt, vt) + attention(q, ki, vi)).flatten(2)).float()
    y = (F.layer_norm(x, x.shape[-1:], eps=block.norm2.eps) * (1 + scale2) + shift2).to(cd)
    return x + block.ffn(y).float() * gate2


@torch.no_grad()
def ref_forward(dit, x, t, context, clip, y):
    tokens, grid = dit.embed_inputs(x, y)
    e, e0 = dit.embed_time(t, x.shape[0], x.device)
    text, image = dit.embed_context(context, clip, x.shape[0], x.device)
    rope = dit.rope(grid, x.device)
    for block in dit.blocks:
        tokens = ref_block(block, tokens, e0, rope, text, image, dit.compute_dtype)
    shift, scale = (dit.head.modulation.float() + e[:, None]).unsqueeze(2).unbind(1)
    out = dit.head.head(F.layer_norm(tokens, tokens.shape[-1:], eps=dit.head.norm.eps) * (1 + scale) + shift)
    return dit.unpatchify(out.float(), grid)


@pytest.fixture(scope="module")
def model():
    return tiny_dit(CFG)


def two_branch_inputs(seed=1):
    """x, t for a batch of 2 (cond, uncond), the two texts (different lengths), clip, y [1, ...]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 16, 2, 4, 6, generator=g)
    x[1] = x[0]  # as the sampler batches them
    t = torch.full((2,), 800.0)
    texts = [torch.randn(9, CFG.text_dim, generator=g), torch.randn(14, CFG.text_dim, generator=g)]
    clip = torch.randn(1, 257, CFG.image_dim, generator=g)
    y = torch.randn(1, CFG.in_dim - 16, 2, 4, 6, generator=g)
    return x, t, texts, clip, y


# --------------------------------------------------------------------------- fused pieces

def test_fused_norms_and_rope_match_the_plain_formulas():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 12, 64, generator=g) * 3
    shift, scale = torch.randn(2, 1, 64, generator=g), torch.randn(2, 1, 64, generator=g)
    want = F.layer_norm(x, (64,), eps=1e-6) * (1 + scale) + shift
    assert rel_err(modulated_layer_norm(x, 1e-6, shift, scale, torch.float32), want) < TOL
    low = modulated_layer_norm(x, 1e-6, shift, scale, torch.bfloat16)
    assert low.dtype == torch.bfloat16 and rel_err(low, want) < 5e-3

    norm = dit_module.RMSNorm(64, 1e-6)
    norm.weight.data = 1 + 0.1 * torch.randn(64, generator=g)
    assert rel_err(rms_norm(x, norm.weight, norm.eps, torch.float32), ref_rms(x, norm)) < TOL
    assert rel_err(norm(x), ref_rms(x, norm)) < TOL

    dit = tiny_dit(CFG)
    grid = (2, 2, 3)
    tables = dit.rope_tables(grid, torch.device("cpu"))
    assert tables[2].dtype == torch.complex64 and dit.rope(grid, "cpu")[0] is tables[0]
    want = apply_rope(ref_rms(x, norm).view(2, 12, 4, 16), tables[:2])
    got = rms_norm_rope(x, norm, tables, 4, torch.float32)
    assert got.shape == (2, 12, 4, 16) and rel_err(got, want) < TOL


def test_compiling_branch_of_rotate_pairs(monkeypatch):
    tables = tiny_dit(CFG).rope_tables((2, 2, 3), torch.device("cpu"))
    y = torch.randn(1, 12, 4, 16)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    real = rotate_pairs(y.clone(), tables)
    monkeypatch.undo()
    assert rel_err(real, apply_rope(y, tables[:2])) < TOL
    assert rel_err(rotate_pairs(y.clone(), tables), real) < TOL


def test_forward_matches_the_plain_block(model):
    x, t, context, clip, y = tiny_inputs(CFG, batch=2)
    t = torch.tensor([900.0, 120.0])
    with torch.no_grad():
        got = model(x, t, list(context), clip, y)
    assert rel_err(got, ref_forward(model, x, t, list(context), clip, y)) < TOL


def test_bf16_forward_close_to_the_plain_block(model):
    x, t, context, clip, y = tiny_inputs(CFG)
    model.compute_dtype = torch.bfloat16
    try:
        with torch.no_grad():
            got, want = model(x, t, context, clip, y), ref_forward(model, x, t, context, clip, y)
        fp32 = ref_forward(tiny_dit(CFG), x, t, context, clip, y)
    finally:
        model.compute_dtype = torch.float32
    # fewer bf16 roundings than the plain path (norm output is not rounded before RoPE)
    assert rel_err(got, fp32) < 2e-2 and rel_err(want, fp32) < 2e-2 and rel_err(got, want) < 2e-2


# --------------------------------------------------------------------------- context cache

class Counter:
    def __init__(self, dit):
        self.n = {}
        self.handles = []
        layers = {"text": dit.text_embedding[0], "img": dit.img_emb.proj[1]}
        for i, b in enumerate(dit.blocks):
            for name in ("k", "v", "k_img", "v_img"):
                layers[f"{i}.{name}"] = getattr(b.cross_attn, name)
        for key, m in layers.items():
            self.n[key] = 0
            self.handles.append(m.register_forward_hook(lambda *a, key=key: self.n.__setitem__(key, self.n[key] + 1)))

    def kv_calls(self):
        return sum(v for k, v in self.n.items() if k[0].isdigit())

    def close(self):
        for h in self.handles:
            h.remove()


@torch.no_grad()
def test_cache_equals_recomputing_and_computes_once(model):
    x, t, texts, clip, y = two_branch_inputs()
    yb, clipb = y.expand(2, -1, -1, -1, -1), clip.expand(2, -1, -1)
    counter = Counter(model)
    try:
        plain = [model(x * s, t * s, texts, clipb, yb) for s in (1.0, 0.5, 0.25)]
        assert counter.n["text"] == 3 and counter.kv_calls() == 3 * 4 * CFG.num_layers
        counter.n = dict.fromkeys(counter.n, 0)
        ctx = model.prepare_context(texts, clipb)
        assert counter.n["text"] == 1 and counter.n["img"] == 1 and ctx.blocks_filled() == 0
        cached = [model(x * s, t * s, ctx, None, yb) for s in (1.0, 0.5, 0.25)]
        assert counter.n["text"] == 1 and counter.n["img"] == 1
        assert all(v == 1 for k, v in counter.n.items())  # every K/V linear ran once, for 3 steps
        assert ctx.blocks_filled() == CFG.num_layers
    finally:
        counter.close()
    for a, b in zip(cached, plain):
        assert torch.equal(a, b)  # the same computations, only once
    # per block K, V of text and image tokens, plus the embedded tokens: B=2, fp32
    assert ctx.nbytes() == (2 * CFG.num_layers + 1) * 2 * (CFG.text_len + 257) * CFG.dim * 4


@torch.no_grad()
def test_row_selection(model):
    x, t, texts, clip, y = two_branch_inputs(seed=2)
    ctx = model.prepare_context(texts, clip.expand(2, -1, -1))
    cond, uncond = ctx.select([0]), ctx.select([1])
    assert cond.batch == uncond.batch == 1
    # a view filled first (lazily, through the root) is seen by the root and the other view
    got_u = model(x[1:], t[1:], uncond, None, y)
    assert ctx.blocks_filled() == CFG.num_layers
    got_c = model(x[:1], t[:1], cond, None, y)
    want_c = model(x[:1], t[:1], texts[:1], clip, y)
    want_u = model(x[1:], t[1:], texts[1:], clip, y)
    assert rel_err(got_c, want_c) < TOL and rel_err(got_u, want_u) < TOL
    # the K/V of a contiguous selection are views of the cache (no copies)
    kv_root, kv_u = ctx.block_kv(0, model.blocks[0]), uncond.block_kv(0, model.blocks[0])
    assert kv_u[0].data_ptr() == kv_root[0][1:].data_ptr()
    # reordered rows (an index) and a view of a view
    swapped = ctx.select([1, 0])
    got = model(x, t, swapped, None, y.expand(2, -1, -1, -1, -1))
    want = model(x, t, texts[::-1], clip.expand(2, -1, -1), y.expand(2, -1, -1, -1, -1))
    assert rel_err(got, want) < TOL
    assert rel_err(model(x[:1], t[:1], swapped.select([0]), None, y), want_u) < TOL
    assert ctx.select([0, 1])._rows is None
    with pytest.raises(ValueError, match="rows must be in 0..1"):
        ctx.select([2])


@torch.no_grad()
def test_cache_with_block_swapping():
    dit = tiny_dit(CFG)
    x, t, texts, clip, y = two_branch_inputs(seed=3)
    yb, clipb = y.expand(2, -1, -1, -1, -1), clip.expand(2, -1, -1)
    plain = dit(x, t, texts, clipb, yb)
    with BlockSwap(dit, blocks_on_cpu=2, device="cpu", offload_embeddings=True):
        lazy = dit.prepare_context(texts, clipb)
        filled = dit.prepare_context(texts, clipb).fill(dit)  # eager: through the swap hooks
        assert filled.blocks_filled() == CFG.num_layers and lazy.blocks_filled() == 0
        for _ in range(2):
            assert torch.equal(dit(x, t, lazy, None, yb), plain)
            assert torch.equal(dit(x, t, filled, None, yb), plain)
        assert rel_err(dit(x[:1], t[:1], lazy.select([0]), None, y), plain[:1]) < TOL


@torch.no_grad()
def test_interrupted_fill_resumes(model):
    x, t, texts, clip, y = two_branch_inputs(seed=4)
    ctx = model.prepare_context(texts[:1], clip)
    calls = []

    def interrupt():
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    model.interrupt = interrupt
    try:
        with pytest.raises(KeyboardInterrupt):
            model(x[:1], t[:1], ctx, None, y)
    finally:
        model.interrupt = None
    assert ctx.blocks_filled() == 1
    assert torch.equal(model(x[:1], t[:1], ctx, None, y), model(x[:1], t[:1], texts[:1], clip, y))


@torch.no_grad()
def test_cache_misuse_is_refused(model):
    x, t, texts, clip, y = two_branch_inputs()
    ctx = model.prepare_context(texts, clip.expand(2, -1, -1))
    with pytest.raises(ValueError, match=r"batch 2 for a batch of 1 \(use ctx.select"):
        model(x[:1], t[:1], ctx, None, y)
    with pytest.raises(ValueError, match="clip_fea must be None"):
        model(x, t, ctx, clip, y.expand(2, -1, -1, -1, -1))
    with pytest.raises(ValueError, match="another model"):
        tiny_dit(CFG)(x, t, ctx, None, y.expand(2, -1, -1, -1, -1))
    with pytest.raises(ValueError, match="float32 on cpu.*bfloat16"):
        model.compute_dtype = torch.bfloat16
        try:
            model(x, t, ctx, None, y.expand(2, -1, -1, -1, -1))
        finally:
            model.compute_dtype = torch.float32
    with pytest.raises(ValueError, match="clip_fea"):
        model.prepare_context(texts, None)
    assert isinstance(ctx, ContextCache) and "batch=2" in repr(ctx)


@torch.no_grad()
def test_make_model_fn_in_the_sampler(model):
    from wan_i2v.wan import sampling

    x, t, texts, clip, y = two_branch_inputs(seed=5)

    def plain_fn(x, t, branches):
        ctx = [texts[0] if b == "cond" else texts[1] for b in branches]
        return model(x, t, ctx, clip.expand(x.shape[0], -1, -1), y.expand(x.shape[0], -1, -1, -1, -1))

    calls = [("cond", "uncond"), ("uncond",), ("cond",), ("uncond", "cond")]
    want = [plain_fn(x[: len(b)], t[: len(b)], b) for b in calls]
    counter = Counter(model)
    try:
        fn = make_model_fn(model, texts[0], texts[1][None], clip, y[0])
        got = [fn(x[: len(b)], t[: len(b)], b) for b in calls]
        assert counter.n["text"] == 1 and counter.kv_calls() == 4 * CFG.num_layers
    finally:
        counter.close()
    assert all(rel_err(a, b) < TOL for a, b in zip(got, want))
    noise = torch.randn(16, 2, 4, 6, generator=torch.Generator().manual_seed(0))
    for batch_cfg in (True, False):
        runs = [sampling.sample(f, noise, sampling.make_solver("unipc", 3, 5.0), 5.0, batch_cfg=batch_cfg)[0]
                for f in (make_model_fn(model, texts[0], texts[1], clip, y), plain_fn)]
        assert rel_err(*runs) < TOL
    no_cfg = make_model_fn(model, texts[0], None, clip, y, fill=True)
    assert no_cfg.context.batch == 1 and no_cfg.context.blocks_filled() == CFG.num_layers
    with pytest.raises(ValueError, match="branches \\['uncond'\\]"):
        no_cfg(x[:1], t[:1], ("uncond",))


# --------------------------------------------------------------------------- compile, attention

@torch.no_grad()
def test_compiled_blocks_match_with_cache_and_swapping():
    torch._dynamo.reset()
    dit = tiny_dit(replace(CFG, num_layers=2))
    x, t, texts, clip, y = two_branch_inputs(seed=6)
    yb, clipb = y.expand(2, -1, -1, -1, -1), clip.expand(2, -1, -1)
    want = dit(x, t, texts, clipb, yb)
    # aot_eager: dynamo + functionalization of the in-place residual updates (inductor's C++
    # compile of even a tiny graph takes too long on a 2-core CI machine)
    assert dit.compile_blocks(backend="aot_eager") is dit
    ctx = dit.prepare_context(texts, clipb)
    with BlockSwap(dit, blocks_on_cpu=1, device="cpu"):
        for _ in range(2):
            assert rel_err(dit(x, t, ctx, None, yb), want) < TOL
    assert rel_err(dit(x, t, texts, clipb, yb), want) < TOL
    torch._dynamo.reset()


def test_fast_kernels_prefers_cudnn_on_hopper_only(monkeypatch):
    before = torch._C._get_sdp_priority_order()
    with fast_kernels(torch.device("cpu"), torch.bfloat16):
        assert torch._C._get_sdp_priority_order() == before
    monkeypatch.setattr(attention_module, "_is_hopper", lambda device: True)
    with fast_kernels(torch.device("cuda"), torch.float32):
        assert torch._C._get_sdp_priority_order() == before
    enabled = torch.backends.cuda.flash_sdp_enabled()
    with fast_kernels(torch.device("cuda"), torch.bfloat16):
        from torch.nn.attention import SDPBackend

        assert torch._C._get_sdp_priority_order()[0] == int(SDPBackend.CUDNN_ATTENTION)
        assert torch.backends.cuda.flash_sdp_enabled() == enabled
        q = torch.randn(1, 5, 2, 8)
        torch.testing.assert_close(attention(q, q, q), attention_module.sdpa(q, q, q))
    assert torch._C._get_sdp_priority_order() == before


def test_auto_backend_picks_flash3_only_for_half_on_hopper(monkeypatch):
    cpu, cuda, bf16 = torch.device("cpu"), torch.device("cuda", 0), torch.bfloat16
    assert resolve_backend("auto", cpu, bf16) == "sdpa" and resolve_backend("auto") == "sdpa"
    monkeypatch.setattr(attention_module, "_is_hopper", lambda device: True)
    assert resolve_backend("auto", cuda, bf16) == "sdpa"  # flash_attn_interface not installed here
    monkeypatch.setattr(attention_module, "_flash3_fn", lambda: (lambda *a: None))
    assert resolve_backend("auto", cuda, bf16) == "flash"
    assert resolve_backend("auto", cuda, torch.float32) == "sdpa"
    assert resolve_backend("auto", cpu, bf16) == "sdpa"
    monkeypatch.setattr(attention_module, "_is_hopper", lambda device: False)
    assert resolve_backend("auto", cuda, bf16) == "sdpa"  # FA3 is Hopper-only
