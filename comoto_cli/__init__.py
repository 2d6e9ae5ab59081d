"""CoMoTo CLI: breast-lesion detection in DBT with unpaired mammography distillation (Alberb et al., 2024)."""

__version__ = "0.1.0"
