"""Only what pyproject.toml cannot say: the wheel carries patches/, native/ and the embedded
model under orthrus_gguf/_native_data, where `orthrus-gguf build` and `demo` look for them
outside a checkout (build.data_root, demo.embedded_model)."""
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
DATA = {"patches": "patches", "native": "native", "models/orthrus-tiny": "models/orthrus-tiny"}


class BuildPy(build_py):
    def run(self):
        super().run()
        dest = Path(self.build_lib) / "orthrus_gguf" / "_native_data"
        if dest.resolve().is_relative_to(HERE / "orthrus_gguf"):
            return  # an in-place build: the checkout already has them
        for src, rel in DATA.items():
            shutil.rmtree(dest / rel, ignore_errors=True)
            shutil.copytree(HERE / src, dest / rel, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


setup(cmdclass={"build_py": BuildPy})
