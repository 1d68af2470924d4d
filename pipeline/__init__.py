"""ImageNet -> FFCV shards -> Ray Train/Tune ResNets -> MLflow registry."""

__version__ = "0.1.0"
