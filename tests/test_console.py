"""Progress off a terminal: plain lines every tenth of the work, never a bar's redraws."""

from latexblend.console import Progress, interactive


def test_off_a_terminal_progress_prints_a_line_every_tenth(capsys):
    assert not interactive()  # pytest captures stderr: not a terminal
    with Progress(20, "generate", "img") as bar:
        for _ in range(20):
            bar.update()
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 10 and lines[0].startswith("generate: 2/20 img (") and lines[-1].startswith("generate: 20/20")
    assert "\r" not in err


def test_silent_progress_and_log_only_progress_print_no_counter(capsys):
    with Progress(5, "prior", "img", enabled=False) as off, Progress(5, "run", "step", lines=False) as logged:
        for _ in range(5):
            off.update()
            logged.update()
        logged.write("step 5/5 | loss 0.1")
    out = capsys.readouterr()
    assert out.err == "" and out.out == "step 5/5 | loss 0.1\n"
