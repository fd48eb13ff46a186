"""Near-Future Policy Optimization (NPO): RLVR experiments, reference implementation."""

__version__ = "0.1.0"
