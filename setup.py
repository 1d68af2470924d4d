# Only the C part of the project lives here; everything else is in pyproject.toml.
from setuptools import Extension, setup

setup(ext_modules=[Extension("pipeline.data._jpeg_crop", ["pipeline/data/jpeg_crop.c"],
                             libraries=["jpeg"], extra_compile_args=["-O2"])])
