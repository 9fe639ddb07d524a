"""No command or API deletes or replaces anything jquant did not create (jquant.atomic and its callers)."""

import subprocess
import sys
import threading

import jax
import numpy as np
import pytest

from jquant import atomic
from jquant.atomic import MARKER, OutputPathError, atomic_folder
from jquant.checkpoint import load, save
from jquant.cli import main
from jquant.models import hf_io, llama

CFG = llama.LlamaConfig(family="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                        num_kv_heads=2)
TOKENS = np.arange(12).reshape(1, 12) % 64


@pytest.fixture(scope="module")
def model():
    return llama.init_model(CFG, jax.random.key(0))


def _user_folder(path):
    path.mkdir()
    (path / "thesis.tex").write_text("years of work")
    return path


def test_existing_file_is_never_replaced(model, tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(OutputPathError, match=r"notes.txt is an existing file.*new folder path"):
            save(model, target, overwrite=overwrite)
    assert target.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_unrelated_folder_is_refused_even_with_overwrite(model, tmp_path):
    folder = _user_folder(tmp_path / "mine")
    for overwrite in (False, True):
        with pytest.raises(OutputPathError, match="non-empty folder that jquant did not write"):
            save(model, folder, overwrite=overwrite)
        with pytest.raises(OutputPathError, match="non-empty folder that jquant did not write"):
            llama.to_hf(model, folder, overwrite=overwrite)
    assert [p.name for p in folder.iterdir()] == ["thesis.tex"]


def test_working_directory_is_refused(model, tmp_path, monkeypatch):
    _user_folder(tmp_path / "work")
    monkeypatch.chdir(tmp_path / "work")
    with pytest.raises(OutputPathError, match="working directory"):
        save(model, ".", overwrite=True)
    assert [p.name for p in (tmp_path / "work").iterdir()] == ["thesis.tex"]


def test_jquant_folder_is_replaced_only_when_asked(model, tmp_path):
    other = llama.init_model(CFG, jax.random.key(1))
    save(model, tmp_path / "ckpt")
    with pytest.raises(OutputPathError, match="pass overwrite=True"):
        save(other, tmp_path / "ckpt")
    np.testing.assert_array_equal(np.asarray(load(tmp_path / "ckpt")(TOKENS)), np.asarray(model(TOKENS)))
    save(other, tmp_path / "ckpt", overwrite=True)
    np.testing.assert_array_equal(np.asarray(load(tmp_path / "ckpt")(TOKENS)), np.asarray(other(TOKENS)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_empty_folder_is_written(model, tmp_path):
    (tmp_path / "empty").mkdir()
    save(model, tmp_path / "empty")
    assert (tmp_path / "empty" / MARKER).is_file()


def test_replacement_is_one_atomic_exchange_with_a_fallback(tmp_path, monkeypatch):
    calls = []
    real = atomic._exchange
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: calls.append(real(a, b)) or calls[-1])
    for version in ("1", "2"):
        with atomic_folder(tmp_path / "out", overwrite=True) as tmp:
            (tmp / "v").write_text(version)
    assert (tmp_path / "out" / "v").read_text() == "2"
    assert calls == [True]  # Linux renameat2(RENAME_EXCHANGE): the target is never absent
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    with atomic_folder(tmp_path / "out", overwrite=True) as tmp:
        (tmp / "v").write_text("3")
    assert (tmp_path / "out" / "v").read_text() == "3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_parent_that_is_a_file_is_named(model, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputPathError, match=r"file is a file, so no folder can be made under it"):
        save(model, tmp_path / "file" / "ckpt")
    with pytest.raises(OutputPathError, match=r"file is a file"):
        hf_io.write_checkpoint(tmp_path / "file" / "a" / "b", llama.config_to_hf(CFG), llama.to_tensors(model))


def test_leftovers_of_a_killed_save_are_cleaned_on_the_next_save(tmp_path):
    script = ("import os, sys; from jquant.atomic import atomic_folder\n"
              "with atomic_folder(sys.argv[1]) as tmp:\n"
              "    (tmp / 'half').write_text('x')\n"
              "    os.kill(os.getpid(), 9)\n")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "ckpt")], capture_output=True)
    assert proc.returncode == -9
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert len(leftovers) == 1 and leftovers[0].startswith(".ckpt.jquant-partial-")
    (tmp_path / ".ckpt.abcd1234").mkdir()  # a partial folder of jquant 0.1 (tempfile.mkdtemp names)
    with atomic_folder(tmp_path / "ckpt") as tmp:
        (tmp / "whole").write_text("y")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [MARKER, "whole"]


def test_folder_set_aside_by_a_killed_replacement_is_restored_not_deleted(tmp_path):
    aside = tmp_path / ".ckpt.old.x1y2z3w4" / "ckpt"  # jquant 0.1 moved the old folder here before the new one
    aside.mkdir(parents=True)
    (aside / "jquant.json").write_text("{}")
    with pytest.raises(OutputPathError, match="already holds a folder jquant wrote"):
        with atomic_folder(tmp_path / "ckpt"):
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert (tmp_path / "ckpt" / "jquant.json").is_file()


def test_a_concurrent_save_to_the_same_path_is_refused(tmp_path):
    inside, release, errors = threading.Event(), threading.Event(), []

    def first():
        with atomic_folder(tmp_path / "ckpt") as tmp:
            (tmp / "a").write_text("first")
            inside.set()
            release.wait(10)

    thread = threading.Thread(target=first)
    thread.start()
    inside.wait(10)
    try:
        with atomic_folder(tmp_path / "ckpt") as tmp:
            (tmp / "a").write_text("second")
    except OutputPathError as err:
        errors.append(str(err))
    release.set()
    thread.join()
    assert len(errors) == 1 and "another jquant save" in errors[0]
    assert (tmp_path / "ckpt" / "a").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_quantize_cli_refuses_a_bad_out_before_any_work(tmp_path, monkeypatch, capsys):
    import jquant.models

    monkeypatch.setattr(jquant.models, "load", lambda *a, **k: pytest.fail("the model was loaded before --out was checked"))
    (tmp_path / "file").write_text("x")
    _user_folder(tmp_path / "work")
    monkeypatch.chdir(tmp_path / "work")
    cases = [(["--out", "."], "working directory"), (["--out", "../file"], "existing file"),
             (["--out", "../file/sub"], "is a file"), (["--out", ".", "--overwrite"], "working directory")]
    for extra, message in cases:
        assert main(["quantize", "--recipe", "rtn-w8", "--no-eval", *extra]) == 2
        assert message in " ".join(capsys.readouterr().err.split())  # rich wraps long lines
    assert [p.name for p in (tmp_path / "work").iterdir()] == ["thesis.tex"]
    assert (tmp_path / "file").read_text() == "x"


def test_train_cli_refuses_bad_out_and_export_before_training(tmp_path, monkeypatch, capsys):
    import jquant.train.reference

    monkeypatch.setattr(jquant.train.reference, "train", lambda *a, **k: pytest.fail("training started"))
    (tmp_path / "file").write_text("x")
    _user_folder(tmp_path / "mine")
    cases = [(["--out", str(tmp_path / "file")], "--out"), (["--out", str(tmp_path / "mine")], "not a jquant run"),
             (["--out", str(tmp_path / "run"), "--export", str(tmp_path / "file")], "--export"),
             (["--out", str(tmp_path / "run"), "--export", str(tmp_path / "mine"), "--overwrite"], "did not write")]
    for extra, message in cases:
        assert main(["train", "--preset", "jq-llama-tiny", "--steps", "2", *extra]) == 2
        assert message in " ".join(capsys.readouterr().err.split())  # rich wraps long lines
    assert (tmp_path / "file").read_text() == "x"
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["thesis.tex"]
    assert not (tmp_path / "run").exists()


def test_output_files_are_checked_before_any_work(tmp_path):
    existing = tmp_path / "clip.gif"
    existing.write_bytes(b"user data")
    with pytest.raises(OutputPathError, match="must end in .gif or .npy"):
        atomic.check_output_file(tmp_path / "clip.png", (".gif", ".npy"))
    with pytest.raises(OutputPathError, match="jquant never replaces"):
        atomic.check_output_file(existing, (".gif",))
    with pytest.raises(OutputPathError, match="pass --overwrite"):
        atomic.check_output_file(existing, (".gif",), overwrite_flag="--overwrite")
    assert atomic.check_output_file(existing, (".gif",), overwrite=True, overwrite_flag="--overwrite") == existing
    (tmp_path / "folder.gif").mkdir()
    with pytest.raises(OutputPathError, match="is a folder"):
        atomic.check_output_file(tmp_path / "folder.gif", (".gif",), overwrite=True)
    with pytest.raises(OutputPathError, match="does not exist"):
        atomic.check_output_file(tmp_path / "missing" / "a.gif", (".gif",))
    assert existing.read_bytes() == b"user data"


def test_a_failed_file_write_leaves_the_target_and_no_partial_file(tmp_path):
    target = tmp_path / "latents.npz"
    target.write_bytes(b"before")

    def fail(tmp):
        tmp.write_bytes(b"half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        atomic.write_file_atomically(target, fail)
    assert target.read_bytes() == b"before" and sorted(p.name for p in tmp_path.iterdir()) == ["latents.npz"]
    atomic.write_file_atomically(target, lambda tmp: tmp.write_bytes(b"after"))
    assert target.read_bytes() == b"after" and sorted(p.name for p in tmp_path.iterdir()) == ["latents.npz"]
