"""The loop and what it drives: engine.py (train_step, optimizer_step, evaluate, validate, fit),
run.py (the run: set-up, resume, each step's batches, the end), state.py (what a resume
restores), best.py (best, top-k, early stopping), batch_layout.py, run_dir.py, progress.py,
tracking.py, report.py, resume_config.py."""
