"""meft_fx.progress: progress lines always, never, or once the work has taken AUTO_AFTER seconds."""
from __future__ import annotations

import meft_fx
from meft_fx import progress


def test_auto_progress_is_silent_when_quick_and_shows_every_line_when_slow(capsys, monkeypatch):
    monkeypatch.setattr(progress, "AUTO_AFTER", 3600.0)
    quick = progress.Progress(None)
    quick("capturing")
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(progress, "AUTO_AFTER", 0.0)
    slow = progress.Progress(None)
    slow("capturing")
    slow("done")
    err = capsys.readouterr().err.splitlines()
    assert [line.split("] ")[1] for line in err] == ["capturing", "done"]


def test_lines_held_back_are_printed_first_and_false_is_silent(capsys, monkeypatch):
    monkeypatch.setattr(progress, "AUTO_AFTER", 3600.0)
    p = progress.Progress(None)
    p("one")
    monkeypatch.setattr(progress, "AUTO_AFTER", 0.0)
    p("two")
    assert [line.split("] ")[1] for line in capsys.readouterr().err.splitlines()] == ["one", "two"]
    progress.Progress(False)("never")
    assert capsys.readouterr().err == ""
    assert meft_fx.MEFTConfig().verbose is None  # the default: shown when slow
