"""meft_fx.bench.generation at a tiny size: rows for the three runs, ratios against the unconverted model."""
import pytest

from meft_fx.bench.generation import METHODS, format_generation, measure_generation
from meft_fx.bench.models import BenchModel


@pytest.mark.slow
def test_generation_rows_at_tiny_size():
    spec = BenchModel("llama", 32, 64, heads=4, kv_heads=2, intermediate=64)
    rows = measure_generation(spec, 2, prompt=4, new_tokens=8, rounds=1)  # (1 layer: the layer is the owner)
    assert [r["method"] for r in rows] == list(METHODS)
    assert rows[0]["ratio"] == 1.0 and all(r["tokens_s"] > 0 and r["ratio"] > 0 for r in rows)
    assert "| meft_cached |" in format_generation(rows, spec.title)
    with pytest.raises(ValueError, match="--arch llama"):
        measure_generation(BenchModel("bert", 32, 64), 1)
