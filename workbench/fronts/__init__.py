"""The front ends: the ``%autoglm`` magics and the ``autoglm`` command line, and what they parse alike."""
