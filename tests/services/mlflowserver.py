"""Moved to ``npo.devservices.mlflowserver`` (shared with ``python -m npo.devservices``);
re-exported here for old imports."""

from npo.devservices.mlflowserver import HOST, MlflowServer, free_port, mlflow_binary

__all__ = ["HOST", "MlflowServer", "free_port", "mlflow_binary"]
