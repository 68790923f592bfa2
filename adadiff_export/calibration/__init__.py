"""Exit calibration: fit exit policies to a layer budget by what they do to finished samples."""
