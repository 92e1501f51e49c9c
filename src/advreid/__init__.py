"""advreid: measure and improve the adversarial robustness of person re-identification models."""

__version__ = "0.1.0"
