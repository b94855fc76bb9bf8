"""Files the engine writes get the mode of a plain write under the user's umask (0644 under umask 022), whatever
mode the library writing them chose (safetensors makes its files 0600)."""
import os
import stat


from pafm.files import atomic_write

from helpers import run_in_process


def _modes(folder):
    return {p.relative_to(folder).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in folder.rglob("*")
            if p.is_file()}


def test_atomic_write_gives_the_umask_mode(tmp_path):
    old = os.umask(0o027)
    try:
        path = atomic_write(tmp_path / "x.bin", lambda tmp: (tmp.write_bytes(b"x"), os.chmod(tmp, 0o600)))
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_every_file_of_a_run_is_readable_by_the_group_and_others(in_process, capsys, tmp_path):
    old = os.umask(0o022)
    try:
        code, err = run_in_process(in_process, capsys, tmp_path / "run")
    finally:
        os.umask(old)
    assert code == 0, err
    modes = _modes(tmp_path / "run")
    assert "checkpoints/step_0000003/rank0.safetensors" in modes and "ema.safetensors" in modes
    assert {name: mode for name, mode in modes.items() if mode != 0o644} == {}
