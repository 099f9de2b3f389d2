"""The job runner: analysis, report and delivery steps (scheduler and runners live beside them).

Kept light at import time: sub-modules import the heavy engines (bmd, report) only when used.
"""
