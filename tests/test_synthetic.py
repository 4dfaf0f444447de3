import numpy as np
import pytest
from PIL import Image

from latexblend.toy.synthetic import draw_concept, main


def test_draw_concept_is_deterministic_and_styles_differ(tmp_path):
    a = draw_concept(tmp_path / "a", "disc", num=3, size=64, seed=1)
    b = draw_concept(tmp_path / "b", "disc", num=3, size=64, seed=1)
    c = draw_concept(tmp_path / "c", "towers", num=3, size=64, seed=1)
    for i in range(3):
        pa, pb, pc = (np.asarray(Image.open(f / f"{i}.png")) for f in (a, b, c))
        assert pa.shape == (64, 64, 3) and np.array_equal(pa, pb) and not np.array_equal(pa, pc)
    red = np.asarray(Image.open(a / "0.png"))
    assert ((red[..., 0] == 220) & (red[..., 1] == 30)).sum() > 100  # the disc is there


def test_unknown_style_and_cli(tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown style"):
        draw_concept(tmp_path, "zebra")
    main([str(tmp_path / "m"), "--style", "towers", "--num", "2"])
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["0.png", "1.png"]
    assert "drew 2 'towers' images" in capsys.readouterr().out


@pytest.mark.parametrize("module, args, message", [
    ("synthetic", ["--num", "1000000000"], "--num must be in [1, 10000], got 1000000000"),
    ("synthetic", ["--size", "0"], "--size must be in [8, 4096], got 0"),
    ("synthetic", ["--seed", str(2**70)], "--seed must be in [0, 9223372036854775807]"),
    ("world", ["--prior", "-1"], "--prior must be in [0, 100000], got -1"),
    ("world", ["--num", "0"], "--num must be in [1, 10000], got 0"),
])
def test_drawing_scripts_bound_their_counts(tmp_path, capsys, module, args, message):
    from latexblend.toy import world

    entry = main if module == "synthetic" else world.main
    with pytest.raises(SystemExit) as stop:
        entry([str(tmp_path / "out"), *args])
    assert stop.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
