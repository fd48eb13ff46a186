"""The experiment as a Kubeflow pipeline.

- components.py: one thin KFP component per stage (docs/stages-api.md);
- build.py: `build_pipeline(cfg)`, the task graph unrolled from the config, mirroring
  npo/engine.py; kubernetes.py: the `cluster:` settings applied to each task;
- compile.py: `npo compile` / `make compile` -> pipelines/compiled/<config>.yaml;
- submit.py: `npo submit CONFIG --host URL`, a run on a KFP API server;
- local.py: `npo run`, the same pipeline under kfp.local.

Importing the package is free; kfp is imported by the modules that need it.
"""
