"""What the wheel ships: fastattn with its kernels, and bench/ as fastattn.bench with the console
scripts fastattn-bench and fastattn-check (pyproject.toml). The wheel is built once, from a copy of
the source tree (a build in place could pick up a stale build/ folder), with the environment's
setuptools (a few seconds). .ci/run installs such a wheel in a fresh environment and runs both
scripts; these tests are the fast half: contents, entry points, --help, the check's verdicts."""

from __future__ import annotations

import configparser
import importlib
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import fastattn.bench
from fastattn.bench import __main__ as bench_main
from fastattn.bench import check, parity
from fastattn.testing import Parity

ROOT = Path(__file__).resolve().parent.parent
# Never in the wheel: what a clone holds beside the sources (and what a build leaves).
LEFT_OUT = (".git", ".venv", ".ci", "build", "dist", "*.egg-info", "__pycache__", ".benchmarks",
            ".pytest_cache", "results")
SCRIPTS = {"fastattn-bench": "fastattn.bench.__main__:main",
           "fastattn-check": "fastattn.bench.check:main"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(*LEFT_OUT))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--no-build-isolation", "--wheel-dir", str(tmp / "dist"), str(src)],
                   check=True, capture_output=True, text=True, timeout=120)
    (path,) = (tmp / "dist").glob("fastattn-*.whl")
    with zipfile.ZipFile(path) as whl:
        yield whl


def _sources(folder: str) -> set[str]:
    return {p.name for p in (ROOT / folder).glob("*.py")}


@pytest.mark.parametrize("folder, package", [("bench", "fastattn/bench"),
                                             ("kernels", "fastattn/kernels"),
                                             ("fastattn", "fastattn")])
def test_wheel_holds_every_module(wheel, folder, package):
    shipped = {Path(n).name for n in wheel.namelist() if str(Path(n).parent) == package}
    missing = _sources(folder) - shipped
    assert not missing, f"{package} in the wheel lacks {sorted(missing)}"
    assert "__init__.py" in shipped


def test_wheel_has_no_top_level_bench_or_kernels(wheel):
    tops = {n.split("/")[0] for n in wheel.namelist()}
    assert tops == {"fastattn", f"fastattn-{fastattn.__version__}.dist-info"}, sorted(tops)
    assert not [n for n in wheel.namelist() if "/results/" in n or n.endswith(".sh")]


def _entry_points(wheel: zipfile.ZipFile) -> dict[str, str]:
    text = wheel.read(f"fastattn-{fastattn.__version__}.dist-info/entry_points.txt").decode()
    parser = configparser.ConfigParser()
    parser.read_string(text)
    return dict(parser["console_scripts"]) if parser.has_section("console_scripts") else {}


def test_wheel_declares_both_console_scripts(wheel):
    assert _entry_points(wheel) == SCRIPTS


@pytest.mark.parametrize("script, options", [
    ("fastattn-bench", ("--quick", "--out", "--filter", "--parity-only", "--static", "--host",
                        "--cpu-path", "--budget-s", "--no-plots")),
    ("fastattn-check", ("--quick", "--filter", "--json")),
])
def test_console_script_help(wheel, script, options, capsys, monkeypatch):
    """The function the wheel's entry point names, called as the script calls it."""
    module, _, function = _entry_points(wheel)[script].partition(":")
    monkeypatch.setattr(sys, "argv", [f"/venv/bin/{script}", "--help"])
    with pytest.raises(SystemExit) as exit_:
        getattr(importlib.import_module(module), function)()
    assert exit_.value.code == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"usage: {script} ")
    assert [o for o in options if o not in printed] == []


def test_python_m_fastattn_bench_help():
    """`python -m fastattn.bench.check --help` in a fresh process: the package imports whole
    (and sets up the interpreter) the way an installed one does, outside the repository."""
    done = subprocess.run([sys.executable, "-m", "fastattn.bench.check", "--help"], cwd="/",
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("usage: python -m fastattn.bench.check ")


def test_check_passes_and_prints_every_output(tmp_path, capsys):
    out = tmp_path / "records.json"
    assert check.main(["--quick", "--filter", "^rms_norm$", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    records = json.loads(out.read_text())
    n = len(parity.device_dtypes()) * 3  # out, dx, dw in each dtype
    assert len(records) == n and all(r["pass"] is True for r in records)
    rows = [line for line in printed.splitlines() if line.startswith("rms_norm ")]
    assert len(rows) == n and all(" pass " in row for row in rows)
    assert f"{n} of {n} outputs pass" in printed


def test_check_exits_1_on_a_failing_output(capsys, monkeypatch):
    monkeypatch.setattr(parity, "parity", lambda *args: Parity(err=1.0, torch_err=0.0, bound=0.5))
    assert check.main(["--quick", "--filter", "^rms_norm$"]) == 1
    printed = capsys.readouterr().out
    rows = [line for line in printed.splitlines() if line.startswith("rms_norm ")]
    assert rows and all(" FAIL " in row for row in rows)


def test_check_exits_1_when_no_op_matches(capsys):
    assert check.main(["--filter", "^no such op$"]) == 1
    assert "no op matches" in capsys.readouterr().out


@pytest.mark.parametrize("script", ["check", "bench"])
def test_scripts_say_on_a_cpu_without_numpy_that_the_interpreter_needs_it(script, tmp_path,
                                                                          monkeypatch, capsys):
    """numpy is no dependency of fastattn, but Triton's interpreter imports it: exit 2, saying so,
    before any kernel runs."""
    if fastattn.bench.HAS_CUDA:
        pytest.skip("on CUDA the kernels are compiled: no interpreter, no numpy needed")
    monkeypatch.setitem(sys.modules, "numpy", None)  # find_spec("numpy") is None
    monkeypatch.chdir(tmp_path)  # fastattn-check writes nothing; fastattn-bench's --out is here
    if script == "check":
        assert check.main(["--quick"]) == 2
    else:
        assert bench_main.main(["--quick", "--out", str(tmp_path / "out")]) == 2
    assert "needs numpy: pip install numpy" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_plots_say_how_to_install_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    assert bench_main.plots([], {}, tmp_path, "cpu") == ([], bench_main.NO_MATPLOTLIB)
    assert "fastattn[bench]" in bench_main.NO_MATPLOTLIB
    assert list(tmp_path.iterdir()) == []


def test_installed_package_writes_outside_its_folder(tmp_path, monkeypatch):
    """In a clone the default output folder is bench/results/; an installed fastattn.bench (no
    pyproject.toml beside it) writes under the working directory, not into site-packages."""
    monkeypatch.chdir(tmp_path)
    clone = Path(fastattn.bench.__file__).resolve().parent
    assert bench_main.default_out("slug") == clone / "results" / "slug"
    monkeypatch.setattr(bench_main, "__file__", str(tmp_path / "site" / "bench" / "__main__.py"))
    assert bench_main.default_out("slug") == tmp_path / "fastattn-bench" / "slug"
