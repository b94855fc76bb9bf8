"""The checkout's import names and its pinned install: nothing here may shadow a distribution of the ecosystem, and
the install commands use the exact versions of constraints.txt."""
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

PROBE = """
import importlib, json, sys
out = {}
for name in sys.argv[1:]:
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as err:
        out[name] = "not installed" if err.name == name else f"error: {err}"
    else:
        out[name] = getattr(module, "__file__", None) or "namespace:" + ",".join(getattr(module, "__path__", []))
print(json.dumps(out))
"""


def import_from_checkout(names, pythonpath=None):
    """Where each name is imported from by `python -c` run in the repository root (the root is then sys.path[0])."""
    env = {"PATH": "/usr/bin:/bin", **({"PYTHONPATH": str(pythonpath)} if pythonpath else {})}
    proc = subprocess.run([sys.executable, "-c", PROBE, *names], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def names_in_checkout() -> list[str]:
    """Every top-level name Python could resolve in the repository root: identifier-named folders and .py files."""
    names = {p.stem if p.is_file() else p.name for p in ROOT.iterdir() if p.is_dir() or p.suffix == ".py"}
    return sorted(n for n in names if n.isidentifier())


def test_the_distribution_installs_only_pafm_and_pafm_kernels():
    packages = PROJECT["tool"]["setuptools"]["packages"]
    assert {p.split(".")[0] for p in packages} == {"pafm", "pafm_kernels"}
    assert PROJECT["tool"]["setuptools"]["package-dir"] == {"pafm_kernels": "kernels"}
    # A non-editable install (a wheel) holds only the listed packages: every folder of pafm/ must be one of them.
    folders = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "pafm").rglob("__init__.py")}
    assert folders == {p for p in packages if p.startswith("pafm.") or p == "pafm"}


def test_no_top_level_name_of_the_checkout_shadows_an_installed_package(tmp_path):
    """From the repository root, every name but `pafm` resolves to the installed package of that name when there is
    one, and `kernels` fails as not installed when there is none; the only regular packages or modules in the root
    are `pafm` and `kernels` (whose __init__ hands any name but `pafm_kernels` over)."""
    names = names_in_checkout()
    assert "pafm" in names and "kernels" in names
    regular = sorted(n for n in names if (ROOT / n / "__init__.py").is_file() or (ROOT / f"{n}.py").is_file())
    assert regular == ["kernels", "pafm"]
    others = [n for n in names if n != "pafm"]
    for name in others:  # a stand-in for a distribution installed under each name
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("")
    found = import_from_checkout(others, pythonpath=tmp_path)
    assert found == {n: str(tmp_path / n / "__init__.py") for n in others}

    found = import_from_checkout(["pafm", "pafm_kernels", "kernels"])
    assert found["pafm"] == str(ROOT / "pafm" / "__init__.py")
    assert found["pafm_kernels"] == str(ROOT / "kernels" / "__init__.py")
    assert found["kernels"] == "not installed" or not found["kernels"].startswith(str(ROOT)), found["kernels"]


def test_kernels_from_the_checkout_is_the_installed_distribution_for_diffusers_and_transformers():
    code = ("from diffusers import AutoencoderKL; from transformers import CLIPTextModel; import kernels; "
            "print(kernels.__file__)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not proc.stdout.strip().startswith(str(ROOT)), proc.stdout


def constrained(requirement: str, pins: dict) -> bool:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-") in pins


def test_every_dependency_is_pinned_and_both_commands_use_the_pins():
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.lower().replace("_", "-")] = version
    project = PROJECT["project"]
    wanted = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    assert [r for r in wanted if not constrained(r, pins)] == []
    assert pins["torch"] == "2.14.1" and pins["torchvision"] == "0.29.1"
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    test_command = 'pip install -c constraints.txt -e ".[test]" && python -m pytest tests -q'
    assert test_command in readme
    assert 'pip install -q -c constraints.txt -e ".[test]"\npython -m pytest tests -q' in ci
    assert "pip install -c constraints.txt -e . && torchrun" in readme
    assert "bash .ci/update-constraints" in readme
