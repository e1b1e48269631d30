"""Optional dependencies and the extra that brings each: one line instead of a traceback.

    missing_extra(exc) -> "needs onnx_ir, which the 'export' extra installs: pip install \"tidar-trt[export]\""

The console commands (cli.py, export/cli.py) catch ModuleNotFoundError and hand it to
`explain_missing`, which prints this line and returns exit status 2; a module that no extra
provides is a real error and propagates.
"""

from __future__ import annotations

import sys

EXTRAS = {
    "export": ("onnx", "onnx_ir", "onnxscript", "onnxruntime"),
    "serve": ("tritonclient", "pytriton", "grpc"),
    "kernel": ("triton",),
    "openai": ("aiohttp", "jinja2"),
    "test": ("transformers", "scipy"),
}
EXTRA_OF = {module: extra for extra, modules in EXTRAS.items() for module in modules}


def missing_extra(exc: ModuleNotFoundError) -> str | None:
    """The one-line explanation of `exc`, or None when no extra provides the missing module."""
    module = (exc.name or "").split(".")[0]
    extra = EXTRA_OF.get(module)
    if extra is None:
        return None
    return f"needs {module}, which the '{extra}' extra installs: pip install \"tidar-trt[{extra}]\""


def explain_missing(exc: ModuleNotFoundError, command: str) -> int:
    """Print `command: error: this command needs ...` and return 2, or re-raise `exc`."""
    message = missing_extra(exc)
    if message is None:
        raise exc
    print(f"{command}: error: this command {message}", file=sys.stderr)
    return 2
