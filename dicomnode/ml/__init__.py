"""Machine learning: evaluation metrics and report, MONAI networks, model bundles, training.

Importing this package is cheap: torch and MONAI are only imported by the modules that need them
(``networks``, ``bundle``, ``train``, ``inference``), so ``dicomnode evaluate`` never pays for them.
"""
