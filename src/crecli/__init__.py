"""crecli: Cluster, Route, Escalate over a ladder of local GGUF models."""

__version__ = "0.1.0"
