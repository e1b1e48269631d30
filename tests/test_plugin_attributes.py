"""The TensorRT plugin's attributes under every numpy (docs: plugins/tensorrt_plugin.py).

`tensorrt.plugin` (NVIDIA's pure-Python package of the tensorrt-cu12-bindings wheel) converts a
builtin-typed attribute with `int(field.data)` on a one-element array, a TypeError from numpy 2.4
on; the plugin declares its attributes as numpy arrays instead. Checked here: the scalars come
back exactly, a malformed attribute is refused by name, and NVIDIA's creator (through the
stand-in of tests/fakes/tensorrt_standin.py, in a fresh interpreter) declares the same plugin field
types builtin int / float had (INT64, FLOAT64), so engines serialize the same fields. The whole
ahead-of-time build through NVIDIA's package runs in tests/test_plugins.py; run it with numpy
>= 2.4 and with the pinned numpy to see both.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tidar.plugins import tensorrt_plugin

ROOT = Path(__file__).resolve().parents[1]


def test_attributes_from_one_element_arrays():
    found = tensorrt_plugin.attribute_values(np.array([12], np.int64), np.array([2], np.int64),
                                             np.array([128], np.int64), np.array([128 ** -0.5], np.float64))
    assert found == (12, 2, 128, 128 ** -0.5)
    assert [type(v) for v in found] == [int, int, int, float]
    assert tensorrt_plugin.attribute_values(12, 2, 128, 0.5) == (12, 2, 128, 0.5)  # plain scalars too


@pytest.mark.parametrize("value, match", [(np.array([1, 2], np.int64), "'num_heads' must hold one value, got 2"),
                                          (np.array([], np.int64), "'num_heads' must hold one value, got 0"),
                                          (np.array([1.5]), "'num_heads' must be an integer, got 1.5")])
def test_malformed_attribute_is_refused_by_name(value, match):
    with pytest.raises(ValueError, match=match):
        tensorrt_plugin.attribute_values(value, 2, 128, 0.5)


FIELD_TYPES = """
import json, sys
sys.path.insert(0, "tests")
from fakes import tensorrt_standin
tensorrt_standin.install()
from tidar.plugins import tensorrt_plugin
tensorrt_plugin.register()
trt = sys.modules["tensorrt"]
creator = trt.get_plugin_registry().get_creator("hybrid_attention", "1", "tidar")
print(json.dumps({field.name: field.type.name for field in creator.field_names}))
"""


@pytest.mark.uses_fake  # the stand-in runs in the subprocess
def test_plugin_field_types_are_those_of_builtin_int_and_float():
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", FIELD_TYPES], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.splitlines()[-1]) == {"num_heads": "INT64", "num_kv_heads": "INT64",
                                                        "head_dim": "INT64", "scale": "FLOAT64"}
