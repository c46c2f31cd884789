"""What the tools need (the training engine, tools/train.py, among them) and the tasks do not: choosing a patch
size for a budget (``deployment``), leaving PyTorch at one patch size (``export``), counting FLOPs and timing
(``profiling``), writing sweep tables and plots (``reporting``), and what the engine watches each step (``guards``:
non-finite losses, processes that disagree, Ctrl-C). The engine's and the tasks' shared pieces are in tasks/common."""
