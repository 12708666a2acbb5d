"""Data: folders and sources -> decoded uint8 arrays with labels and patient ids."""
