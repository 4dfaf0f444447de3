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
