from meft_fx.passes import ResidualUnit, Stack, StreamAnalysis, group_layers


def unit(i, kind):
    return ResidualUnit(start=f"s{i}", add=f"a{i}", end=f"s{i + 1}", branch_out=f"b{i}", kind=kind, module=f"m{i}", entry=f"s{i}")


def analysis(kinds):
    return StreamAnalysis(stacks=[Stack(units=[unit(i, k) for i, k in enumerate(kinds)], owner="enc")], rejected=[])


def test_attention_then_ffn_is_a_layer():
    out = group_layers(analysis(["attention", "ffn"] * 3))
    assert len(out.stacks) == 1 and len(out.stacks[0].layers) == 3
    assert out.stacks[0].start == "s0" and out.stacks[0].end == "s6"


def test_decoder_layer_with_self_and_cross_attention():
    out = group_layers(analysis(["attention", "attention", "ffn"] * 2))
    layers = out.stacks[0].layers
    assert [len(l.units) for l in layers] == [3, 3]
    assert [u.kind for u in layers[0].attention] == ["attention", "attention"]


def test_incomplete_layers_split_the_stack_with_reasons():
    out = group_layers(analysis(["ffn", "attention", "ffn", "ffn", "attention", "ffn", "attention"]))
    assert [len(s.layers) for s in out.stacks] == [1, 1]
    assert sum("no attention block before it" in r for r in out.rejected) == 2
    assert any("not followed by an FFN" in r for r in out.rejected)


def test_a_parallel_unit_is_a_layer_and_attention_before_it_is_left_out():
    out = group_layers(analysis(["parallel", "attention", "parallel", "parallel"]))
    assert [[u.kind for u in l.units] for s in out.stacks for l in s.layers] == [["parallel"]] * 3
    assert [len(s.layers) for s in out.stacks] == [1, 2]  # the stray attention unit cuts the stack
    assert any("not followed by an FFN" in r for r in out.rejected)
