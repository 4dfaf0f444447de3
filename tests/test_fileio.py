import json
import os

import pytest

from latexblend.errors import LatexBlendError
from latexblend.fileio import LOCK_FILE, atomic_path, claim_folder, save_safetensors, write_text_atomic
from latexblend.settings import safe_name


def test_atomic_write_has_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        path = write_text_atomic(tmp_path / "a.txt", "hello")
    finally:
        os.umask(old)
    assert path.read_text() == "hello"
    assert (path.stat().st_mode & 0o777) == 0o644


def test_atomic_write_failure_keeps_old_content(tmp_path):
    path = write_text_atomic(tmp_path / "a.txt", "old")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_safetensors_metadata_is_sorted_and_identical_saves_are_identical_bytes(tmp_path):
    """safetensors writes its metadata in hash order, different from one call to the next."""
    import json

    import torch
    from safetensors import safe_open

    tensors = {"b": torch.arange(6.0).view(2, 3), "a": torch.ones(4, dtype=torch.float16)}
    meta = {k: f"value {k} é" for k in ("name", "zeta", "alpha", "format", "m", "training", "dtype", "class_noun")}
    paths = [save_safetensors(tensors, tmp_path / f"{i}.safetensors", meta) for i in range(4)]
    assert len({p.read_bytes() for p in paths}) == 1
    data = paths[0].read_bytes()
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    assert list(header["__metadata__"]) == sorted(meta)
    with safe_open(str(paths[0]), framework="pt") as f:
        assert f.metadata() == meta and torch.equal(f.get_tensor("b"), tensors["b"])


@pytest.mark.parametrize("name", ["../x", "a/b", "..", ".hidden", "", " a", "a ", "x" * 101, None, 7, "a\\b"])
def test_unsafe_names_are_refused(name):
    with pytest.raises(LatexBlendError, match="is not allowed"):
        safe_name(name)


def test_safe_names_pass_and_spaces_only_when_allowed():
    assert safe_name("corgi-2.v1_x") == "corgi-2.v1_x"
    assert safe_name("guitar amplifier", spaces=True) == "guitar amplifier"
    with pytest.raises(LatexBlendError, match="is not allowed"):
        safe_name("guitar amplifier")
    with pytest.raises(LatexBlendError, match="is not allowed"):
        safe_name("../dog", spaces=True)


def test_claim_folder_refuses_a_folder_in_use_and_takes_over_a_stale_lock(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "out"
    with claim_folder(out, "generate") as path:
        assert json.loads((path / LOCK_FILE).read_text())["pid"] == os.getpid()
        other = subprocess.run([sys.executable, "-c", CLAIM.format(out=str(out))], capture_output=True, text=True)
        assert other.returncode == 3
        assert f"{out} is in use by another generate (pid {os.getpid()}, since " in other.stdout
    assert not (out / LOCK_FILE).exists() and out.is_dir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / LOCK_FILE).write_text(f"{dead.pid}\n")  # left by a process that has ended
    with claim_folder(out, "generate"):
        assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert not (out / LOCK_FILE).exists()


def test_a_lock_records_host_and_start_and_a_reused_pid_is_not_a_live_run(tmp_path):
    """A live process that merely reuses the pid of a lock (its start differs) does not block the folder; the
    lock's own process does; a lock of another host is never taken over, even when its pid is free here."""
    import socket

    from latexblend.fileio import _process_start

    out = tmp_path / "out"
    with claim_folder(out, "generate"):
        record = json.loads((out / LOCK_FILE).read_text())
    assert record["host"] == socket.gethostname() and record["started"].endswith("UTC")
    assert record["process_start"] == _process_start(os.getpid()) is not None
    parent = os.getppid()  # alive, not us
    (out / LOCK_FILE).write_text(json.dumps({"pid": parent, "host": socket.gethostname(), "process_start": "1"}))
    with claim_folder(out, "generate"):  # pid reused by another process: taken over
        assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()
    for record in ({"pid": parent, "host": socket.gethostname(), "process_start": _process_start(parent)},
                   {"pid": 2**22 + 17, "host": "node-other-7"}):
        (out / LOCK_FILE).write_text(json.dumps(record))
        with pytest.raises(LatexBlendError, match=f"in use by another generate .*delete {out / LOCK_FILE}"):
            with claim_folder(out, "generate"):
                pass
        assert json.loads((out / LOCK_FILE).read_text()) == record  # left as it was


CLAIM = """
from latexblend.errors import LatexBlendError
from latexblend.fileio import claim_folder
try:
    with claim_folder({out!r}, "generate"):
        pass
except LatexBlendError as err:
    print(err)
    raise SystemExit(3)
"""


def test_claim_folder_removes_the_folder_it_created_when_the_block_fails(tmp_path):
    with pytest.raises(LatexBlendError), claim_folder(tmp_path / "new" / "deeper"):
        raise LatexBlendError("bad input")
    assert not (tmp_path / "new").exists()
    (tmp_path / "old").mkdir()
    with pytest.raises(LatexBlendError), claim_folder(tmp_path / "old"):
        raise LatexBlendError("bad input")
    assert (tmp_path / "old").is_dir() and not any((tmp_path / "old").iterdir())


def test_documents_are_read_within_limits(tmp_path):
    """YAML aliases are counted expanded (a bomb of 9**6 values from a few hundred bytes is refused before
    anything walks it); JSON is bounded by its size and depth only, so a large output folder's metadata reads."""
    from latexblend.settings import MAX_DEPTH, load_data, parse_json, parse_yaml, read_text

    bomb = "a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + "".join(
        f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 6))
    with pytest.raises(LatexBlendError, match="holds more than 100,000 values"):
        parse_yaml(bomb, "x")
    assert parse_yaml(bomb.rsplit("\n", 2)[0], "x")["a4"][0][0][0][0] == [1] * 9  # 9**5 values: within the limit
    with pytest.raises(LatexBlendError, match="contains itself"):
        parse_yaml("&a [*a]", "x")
    assert parse_json("[" * MAX_DEPTH + "]" * MAX_DEPTH, "x") == parse_yaml("[" * MAX_DEPTH + "]" * MAX_DEPTH, "x")
    for deep in ("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1), "[" * 100_000 + "]" * 100_000):
        with pytest.raises(LatexBlendError, match="nests deeper than 64 levels"):
            parse_json(deep, "x")
        with pytest.raises(LatexBlendError, match="nests deeper than 64 levels"):
            parse_yaml(deep, "x")
    assert len(parse_json(json.dumps([{"file": f"p{i}.png", "seed": i} for i in range(200_000)]), "x")) == 200_000
    with pytest.raises(LatexBlendError, match="not valid JSON"):
        parse_json("9" * 5000, "x")  # more digits than Python converts: one line, not a ValueError
    (tmp_path / "big.json").write_text("[" + "1," * 600_000 + "1]")
    with pytest.raises(LatexBlendError, match="is too large"):
        load_data(tmp_path / "big.json", "data", max_bytes=1_000_000)
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(LatexBlendError, match="is not a regular file"):
        read_text(tmp_path / "pipe", "prompts file")  # a pipe would block the read
    with pytest.raises(LatexBlendError, match="is a directory, not a file"):
        read_text(tmp_path, "config file")
