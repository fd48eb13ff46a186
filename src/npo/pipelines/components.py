"""KFP lightweight components, generated from the stage declarations (npo.stages).

Each stage's component is a function written from its signature: the run's `config` (for
stages that open the run), the stage's parameters with their types and defaults, an
`Output[...]` artifact per UI output it declares, and a NamedTuple of its outputs; its
body hands everything to `npo.pipelines.task.run_task` with the stage's UI keys and output
types written out (so a task imports nothing of npo but the step-server client before its
stage runs), and its docstring is the stage's.
Nothing about a stage is written here, so nothing can drift from it.

    source = component_source(STAGES["train"])       # the Python text KFP ships to pods
    components = make_components("ghcr.io/npo-project/npo:0.1.0-cpu")

KFP ships a lightweight component's source to the pod (`inspect.getsource`), so the
generated text is registered with `linecache` under a pseudo file name, as the standard
library does for code without a file. The image already has npo and kfp: nothing is
pip-installed at run time.
"""

from __future__ import annotations

import inspect
import linecache
from typing import Any, NamedTuple

from kfp import dsl
from kfp.dsl.base_component import BaseComponent

from npo.stages import STAGES, UI_ARTIFACTS, Stage

_TYPES = {str: "str", int: "int", float: "float", bool: "bool", dict: "dict", list: "list"}


def _parameter(name: str, kind: type, default: Any) -> str:
    text = f"{name}: {_TYPES[kind]}"
    return text if default is inspect.Parameter.empty else f"{text} = {default!r}"


def component_source(stage: Stage) -> str:
    """The Python source of `stage`'s component function (see the module docstring)."""
    params = [f"{key}: Output[{UI_ARTIFACTS[key]}]" for key in stage.ui]
    params += ["config: str"] if stage.opens_run else []
    params += [_parameter(*p) for p in stage.parameters()]
    fields = ", ".join(f"({n!r}, {_TYPES[t]})" for n, t in stage.output_types().items())
    returns = ", ".join(f"{n!r}: {_TYPES[t]}" for n, t in stage.output_types().items())
    outputs = f"NamedTuple({stage.outputs.__name__!r}, [{fields}])"
    doc = (inspect.getdoc(stage.fn) or stage.name).replace('"""', "'''")
    body = "\n".join(f"    {line}" if line else "" for line in doc.splitlines())
    signature = ",\n".join(f"    {p}" for p in params)
    return (
        f"def {stage.name}(\n{signature},\n) -> {outputs}:\n"
        f'    """{body.lstrip()}\n    """\n'
        "    arguments = dict(locals())  # before the import below adds a name\n"
        "    from npo.pipelines.task import run_task\n\n"
        f"    return run_task({stage.name!r}, arguments, {stage.ui!r}, {{{returns}}}, "
        f"{stage.opens_run})\n"
    )


def component_function(stage: Stage) -> Any:
    """The component function of `stage`, with its source findable by `inspect`."""
    source = component_source(stage)
    filename = f"<npo component {stage.name}>"
    # (size, mtime None: never checked against a file, lines, name), as linecache keeps it
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    # what the pod's module has too: KFP heads it with `from kfp.dsl import *` and typing's
    namespace: dict[str, Any] = {"NamedTuple": NamedTuple, "Output": dsl.Output}
    namespace |= {kind: getattr(dsl, kind) for kind in UI_ARTIFACTS.values()}
    # dont_inherit: not this module's `from __future__ import annotations` (KFP reads types)
    code = compile(source, filename, "exec", dont_inherit=True)
    exec(code, namespace)  # our own generated text
    return namespace[stage.name]


def make_components(image: str) -> dict[str, BaseComponent]:
    """Every stage as a lightweight component on `image` (kfp and npo preinstalled)."""
    return {
        name: dsl.component(component_function(st), base_image=image, install_kfp_package=False)
        for name, st in STAGES.items()
    }
