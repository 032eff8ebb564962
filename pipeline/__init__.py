"""vpt-pipeline: videos -> aligned multimodal dataset -> VPT pretraining -> VQA."""

__version__ = "0.1.0"
