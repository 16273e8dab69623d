"""Module discovery over the four architectures."""

from __future__ import annotations

import pytest

from ray_influence.modules import decoder_blocks, find_tracked_modules
from ray_influence.toy import tiny_model

EXPECTED = {  # per block: tracked suffixes
    "gpt_neox": {"attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"},
    "llama": {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"},
    "gpt2": {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"},
    "bloom": {"self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"},
}


def test_default_selection(model64, arch):
    specs = find_tracked_modules(model64)
    stack, blocks = decoder_blocks(model64)
    got = {(s.block, n.removeprefix(f"{stack}.{s.block}.")) for n, s in specs.items()}
    assert got == {(b, suffix) for b in range(len(blocks)) for suffix in EXPECTED[arch]}
    assert not any("lm_head" in n or "embed" in n for n in specs)
    mods = dict(model64.named_modules())
    for n, s in specs.items():
        w = mods[n].weight
        assert tuple(w.shape) == ((s.d_in, s.d_out) if s.transposed else (s.d_out, s.d_in)), n


def test_llama_grouped_query_attention_shapes():
    model = tiny_model("llama", 40, hidden=16, heads=4)
    specs = find_tracked_modules(model)
    q, k = specs["model.layers.0.self_attn.q_proj"], specs["model.layers.0.self_attn.k_proj"]
    assert q.d_out == 16 and k.d_out == 8 and not k.bias


def test_gpt2_conv1d_is_transposed():
    specs = find_tracked_modules(tiny_model("gpt2", 40, hidden=8, heads=2))
    s = specs["transformer.h.0.mlp.c_fc"]
    assert s.transposed and s.bias and (s.d_out, s.d_in_aug) == (32, 9)


@pytest.mark.parametrize("include,exclude,n_per_block", [
    (["*mlp*"], [], 2), (["*"], ["*attention*"], 2), (["*.dense"], [], 1),
])
def test_globs(include, exclude, n_per_block):
    specs = find_tracked_modules(tiny_model("gpt_neox", 40, hidden=8, heads=2), include, exclude)
    assert len(specs) == 2 * n_per_block


def test_block_range_selects_a_shard():
    model = tiny_model("gpt2", 40, hidden=8, layers=3, heads=2)
    specs = find_tracked_modules(model, blocks=range(1, 3))
    assert {s.block for s in specs.values()} == {1, 2}


def test_empty_selection_is_an_error():
    with pytest.raises(ValueError, match=r"include=\['\*xyz\*'\]"):
        find_tracked_modules(tiny_model("bloom", 40, hidden=8, heads=2), ["*xyz*"])
