"""Shared fixtures (random-weight tiny TiDAR checkpoints of each family, written once per run) and
the `uses_fake` marker.

Stand-ins for what cannot run here (vendor code that needs a GPU or compiled libraries, test
doubles of the runtime's executors) live in tests/fakes/. A test that uses one is marked
`uses_fake` automatically: when its body, its fixtures, its parameters, or the functions and
classes of its own module that these reach refer to anything defined in tests/fakes/ (a module,
a class or a subclass of one, a function, an instance). A test that only reaches a stand-in in a
subprocess is marked by hand. The terminal summary says how many tests that ran used one.
"""

from __future__ import annotations

import fcntl
import hashlib
import inspect
import os
import shutil
import types
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if not torch.cuda.is_available():
    # For the whole session, before anything imports triton: without a GPU the hybrid-attention
    # kernel runs under Triton's interpreter (tests that compile it run in a subprocess without this).
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Tiny models: one thread is fastest and avoids oversubscribing a shared 2-core machine.
torch.set_num_threads(1)

FAMILIES = ("qwen2", "qwen3", "llama")


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """{family: folder} of random-weight tiny checkpoints with block size 16 and a real tokenizer."""
    from tidar.train.checkpoint import write_random_checkpoint

    root = tmp_path_factory.mktemp("tiny")
    return {family: write_random_checkpoint(root / family, family, seed=i) for i, family in enumerate(FAMILIES)}


@pytest.fixture(scope="session")
def tiny_backends(tiny_checkpoints):
    """{family: TorchBackend} in fp32 with eager attention."""
    from tidar.runtime.backends.torch_backend import TorchBackend

    return {family: TorchBackend.load(path, dtype="float32") for family, path in tiny_checkpoints.items()}


@pytest.fixture(scope="session")
def hf_models(tiny_checkpoints):
    """{family: transformers AutoModelForCausalLM} loaded from the same folders: the AR oracle."""
    import transformers

    return {family: transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager").eval()
        for family, path in tiny_checkpoints.items()}


@pytest.fixture(scope="session")
def _onnx_exports(tmp_path_factory):
    """`export_onnx` of tidar.export.build, memoised on the config and the weights' bytes in a
    folder this run's xdist workers share (locked): the first call of each exports for real."""
    from tidar.export import build as build_module

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # shared by every worker of this run
    root = root / "onnx-exports"
    root.mkdir(exist_ok=True)
    real = build_module.export_onnx

    def export_onnx(config, source, folder, steps):
        digest = hashlib.sha256(repr((config, build_module.ONNX_DTYPE)).encode())
        for path in sorted(set(source.files.values())):
            digest.update(Path(path).read_bytes())
        done = root / digest.hexdigest()
        with open(root / f"{done.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not done.exists():
                scratch = root / f"{done.name}.partial"
                shutil.rmtree(scratch, ignore_errors=True)
                scratch.mkdir()
                real(config, source, scratch, steps)
                scratch.rename(done)
        shutil.copytree(done, folder, dirs_exist_ok=True)

    return export_onnx


@pytest.fixture(scope="module")
def reused_onnx_export(_onnx_exports):
    """For a module's tests (`pytestmark = pytest.mark.usefixtures("reused_onnx_export")`):
    `tidar-export build` takes its ONNX step's output (both step graphs, the LM-head graph, their
    weights: ~20 s per tiny checkpoint) from an earlier real export of the same config and weights
    in this test run. For tests of what a build does around that step (engines, the repository,
    --force, the manifest); tests of the ONNX export itself do not use it."""
    from tidar.export import build as build_module

    patch = pytest.MonkeyPatch()
    patch.setattr(build_module, "export_onnx", _onnx_exports)
    yield
    patch.undo()


# ---------------------------------------------------------------- stand-ins are marked and counted
FAKES = "fakes"
MARKER = "uses_fake"


def pytest_configure(config):
    config.addinivalue_line("markers", f"{MARKER}: the test uses a stand-in from tests/fakes (set automatically)")


def _from_fakes(value) -> bool:
    """Whether `value` is defined in tests/fakes: a module, a class (or a subclass of one), a
    function, or an instance of such a class."""
    if isinstance(value, types.ModuleType):
        name = value.__name__
    elif isinstance(value, type):
        return any(getattr(base, "__module__", "").split(".")[0] == FAKES for base in value.__mro__)
    elif isinstance(value, (types.FunctionType, types.MethodType)):
        name = getattr(value, "__module__", "") or ""
    else:
        return _from_fakes(type(value))
    return name.split(".")[0] == FAKES


def _code_objects(code: types.CodeType):
    yield code
    for constant in code.co_consts:
        if isinstance(constant, types.CodeType):
            yield from _code_objects(constant)


def _reaches_fakes(function, seen: set) -> bool:
    """Whether `function` refers to a stand-in, directly or through the functions and classes of
    its own module that it names (followed transitively)."""
    function = inspect.unwrap(function)
    code = getattr(function, "__code__", None)
    if code is None or function in seen:
        return False
    seen.add(function)
    namespace = function.__globals__
    for name in {name for block in _code_objects(code) for name in block.co_names}:
        if name not in namespace:
            continue
        value = namespace[name]
        if _from_fakes(value):
            return True
        if getattr(value, "__module__", None) != function.__module__:
            continue
        if isinstance(value, types.FunctionType) and _reaches_fakes(value, seen):
            return True
        if isinstance(value, type) and any(_reaches_fakes(member, seen) for member in vars(value).values()
                                           if isinstance(member, types.FunctionType)):
            return True
    return False


def _uses_fake(item) -> bool:
    seen: set = set()
    functions = [getattr(item, "function", None)]
    functions += [definition.func for definitions in item._fixtureinfo.name2fixturedefs.values()
                  for definition in definitions]
    if any(function is not None and _reaches_fakes(function, seen) for function in functions):
        return True
    params = getattr(getattr(item, "callspec", None), "params", {})
    return any(_from_fakes(value) for value in params.values())


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker(MARKER) is None and _uses_fake(item):
            item.add_marker(MARKER)


_ran_with_fakes: set[str] = set()


def pytest_runtest_logreport(report):
    """Runs where the reports arrive (the controller under xdist): count the tests that ran."""
    if report.when == "call" and MARKER in report.keywords:
        _ran_with_fakes.add(report.nodeid)


def pytest_terminal_summary(terminalreporter):
    count = len(_ran_with_fakes)
    terminalreporter.write_line(f"{count} test{'s' if count != 1 else ''} used a stand-in from tests/fakes "
                                f"(marker {MARKER}; -m 'not {MARKER}' runs the others)")
