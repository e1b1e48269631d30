"""The wheel works without the source tree: `pip wheel` of a copy of the sources, installed (not
editable) into a fresh virtual environment, exports a checkpoint and serves the result.

The fresh environment reuses this environment's third-party packages through a .pth line (no
download, no torch re-install); `tidar` itself comes only from the wheel (the check below). Also:
a missing optional dependency is one line naming its extra, without a traceback.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(args, **kwargs):
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=600, **kwargs)
    assert result.returncode == 0, f"{args}: {result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("wheel")
    listed = run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT).stdout.split()
    source = root / "src"
    for name in listed:
        if not name.startswith(("tests/", "benchmarks/")) and (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(source), "-w",
         root / "dist"])
    wheel = next((root / "dist").glob("tidar_trt-*.whl"))
    env = root / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", env])
    python = env / "bin" / "python"
    purelib = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    (purelib / "_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index", wheel])
    return wheel, env


def test_wheel_ships_templates_and_the_bundled_model(wheel_env):
    wheel, env = wheel_env
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"tidar/triton_repo/tidar/config.pbtxt", "tidar/triton_repo/tidar/1/model.py",
            "tidar/triton_repo/ensemble/config.pbtxt", "tidar/models/tidar-stdlib-qwen2/model.safetensors",
            "tidar/models/tidar-stdlib-qwen2/tokenizer.json", "tidar/serving/openai_front.py",
            "tidar/serving/wire.py", "tidar/runtime/backends/base.py"} <= names
    model_files = run(["git", "ls-files", "models"], cwd=ROOT).stdout.split()
    assert any("/self-distill/" in name for name in model_files)
    assert {f"tidar/{name}" for name in model_files} <= names, "the wheel lacks part of the bundled model"
    where = run([env / "bin" / "python", "-c", "import tidar; from tidar.serving.repository import TEMPLATES; "
                 "print(tidar.__file__, tidar.BUNDLED_MODEL.is_dir(), TEMPLATES.is_dir())"], cwd=env).stdout.split()
    assert Path(where[0]).is_relative_to(env) and where[1:] == ["True", "True"]


def test_export_and_serve_from_the_wheel(wheel_env, tiny_checkpoints, tmp_path):
    _, env = wheel_env
    out = tmp_path / "out"
    run([env / "bin" / "tidar-export", "build", tiny_checkpoints["qwen2"], "-o", out, "-q"], cwd=tmp_path)
    assert (out / "triton_repo" / "tidar" / "1" / "model.py").is_file()
    script = "from tidar.serving.client import request; r = request(__import__('os').environ['TIDAR_GRPC_URL'], 'ab', 5); " \
             "print(len(r.token_ids), r.finish_reason)"
    served = run([env / "bin" / "tidar", "serve", out / "triton_repo", "--grpc-port", "0", "--http-port", "0",
                  "--metrics-port", "0", "--", env / "bin" / "python", "-c", script], cwd=tmp_path)
    assert served.stdout.split() in (["5", "length"], [served.stdout.split()[0], "stop"])


@pytest.mark.parametrize("argv,module,extra", [
    (["tidar-export", "build", "-o", "OUT"], "onnx_ir", "export"),
    (["tidar", "client", "x"], "tritonclient", "serve"),
    (["tidar", "generate", "--prompt", "x", "--attention", "triton", "--max-new-tokens", "2"], "triton", "kernel"),
    (["tidar", "serve", "REPO", "--openai-port", "0"], "aiohttp", "openai"),
])
def test_a_missing_optional_dependency_is_one_line_naming_its_extra(wheel_env, tmp_path, argv, module, extra):
    """Run as if `module` were not installed (None in sys.modules makes its import fail)."""
    _, env = wheel_env
    if "REPO" in argv:
        from tidar import BUNDLED_MODEL
        from tidar.serving.repository import render_repository

        repo = render_repository(tmp_path / "repo", model_dir=str(BUNDLED_MODEL), backend="torch", draft_len="0")
        argv = [str(repo) if a == "REPO" else a for a in argv]
    argv = [str(tmp_path / a) if a == "OUT" else a for a in argv]
    main = "tidar.export.cli" if argv[0] == "tidar-export" else "tidar.cli"
    code = (f"import sys; sys.modules[{module!r}] = None; sys.argv = {argv!r}; "
            f"from {main} import main; sys.exit(main())")
    result = subprocess.run([str(env / "bin" / "python"), "-c", code], capture_output=True, text=True, timeout=600,
                            cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f'pip install "tidar-trt[{extra}]"' in result.stderr and module in result.stderr
    assert len(result.stderr.strip().splitlines()[-1]) < 200
