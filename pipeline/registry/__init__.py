"""The MLflow model registry: register a checkpoint, promote it only when it deserves it, predict."""
