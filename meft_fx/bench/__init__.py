"""Benchmarks: activation memory and step time of meft_fx against its baselines, in one run.

    python -m meft_fx.bench --hidden 384 --depths 6,12,24 --seqs 256,512 --batch 8 --out results/

`run` holds the methods, the measurement and the report (see its docstring).
"""
