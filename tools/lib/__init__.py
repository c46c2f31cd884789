"""What the tools need and the engine and the tasks do not: choosing a patch size for a budget (``deployment``),
leaving PyTorch at one patch size (``export``), counting FLOPs and timing (``profiling``), and writing sweep tables and
plots (``reporting``). The engine's and the tasks' shared pieces live in ``tasks/common``."""
