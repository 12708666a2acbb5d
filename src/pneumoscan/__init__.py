"""pneumoscan: train, evaluate, explain and serve pediatric chest X-ray pneumonia classifiers.

Research use only: not a medical device.
"""

__version__ = "0.1.0"

CLASS_NAMES = ("NORMAL", "PNEUMONIA")  # index 1 is the positive class everywhere
