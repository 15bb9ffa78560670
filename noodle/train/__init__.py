"""Training: the loop `noodle train` and `noodle finetune` share, and its parts.

settings (what a run is asked to do; no torch), optim (optimizers, schedule, the step),
resume (identity and resume state), metrics, writer (saving off the training thread),
loop (the Trainer), run (the output directory and model.json around a run), and the two
commands, pretrain and finetune.
"""
