"""The experiment as a Kubeflow pipeline.

- components.py: a KFP component per stage, generated from its declaration in npo.stages
  (compiled into components/<stage>/ by `npo components`); task.py: what their bodies call;
- build.py: `build_pipeline(cfg)`, the method's flow (npo.methods) as a DAG;
  parameters.py: the typed KFP UI parameters; kubernetes.py: the `cluster:` settings;
- compile.py: `npo compile` / `make compile` -> pipelines/compiled/<config>.yaml;
- submit.py: `npo submit CONFIG --host URL`, a run on a KFP API server;
- local.py: `npo run`, the same pipeline under kfp.local.

Importing the package is free; kfp is imported by the modules that need it.
"""
