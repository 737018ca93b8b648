"""jaxcl: global and local contrastive pre-training for label-efficient segmentation."""

__version__ = "0.1.0"
