"""Notebook front: the %autoglm magics (parsing apart from behaviour) and display helpers."""
