"""The front ends, side by side: the notebook (magics and widgets) and the command line, and what they parse alike."""
