"""What the README shows runs as shown: the quickstart, and the test command is the one CI runs."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def test_the_readme_test_command_is_what_ci_runs():
    commands = re.findall(r"```bash\n(.*?)\n```", README, re.S)
    assert len(commands) == 2  # the main job, the tests
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci.replace(" -q", "") == commands[1].replace(" -q", "")
    assert "examples/finetune_smollm2.py" in commands[0] and (ROOT / "examples" / "finetune_smollm2.py").is_file()


def test_readme_is_short_and_links_existing_pages():
    assert len(README.encode()) <= 15 * 1024
    for link in re.findall(r"\]\((docs/[^)#]+)", README):
        assert (ROOT / link).is_file(), link
    index = (ROOT / "docs" / "index.md").read_text()
    for page in re.findall(r"\]\(([a-z_]+\.md)\)", index):
        assert (ROOT / "docs" / page).is_file(), page


@pytest.mark.slow
def test_the_quickstart_runs_as_written(tmp_path, monkeypatch, capsys):
    code = re.search(r"## Quickstart\n\n```python\n(.*?)```", README, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README quickstart", "exec"), {})
    out = capsys.readouterr().out
    assert "starting point" in out and "The capital of Japan is Tokyo." in out
    assert 2.2e6 < (tmp_path / "adapters" / "meft_adapters.safetensors").stat().st_size < 2.5e6  # "2.3 MB"
