"""Block swapping (wan/offload.py) on the CPU: the same scheduling code as on CUDA, with the
"device" being the CPU, must give bit-identical outputs; and the budget -> block count."""

import logging
from dataclasses import replace

import pytest
import torch

from _speed_models import TINY, ToyBlocks, tiny_dit, tiny_inputs
from wan_i2v.wan import offload
from wan_i2v.wan.configs import WAN21_I2V_14B
from wan_i2v.wan.dit import WanDiT
from wan_i2v.wan.offload import (BlockSwap, choose_blocks_to_swap, estimate_activation_bytes,
                                 estimate_vram_bytes, tensor_bytes)
from wan_i2v.wan.speed import compile_blocks


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("blocks_on_cpu,embeddings", [(1, False), (3, True), (5, False)])
def test_swapped_dit_output_is_identical(fp8, blocks_on_cpu, embeddings):
    dit = tiny_dit(fp8=fp8)
    inputs = tiny_inputs()
    ref = dit(*inputs)
    state = {k: v.clone() for k, v in dit.state_dict().items()}
    swap = BlockSwap(dit, blocks_on_cpu=blocks_on_cpu, device="cpu", offload_embeddings=embeddings,
                     debug=True).install()
    assert dit.block_swap is swap and swap.swapped == list(range(5 - blocks_on_cpu, 5))
    for _ in range(3):  # the prefetch of the next forward's first swapped block is reused
        assert torch.equal(dit(*inputs), ref)
    rep = swap.report()
    for row in rep["per_block"]:
        assert row["calls"] == 3
        assert (row["copy_ms"] is not None) == row["swapped"]  # resident blocks are never copied
    swap.uninstall()
    assert dit.block_swap is None
    assert torch.equal(dit(*inputs), ref)
    after = dit.state_dict()
    assert all(torch.equal(after[k], v) and after[k].dtype == v.dtype for k, v in state.items())


def test_swapped_block_computes_from_a_slot_and_goes_back_to_host():
    dit = tiny_dit(replace(TINY, num_layers=4))
    swap = BlockSwap(dit, blocks_on_cpu=3, device="cpu").install()
    seen = {}

    def check(i):
        def hook(module, args):
            ptr = module.ffn[0].weight.data_ptr()
            seen[i] = [j for j, s in enumerate(swap._slots) if s.data_ptr() <= ptr < s.data_ptr() + s.numel()]
        return hook

    for i, block in enumerate(dit.blocks):
        block.register_forward_pre_hook(check(i))
    dit(*tiny_inputs())
    assert seen[0] == [] and all(len(seen[i]) == 1 for i in (1, 2, 3))
    assert seen[1] != seen[2] and seen[1] == seen[3]  # two slots, used alternately
    assert len(swap._slots) == 2
    host = swap._packed[2].host
    w = dit.blocks[2].ffn[0].weight
    assert host.data_ptr() <= w.data_ptr() < host.data_ptr() + host.numel()  # back on the host copy


def test_copies_follow_the_one_block_ahead_schedule(monkeypatch):
    """Block i+1's copy is issued before block i computes (so the two overlap on a GPU)."""
    model = ToyBlocks(n=6)
    x = torch.randn(3, 32)
    ref = model(x)
    swap = BlockSwap(model, blocks_on_cpu=4, device="cpu").install()
    events = []
    issue, before = swap._issue, swap.before_block
    monkeypatch.setattr(swap, "_issue", lambda j: (events.append(("copy", j)), issue(j)))
    monkeypatch.setattr(swap, "before_block", lambda i: (before(i), events.append(("compute", i))))
    assert torch.equal(model(x), ref)
    assert torch.equal(model(x), ref)
    steady = [("compute", 0), ("compute", 1), ("compute", 2), ("copy", 4), ("compute", 3), ("copy", 5),
              ("compute", 4), ("copy", 2), ("compute", 5), ("copy", 3)]
    # first forward: blocks 2 and 3 fetched up front; then each copy overlaps the block
    # before it, and the next forward's first swapped blocks are fetched during the last ones
    assert events == [("copy", 2), ("copy", 3)] + steady + steady


@pytest.mark.parametrize("abort_at", [2, 3, 5])
def test_aborted_forward_leaves_a_consistent_state(abort_at):
    dit = tiny_dit()
    inputs = tiny_inputs()
    ref = dit(*inputs)
    BlockSwap(dit, blocks_on_cpu=4, device="cpu").install()
    calls = {"n": 0}

    def interrupt():
        calls["n"] += 1
        if calls["n"] == abort_at:
            raise KeyboardInterrupt

    dit.interrupt = interrupt
    with pytest.raises(KeyboardInterrupt):
        dit(*inputs)
    assert torch.equal(dit(*inputs), ref)


def test_compiled_blocks_with_swapping_are_identical():
    cfg = replace(TINY, num_layers=3)
    dit = tiny_dit(cfg)
    inputs = tiny_inputs(cfg)
    ref = dit(*inputs)
    keys = list(dit.state_dict())
    compile_blocks(dit, backend="eager")
    assert list(dit.state_dict()) == keys
    with BlockSwap(dit, blocks_on_cpu=2, device="cpu"):
        assert torch.equal(dit(*inputs), ref)
        assert torch.equal(dit(*inputs), ref)


def test_arguments_are_checked():
    dit = ToyBlocks(n=3)
    with pytest.raises(ValueError, match="blocks_on_cpu or vram_budget_gb"):
        BlockSwap(dit)
    with pytest.raises(ValueError, match="tokens"):
        BlockSwap(dit, vram_budget_gb=8)
    with pytest.raises(ValueError, match="3 blocks"):
        BlockSwap(dit, blocks_on_cpu=4)
    with pytest.raises(ValueError, match="positive"):
        choose_blocks_to_swap(dit, 0, 100)


def test_budget_to_block_count_by_hand():
    model = ToyBlocks(n=4, d=32)  # each block: 2 x (32x32 + 32) fp32 = 8448 bytes; head 4224
    assert [tensor_bytes(b) for b in model.blocks] == [8448] * 4 and tensor_bytes(model.head) == 4224
    act = estimate_activation_bytes(model, tokens=100)  # no config: d = f = 32, bf16: 30 d per token
    assert act == int(100 * 30 * 32 * 1.1)
    # with two slots, swapping 1 or 2 blocks saves nothing; 3 saves one block, 4 two
    need = [estimate_vram_bytes(model, 100, s, reserve_gb=0) for s in range(5)]
    assert need == [4224 + 4 * 8448 + act] * 3 + [4224 + 3 * 8448 + act, 4224 + 2 * 8448 + act]
    gib = 2 ** 30
    assert choose_blocks_to_swap(model, need[0] / gib, 100, reserve_gb=0) == 0
    assert choose_blocks_to_swap(model, (need[0] - 1) / gib, 100, reserve_gb=0) == 3
    assert choose_blocks_to_swap(model, need[4] / gib, 100, reserve_gb=0) == 4
    assert estimate_vram_bytes(model, 100, 4, offload_embeddings=True, reserve_gb=0) == need[4]  # no embeddings


def test_budget_warns_when_nothing_fits(caplog):
    model = ToyBlocks(n=4, d=32)
    with caplog.at_level(logging.WARNING, logger=offload.__name__):
        assert choose_blocks_to_swap(model, 1e-6, 100, reserve_gb=0) == 4
    assert "below the estimate" in caplog.text


def test_budget_for_the_14b_model():
    """Full-size 14B on meta: the choices the memory benchmark relies on."""
    with torch.device("meta"):
        bf16 = WanDiT(WAN21_I2V_14B).to(torch.bfloat16)
        fp8 = WanDiT(WAN21_I2V_14B).to(torch.bfloat16)
    for b in fp8.blocks:
        for m in b.modules():
            if hasattr(m, "weight_scale"):
                m.weight.data = torch.empty(m.weight.shape, dtype=torch.float8_e4m3fn, device="meta")
    assert 31e9 < tensor_bytes(bf16) < 34e9 and 15e9 < tensor_bytes(fp8) < 19e9
    s480_bf16 = choose_blocks_to_swap(bf16, 12, 32760)
    s480_fp8 = choose_blocks_to_swap(fp8, 12, 32760)
    s720_fp8 = choose_blocks_to_swap(fp8, 24, 75600)
    s720_fp8_cfg = choose_blocks_to_swap(fp8, 24, 75600, batch=2)
    assert 0 < s480_fp8 < s480_bf16 < 40 and 0 < s720_fp8 < s720_fp8_cfg <= 40
    assert choose_blocks_to_swap(bf16, 80, 32760) == 0
    assert estimate_vram_bytes(fp8, 75600, s720_fp8) <= 24 * 2 ** 30


@pytest.fixture(scope="module")
def meta_14b_fp8():
    with torch.device("meta"):
        dit = WanDiT(WAN21_I2V_14B).to(torch.bfloat16)
    for b in dit.blocks:
        for m in b.modules():
            if hasattr(m, "weight_scale"):
                m.weight.data = torch.empty(m.weight.shape, dtype=torch.float8_e4m3fn, device="meta")
    return dit


def test_plan_prefers_batching_then_fewest_swapped_blocks(meta_14b_fp8):
    dit, plan, settings = meta_14b_fp8, offload.plan_placement, offload.MemorySettings()
    assert plan(dit, "cuda", 32760, True, settings, budget_gib=80) == (0, True)  # all resident, batched
    blocks, batched = plan(dit, "cuda", 75600, True, settings, budget_gib=24)  # 720p on a 24 GiB card
    assert not batched and 0 < blocks < 40
    assert offload.estimate_vram_bytes(dit, 75600, blocks, 1) <= 24 * 2 ** 30
    assert offload.estimate_vram_bytes(dit, 75600, blocks - 1, 1) > 24 * 2 ** 30  # no more than needed
    assert plan(dit, "cuda", 32760, False, settings, budget_gib=80) == (0, False)  # no guidance: batch 1


def test_plan_honours_fixed_settings(meta_14b_fp8):
    dit, plan = meta_14b_fp8, offload.plan_placement
    assert plan(dit, "cuda", 32760, True, offload.MemorySettings(block_swap=12, batch_cfg=False),
                budget_gib=80) == (12, False)
    assert plan(dit, "cuda", 32760, True, offload.MemorySettings(block_swap="off"), budget_gib=80) == (0, True)
    assert plan(dit, "cpu", 75600, True, offload.MemorySettings(), budget_gib=1) == (0, True)  # CPU: nothing to swap
    with pytest.raises(ValueError, match="the model has 40 blocks"):
        plan(dit, "cuda", 32760, True, offload.MemorySettings(block_swap=41), budget_gib=80)
    for bad in (dict(block_swap="sometimes"), dict(block_swap=-1), dict(vram_budget_gb=0)):
        with pytest.raises(ValueError):
            offload.MemorySettings(**bad)
