import subprocess
import sys

from typer.testing import CliRunner

from latexblend import __version__
from latexblend.cli import app

runner = CliRunner()


def test_help_and_version_do_not_import_heavy_libraries():
    code = ("import sys; from typer.testing import CliRunner; from latexblend.cli import app; "
            "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0, r.output; "
            "heavy = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]; "
            "print('HEAVY', heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out


def test_console_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "latexblend", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"latexblend {__version__}"


def test_tiny_model_command(tmp_path):
    r = runner.invoke(app, ["tiny-model", str(tmp_path / "m")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "m" / "model_index.json").exists()
    r = runner.invoke(app, ["tiny-model", str(tmp_path / "m")])
    assert r.exit_code == 2 and r.output.startswith("error: ") and "not empty" in r.output


def test_bank_ls_empty_and_unreadable(tmp_path):
    r = runner.invoke(app, ["bank", "ls", "--dir", str(tmp_path)])
    assert r.exit_code == 0 and "no banks" in r.output
    (tmp_path / "broken.safetensors").write_bytes(b"xx")
    r = runner.invoke(app, ["bank", "ls", "--dir", str(tmp_path)])
    assert r.exit_code == 0 and "broken" in r.output and "unreadable" in r.output


def test_verify_unknown_bank_is_one_line():
    r = runner.invoke(app, ["bank", "verify", "nobody"])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "no concept 'nobody'" in r.output



def test_help_defaults_come_from_the_settings():
    """Help texts read their defaults from the option dataclasses and recipes (no copied literals), and each
    command shows its own options."""
    from latexblend.blend.options import GenerateConfig, GuidanceOptions
    from latexblend.train.options import RECIPES

    def text(*args):
        return " ".join(runner.invoke(app, [*args, "--help"]).output.split())

    train = text("train")
    assert f"toy: {RECIPES['toy']['steps']}" in train and f"toy: {RECIPES['toy']['lr']:g}" in train
    generate = text("generate")
    assert f"Denoising steps [{GenerateConfig.steps}]" in generate
    assert f"Guide while t/T >= this [{GuidanceOptions.window}]" in generate
    assert "Images per forward pass" in text("evaluate")
