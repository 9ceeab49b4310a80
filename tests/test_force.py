"""`--force` replaces an earlier output, nothing else: for every kind of thing an output path can already be
(a regular file, a folder, a FIFO, a character device, a symlink), each writer (a folder output, a GGUF output,
a single-file output) either replaces it as documented or refuses it with exit 5, one line and a hint, and the
thing is left exactly as it was. A device replaced by a model folder (`apply --out /dev/null --force`) was the
case that led here."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from conftest import make_llama, random_lock, run_cli
from gguf_helpers import lock_for_gguf, write_gguf

from weightlock import save_lock


def _make(kind: str, path: Path, tmp: Path) -> None:
    if kind == "file":
        path.write_text("precious")
    elif kind == "folder":
        path.mkdir()
        (path / "precious.txt").write_text("precious")
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "device":
        try:
            os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # /dev/null's numbers
        except PermissionError:
            pytest.skip("creating a device node needs root")
    elif kind == "symlink":
        (tmp / "elsewhere").write_text("precious")
        path.symlink_to(tmp / "elsewhere")


def _state(path: Path):
    st = os.lstat(path)
    content = sorted(os.listdir(path)) if stat.S_ISDIR(st.st_mode) else None
    return stat.S_IFMT(st.st_mode), st.st_ino, content


# what each writer may replace under --force; everything else is refused with exit 5
REPLACEABLE = {
    "folder-output": {"folder", "symlink"},
    "gguf-output": {"file", "symlink"},
    "file-output": {"file", "symlink"},
}
KINDS = ["file", "folder", "fifo", "device", "symlink"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    base = tmp_path_factory.mktemp("force")
    src = make_llama(base / "src", shard_kb=40)
    save_lock(random_lock(src), base / "l.wlock")
    gguf = write_gguf(base / "m.gguf")
    save_lock(lock_for_gguf(gguf), base / "g.wlock")
    return base


def _command(writer: str, base: Path, out: Path) -> list[str]:
    if writer == "folder-output":
        return ["apply", str(base / "src"), "--lock", str(base / "l.wlock"), "--out", str(out), "--force"]
    if writer == "gguf-output":
        return ["apply", str(base / "m.gguf"), "--lock", str(base / "g.wlock"), "--out", str(out), "--force"]
    return ["inspect", str(base / "l.wlock"), "--heatmap", str(out), "--force"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("writer", sorted(REPLACEABLE))
def test_force_replaces_only_an_earlier_output(inputs, tmp_path, capsys, writer, kind):
    if writer == "file-output":
        pytest.importorskip("matplotlib")
    name = {"gguf-output": "out.gguf", "file-output": "out.png"}.get(writer, "out")
    out = tmp_path / name
    _make(kind, out, tmp_path)
    before = _state(out)
    code, _, err = run_cli(capsys, *_command(writer, inputs, out))
    assert "Traceback" not in err, err
    if kind in REPLACEABLE[writer]:
        assert code == 0, err
        if kind == "symlink":  # the link is replaced, never what it points to
            assert (tmp_path / "elsewhere").read_text() == "precious"
        assert not out.is_symlink()
    else:
        assert code == 5 and err.count("weightlock: error:") == 1 and "hint:" in err, err
        assert _state(out) == before


def test_an_output_folder_is_created_only_in_an_existing_folder_and_tilde_is_not_home(inputs, tmp_path, capsys):
    """weightlock creates the output, never folders above it (a typo in a path must not grow a tree), and a
    quoted ~ is a folder named ~ (the shell expands ~; weightlock writing into $HOME would be a surprise)."""
    os.chdir(tmp_path)
    for out in (tmp_path / "missing" / "out", Path("~/out"), tmp_path / "missing" / "o.gguf"):
        src, lock = ("m.gguf", "g.wlock") if str(out).endswith(".gguf") else ("src", "l.wlock")
        code, _, err = run_cli(capsys, "apply", str(inputs / src), "--lock", str(inputs / lock), "--out", str(out))
        assert code == 5 and "does not exist" in err and "hint:" in err, err
    assert not (tmp_path / "missing").exists() and not (tmp_path / "~").exists()
    assert not (Path.home() / "out").exists()


def test_heatmap_of_something_that_is_not_a_lock_is_refused(inputs, tmp_path, capsys):
    for target in (inputs / "src", inputs / "m.gguf"):
        code, _, err = run_cli(capsys, "inspect", str(target), "--heatmap", str(tmp_path / "h.png"))
        assert code == 3 and "not a lock file" in err, err
        assert not (tmp_path / "h.png").exists()
