"""English->French attention sequence-to-sequence translation, done the MLOps way."""

__version__ = "0.1.0"
