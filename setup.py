"""Install `ofa_ufo`; the top-level `prompts/` and `tasks/` tables ship inside the package."""

from setuptools import find_packages, setup

RESOURCE_PACKAGES = {
    "ofa_ufo.resources.prompts": "prompts",
    "ofa_ufo.resources.task_specs": "tasks",
}

setup(
    name="ofa-ufo",
    version="0.1.0",
    description="Unified vision-language encoder-decoder (OFA) with a UFO task-MoE vision supernet, native to transformers",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["ofa_ufo", "ofa_ufo.*"]) + list(RESOURCE_PACKAGES),
    package_dir=RESOURCE_PACKAGES,
    package_data={
        "ofa_ufo": ["assets/*/*", "training/configs/*.yaml", "training/configs/*/*.yaml"],
        "ofa_ufo.resources.prompts": ["*.json"],
        "ofa_ufo.resources.task_specs": ["*.yaml"],
    },
    install_requires=[
        "torch>=2.6",
        "transformers>=5.25,<6",  # its outputs carry `cache`, its configs `sub_configs_defaults`
        "tokenizers>=0.22",
        "safetensors>=0.4",
        "accelerate>=1.0",
        "datasets>=3.0",
        "huggingface-hub>=1.0",
        "pillow>=10.0",
        "numpy>=1.26",
        "tqdm>=4.66",
        "pyyaml>=6.0",
        "pycocotools>=2.0.11",
        "pycocoevalcap>=1.2",
        "tensorboard>=2.15",
        "matplotlib>=3.8",
    ],
    entry_points={"console_scripts": ["ofa-ufo = ofa_ufo.cli.main:run"]},
    extras_require={
        # pytest-xdist: run_scripts/test.sh runs the suite on every core; gradio + selenium: the web demo's tests
        # (the browser test also needs Debian's chromium + chromium-driver)
        "test": ["pytest>=8.0", "pytest-xdist>=3.5", "hypothesis>=6.100", "scikit-image>=0.22", "gradio>=6.0,<7",
                 "selenium>=4.20", "onnx>=1.16", "onnxruntime>=1.17", "onnxslim>=0.1.90", "scikit-learn>=1.3",
                 "webdataset>=0.2"],
        # WebDataset tar shards streamed by the trainer (ofa_ufo.data.streaming; JSONL/TSV/datasets need nothing more)
        "streaming": ["webdataset>=0.2"],
        "demo": ["scikit-image>=0.22"],
        "serve": ["gradio>=6.0,<7", "scikit-image>=0.22"],  # `ofa-ufo serve`: the web demo and its bundled photos
        "oracle": [
            "modelscope==1.40.2",
            "addict",
            "einops",
            "sentencepiece>=0.2",
        ],
        "timm": ["timm>=1.0"],
        # `ofa-ufo export` / `python -m ofa_ufo.export` (docs/deployment.md); optimum's ONNX side does not fit, see there
        # onnxslim folds the traced graphs' shape arithmetic (ofa_ufo.deploy.onnx_export.simplify_graph)
        "export": ["onnx>=1.16", "onnxruntime>=1.17", "onnxslim>=0.1.90"],
        # `python -m ofa_ufo.search`: scikit-learn's Gaussian processes predict subnet metric and latency (GP-NAS)
        "search": ["scikit-learn>=1.3"],
    },
)
